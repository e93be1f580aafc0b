"""Plotly figures built from training metrics (lists of per-step dicts, as in ``metrics.jsonl``).

The same builders serve the CLI report (static HTML), the notebooks (static figures) and the live
dashboard (a ``go.FigureWidget`` whose traces are updated in place).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

#: Panels of the training dashboard: (metric key, panel title, log-scale y).
TRAINING_PANELS: tuple[tuple[str, str, bool], ...] = (
    ("reward/mean", "sampled reward", False),
    ("mismatch/k3", "k3 (trainer ‖ engine)", True),
    ("optim/grad_norm", "grad norm (pre-clip)", True),
    ("dvp/one_minus_z_mean", "1 − Z (pruned mass)", True),
    ("mismatch/tail_tokens", "tail draws per step", False),
    ("is/ess", "IS effective sample size", False),
)
_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def training_figure(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    panels: Sequence[tuple[str, str, bool]] = TRAINING_PANELS,
    *,
    title: str = "",
    widget: bool = False,
) -> go.Figure:
    """Small multiples of ``panels`` with one coloured line per run.

    Args:
        runs: ``{run name: [metrics dict per step, …]}``; missing keys are skipped (drawn as gaps).
        panels: ``(key, title, log_y)`` triples, laid out three per row.
        title: figure title.
        widget: return a ``go.FigureWidget`` (live updates in Jupyter) instead of a ``go.Figure``.

    Returns:
        A figure whose trace ``i * len(panels) + j`` is run ``i`` in panel ``j`` (see :func:`update_training_figure`).
    """
    cols = 3
    rows = -(-len(panels) // cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[p[1] for p in panels],
        horizontal_spacing=0.08,
        vertical_spacing=0.14,
    )
    for i, (name, history) in enumerate(runs.items()):
        color = _COLORS[i % len(_COLORS)]
        for j, (key, _, _) in enumerate(panels):
            xs, ys = _series(history, key)
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    name=name,
                    legendgroup=name,
                    showlegend=j == 0,
                    line={"color": color, "width": 1.8},
                ),
                row=j // cols + 1,
                col=j % cols + 1,
            )
    for j, (_, _, log_y) in enumerate(panels):
        if log_y:
            fig.update_yaxes(type="log", row=j // cols + 1, col=j % cols + 1)
    fig.update_xaxes(title_text="step", row=rows)
    fig.update_layout(title=title, height=330 * rows, template="plotly_white", margin={"t": 70, "b": 40})
    return go.FigureWidget(fig) if widget else fig


def update_training_figure(
    fig: go.Figure,
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    panels: Sequence[tuple[str, str, bool]] = TRAINING_PANELS,
) -> None:
    """Refresh the traces of a figure made by :func:`training_figure` with the same runs, in one batch."""
    with fig.batch_update():
        for i, history in enumerate(runs.values()):
            for j, (key, _, _) in enumerate(panels):
                xs, ys = _series(history, key)
                trace = fig.data[i * len(panels) + j]
                trace.x, trace.y = xs, ys


def _series(history: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float | None]]:
    xs = [float(m.get("step", n + 1)) for n, m in enumerate(history)]
    ys: list[float | None] = []
    for m in history:
        v = m.get(key)
        ys.append(None if v is None else float(v))
    return xs, ys


def save_html(fig: go.Figure, path: str | os.PathLike[str]) -> Path:
    """Write a self-contained HTML report atomically (temp file + rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".html")
    os.close(fd)
    fig.write_html(tmp, include_plotlyjs=True, full_html=True)
    os.replace(tmp, target)
    return target
