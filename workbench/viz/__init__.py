"""Plotly figures and ipywidgets dashboards for the notebooks, the CLI report and the demo.

The front door for everything that *draws*: ``from workbench.viz import …``. Every builder takes data (metric
rows, the records of :mod:`workbench.experiments`, the measurements of :mod:`workbench.analysis`) and returns a
figure or a widget; nothing here runs an engine or an experiment.

=========================================  ==================================================================
module                                     what it draws
=========================================  ==================================================================
:mod:`~workbench.viz.figures`              training curves, ρ sweep, horizons, signature, overlap, Prop 5.5
:mod:`~workbench.viz.explore`              the pictures and slider explorers of notebooks 01–05
:mod:`~workbench.viz.dashboard`            the live training dashboard of notebook 06
:mod:`~workbench.viz.diagnose_report`      the ``workbench diagnose`` report
=========================================  ==================================================================
"""

from workbench.viz.dashboard import LiveTrainingDashboard, configs_html, dashboard_configs
from workbench.viz.diagnose_report import diagnose_figure, diagnose_report_html
from workbench.viz.explore import (
    EnvelopeExplorer,
    Explorer,
    FigureSwitcher,
    PositiveModeExplorer,
    SafeSetExplorer,
    accumulation_figure,
    envelope_figure,
    mismatch_by_bin_figure,
    positive_mode_figure,
    precision_envelope_figure,
    safe_set_figure,
)
from workbench.viz.figures import (
    EXPERIMENT_PANELS,
    TRAINING_PANELS,
    horizon_figure,
    overlap_figure,
    prop55_figure,
    save_figure,
    save_html,
    save_training_report,
    signature_figure,
    sweep_figure,
    training_figure,
    update_training_figure,
)

__all__ = [
    "EXPERIMENT_PANELS",
    "TRAINING_PANELS",
    "EnvelopeExplorer",
    "Explorer",
    "FigureSwitcher",
    "LiveTrainingDashboard",
    "PositiveModeExplorer",
    "SafeSetExplorer",
    "accumulation_figure",
    "configs_html",
    "dashboard_configs",
    "diagnose_figure",
    "diagnose_report_html",
    "envelope_figure",
    "horizon_figure",
    "mismatch_by_bin_figure",
    "overlap_figure",
    "positive_mode_figure",
    "precision_envelope_figure",
    "prop55_figure",
    "safe_set_figure",
    "save_figure",
    "save_html",
    "save_training_report",
    "signature_figure",
    "sweep_figure",
    "training_figure",
    "update_training_figure",
]
