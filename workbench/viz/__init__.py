"""Plotly figures and ipywidgets dashboards for the notebooks, the CLI report and the demo."""

from workbench.viz.figures import TRAINING_PANELS, save_html, training_figure, update_training_figure

__all__ = ["TRAINING_PANELS", "save_html", "training_figure", "update_training_figure"]
