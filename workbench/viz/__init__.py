"""Plotly figures and ipywidgets dashboards for the notebooks, the CLI report and the demo."""

from workbench.viz.figures import (
    EXPERIMENT_PANELS,
    TRAINING_PANELS,
    save_figure,
    save_html,
    training_figure,
    update_training_figure,
)

__all__ = [
    "EXPERIMENT_PANELS",
    "TRAINING_PANELS",
    "save_figure",
    "save_html",
    "training_figure",
    "update_training_figure",
]
