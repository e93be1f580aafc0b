"""Plotly figures built from training metrics (lists of per-step dicts, as in ``metrics.jsonl``).

The same builders serve the CLI report (static HTML), the notebooks (static figures) and the live
dashboard (a ``go.FigureWidget`` whose traces are updated in place). The experiment figures of notebooks
07, 08 and 10 take the records of :mod:`workbench.experiments` (objects or their ``to_dict()`` form):

- :func:`sweep_figure` — the ρ sweep (``SweepResults.points()``): final reward and final mismatch vs ρ;
- :func:`signature_figure` — the mismatch signature (``Signature``): signed mean Δ per trainer-probability
  bin, and Δ against log p on a sample of tokens;
- :func:`overlap_figure` — safe-set overlap and boundary-token rate per engine (``Overlap``);
- :func:`prop55_figure` — Prop 5.5 on a policy's own states (``Prop55Point``): the bound, the exact
  trajectory TV and the measured objective gap against ρ.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

#: Panels of the training dashboard: (metric key, panel title, log-scale y).
TRAINING_PANELS: tuple[tuple[str, str, bool], ...] = (
    ("reward/mean", "sampled reward", False),
    ("mismatch/k3", "k3 (trainer ‖ engine)", True),
    ("optim/grad_norm", "grad norm (pre-clip)", True),
    ("dvp/one_minus_z_mean", "1 − Z (pruned mass)", True),
    ("mismatch/tail_tokens", "tail draws per step", False),
    ("is/token_ess", "IS effective sample size (π/μ)", False),
)
#: Panels of an experiment (``results.json`` of ``python -m workbench.experiments arms``): the clean-engine
#: reward the verdicts use first, then the mechanism (tail draws, their trainer log-prob, the mismatch).
EXPERIMENT_PANELS: tuple[tuple[str, str, bool], ...] = (
    ("eval/reward", "clean-engine eval reward", False),
    ("reward/mean", "sampled reward", False),
    ("mismatch/k1", "k1 (trainer ‖ engine)", False),
    ("mismatch/tail_tokens", "tail draws per step", False),
    ("mismatch/tail_logp_mean", "trainer log π of tail draws", False),
    ("optim/grad_norm", "grad norm (pre-clip)", True),
)
_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_SET_DASHES = ("solid", "dash", "dot", "dashdot")  # horizon_figure: one line style per row set
_SET_SYMBOLS = ("circle", "diamond", "square", "triangle-up")


def training_figure(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    panels: Sequence[tuple[str, str, bool]] = TRAINING_PANELS,
    *,
    title: str = "",
    widget: bool = False,
    groups: Mapping[str, str] | None = None,
) -> go.Figure:
    """Small multiples of ``panels`` with one coloured line per run.

    Args:
        runs: ``{run name: [metrics dict per step, …]}``; a missing key or a nan value is skipped and the
            line bridges it (so a metric logged every 10 steps, such as ``eval/reward``, still draws a line).
        panels: ``(key, title, log_y)`` triples, laid out three per row.
        title: figure title.
        widget: return a ``go.FigureWidget`` (live updates in Jupyter) instead of a ``go.Figure``.
        groups: ``{run name: group}`` — runs of one group (an arm over several seeds) share a colour and one
            legend entry named after the group; runs not listed are their own group.

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
    group_of = {name: (groups or {}).get(name, name) for name in runs}
    colors = {g: _COLORS[i % len(_COLORS)] for i, g in enumerate(dict.fromkeys(group_of.values()))}
    shown: set[str] = set()
    for name, history in runs.items():
        group = group_of[name]
        for j, (key, _, _) in enumerate(panels):
            xs, ys = _series(history, key)
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    name=group,
                    legendgroup=group,
                    showlegend=j == 0 and group not in shown,
                    connectgaps=True,
                    line={"color": colors[group], "width": 1.8},
                ),
                row=j // cols + 1,
                col=j % cols + 1,
            )
        shown.add(group)
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


def set_run_names(
    fig: go.Figure, names: Sequence[str], panels: Sequence[tuple[str, str, bool]] = TRAINING_PANELS
) -> None:
    """Rename the runs of a figure made by :func:`training_figure` (legend labels), in place.

    Lets a live widget keep its traces (and its place in the notebook) when the runs it shows change.

    >>> fig = training_figure({"a": [], "b": []}, TRAINING_PANELS[:2])
    >>> set_run_names(fig, ["naive", "DVP"], TRAINING_PANELS[:2])
    >>> [t.name for t in fig.data]
    ['naive', 'naive', 'DVP', 'DVP']
    """
    runs = len(fig.data) // max(1, len(panels))
    if len(names) != runs:
        raise ValueError(
            f"names has {len(names)} entries but the figure holds {runs} runs; build a new figure "
            "with training_figure for a different number of runs"
        )
    with fig.batch_update():
        for i, name in enumerate(names):
            for j in range(len(panels)):
                trace = fig.data[i * len(panels) + j]
                trace.name, trace.legendgroup = name, name


def _series(history: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float | None]]:
    xs = [float(m.get("step", n + 1)) for n, m in enumerate(history)]
    ys: list[float | None] = []
    for m in history:
        v = m.get(key)
        ys.append(None if v is None else float(v))
    return xs, ys


def _field(record: Any, name: str) -> Any:
    """``record[name]`` for a mapping, ``record.name`` otherwise (experiment records or their dicts)."""
    if isinstance(record, Mapping):
        if name not in record:
            raise ValueError(
                f"record is missing {name!r} (has {sorted(record)}); pass the experiment's records"
            )
        return record[name]
    if not hasattr(record, name):
        raise ValueError(f"{type(record).__name__} has no field {name!r}; pass the experiment's records")
    return getattr(record, name)


def _positive(values: Sequence[Any]) -> list[float | None]:
    """Values for a log axis: non-positive, missing or non-finite entries become gaps (``None``)."""
    out: list[float | None] = []
    for v in values:
        x = None if v is None else float(v)
        out.append(x if x is not None and math.isfinite(x) and x > 0 else None)
    return out


def _finite(values: Sequence[Any]) -> list[float | None]:
    out: list[float | None] = []
    for v in values:
        x = None if v is None else float(v)
        out.append(x if x is not None and math.isfinite(x) else None)
    return out


def _non_empty(name: str, records: Sequence[Any] | Mapping[str, Any]) -> list[Any]:
    items = list(records.values()) if isinstance(records, Mapping) else list(records)
    if not items:
        raise ValueError(f"{name} is empty; run the experiment first (nothing to plot)")
    return items


def sweep_figure(points: Sequence[Mapping[str, Any]], *, title: str = "") -> go.Figure:
    """The ρ sweep: final reward (mean ± std over seeds) and final mismatch / pruned mass against ρ.

    The x axis runs from the largest ρ (most pruning) to the smallest, ``none`` last (points carrying a
    ``rho`` key are sorted; others keep their order), so the paper's expected inverted U in reward reads
    left to right: pruning bias, a plateau, then the tail's mismatch.

    Args:
        points: :meth:`workbench.experiments.sweep.SweepResults.points` rows (``label``,
            ``reward_final_mean``, ``reward_final_std``, ``k3_final_mean``, ``one_minus_z_final_mean``,
            ``tail_draws_mean``; ``eval_final_mean``/``eval_final_std`` add the clean-eval reward, last trace).
        title: figure title.

    Returns:
        Two panels: reward (left); k3, 1 − Z and tail draws per run on a log axis (right).

    >>> pts = [{"label": "1e-02", "reward_final_mean": 0.2, "reward_final_std": 0.1, "k3_final_mean": 1e-4,
    ...         "one_minus_z_final_mean": 0.05, "tail_draws_mean": 0.0},
    ...        {"label": "none", "reward_final_mean": 0.1, "reward_final_std": 0.0, "k3_final_mean": 3e-2,
    ...         "one_minus_z_final_mean": 0.0, "tail_draws_mean": 12.0}]
    >>> fig = sweep_figure(pts)
    >>> [t.name for t in fig.data], fig.data[2].y  # 1 − Z of "none" is 0: a gap on the log axis
    (['final reward', 'final k3', 'final 1 − Z', 'tail draws per run'], (0.05, None))
    """
    pts = _non_empty("points", points)
    if all(isinstance(p, Mapping) and "rho" in p for p in pts):  # order by ρ, largest first, no pruning last
        pruned = sorted((p for p in pts if p["rho"] is not None), key=lambda p: -float(p["rho"]))
        pts = pruned + [p for p in pts if p["rho"] is None]
    labels = [str(_field(p, "label")) for p in pts]
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("final reward (mean ± std over seeds)", "final mismatch and pruned mass"),
        horizontal_spacing=0.1,
    )
    fig.add_trace(
        go.Scatter(
            x=labels,
            y=_finite([_field(p, "reward_final_mean") for p in pts]),
            error_y={"type": "data", "array": _finite([_field(p, "reward_final_std") for p in pts])},
            mode="lines+markers",
            name="final reward",
            line={"color": _COLORS[2]},
        ),
        row=1,
        col=1,
    )
    for key, name, color in (
        ("k3_final_mean", "final k3", _COLORS[0]),
        ("one_minus_z_final_mean", "final 1 − Z", _COLORS[1]),
        ("tail_draws_mean", "tail draws per run", _COLORS[4]),
    ):
        fig.add_trace(
            go.Scatter(
                x=labels,
                y=_positive([_field(p, key) for p in pts]),
                mode="lines+markers",
                name=name,
                line={"color": color},
            ),
            row=1,
            col=2,
        )
    if all(isinstance(p, Mapping) for p in pts) and any(_finite([p.get("eval_final_mean") for p in pts])):
        fig.add_trace(  # the clean-engine eval reward, when the runs measured it (the policy, not the engine)
            go.Scatter(
                x=labels,
                y=_finite([p.get("eval_final_mean") for p in pts]),
                error_y={"type": "data", "array": _finite([p.get("eval_final_std") for p in pts])},
                mode="lines+markers",
                name="final clean-eval reward",
                line={"color": _COLORS[3], "dash": "dot"},
            ),
            row=1,
            col=1,
        )
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="ρ (most pruning → none)")
    fig.update_layout(title=title, height=380, template="plotly_white", margin={"t": 70, "b": 50})
    return fig


def horizon_figure(
    rows: Sequence[Mapping[str, Any]],
    *,
    extra: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    title: str = "",
) -> go.Figure:
    """The horizon study: damage against response length T, one line per arm, error bars over seeds.

    Args:
        rows: :func:`workbench.experiments.horizon.horizon_rows` (``T``, ``arm``, ``damage_mean``,
            ``damage_sd``, ``damage`` per seed, ``tail_per_seq``).
        extra: more row sets, each drawn with its own dash and marker under its own label (e.g.
            ``{"4.5 M, GPU": rows}``); the arm keeps its colour across sets.
        title: figure title.

    Returns:
        Two panels: damage (control − arm, final clean-eval reward; mean ± sample sd, every seed as a
        faint dot) and tail draws per sequence, both against T.

    >>> rows = [{"T": 23.0, "arm": "naive", "damage": [0.1, 0.12], "damage_mean": 0.11, "damage_sd": 0.014,
    ...          "tail_per_seq": 0.35},
    ...         {"T": 58.0, "arm": "naive", "damage": [0.2, 0.3], "damage_mean": 0.25, "damage_sd": 0.07,
    ...          "tail_per_seq": 0.83}]
    >>> fig = horizon_figure(rows)
    >>> [t.name for t in fig.data], fig.data[0].y
    (['naive', 'naive (seeds)', 'naive tail draws'], (0.11, 0.25))
    """
    sets = {"": _non_empty("rows", rows), **{k: _non_empty(k, v) for k, v in (extra or {}).items()}}
    arms = list(dict.fromkeys(r["arm"] for rs in sets.values() for r in rs))
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            "damage = control − arm, final clean eval (mean ± sd)",
            "tail draws per sequence",
        ),
        horizontal_spacing=0.1,
    )
    for i, (label, rs) in enumerate(sets.items()):
        dash = _SET_DASHES[i % len(_SET_DASHES)]
        symbol = _SET_SYMBOLS[i % len(_SET_SYMBOLS)]
        for arm in arms:
            pts = sorted((r for r in rs if r["arm"] == arm), key=lambda r: r["T"])
            if not pts:
                continue
            name = f"{arm} ({label})" if label else arm
            color = _COLORS[arms.index(arm) % len(_COLORS)]
            fig.add_trace(
                go.Scatter(
                    x=[r["T"] for r in pts],
                    y=_finite([r["damage_mean"] for r in pts]),
                    error_y={"type": "data", "array": _finite([r["damage_sd"] for r in pts])},
                    mode="lines+markers",
                    name=name,
                    line={"color": color, "dash": dash},
                    marker={"symbol": symbol, "size": 8},
                ),
                row=1,
                col=1,
            )
            fig.add_trace(
                go.Scatter(
                    x=[r["T"] for r in pts for _ in r["damage"]],
                    y=_finite([d for r in pts for d in r["damage"]]),
                    mode="markers",
                    name=f"{name} (seeds)",
                    marker={"color": color, "opacity": 0.35, "size": 6},
                    showlegend=False,
                ),
                row=1,
                col=1,
            )
            fig.add_trace(
                go.Scatter(
                    x=[r["T"] for r in pts],
                    y=_finite([r["tail_per_seq"] for r in pts]),
                    mode="lines+markers",
                    name=f"{name} tail draws",
                    line={"color": color, "dash": dash},
                    marker={"symbol": symbol, "size": 8},
                    showlegend=False,
                ),
                row=1,
                col=2,
            )
    fig.add_hline(y=0.0, line={"color": "#888", "width": 1}, row=1, col=1)
    fig.update_xaxes(title_text="response length T (tokens)")
    # Tall enough for the legend: one line per (set, arm) trace, ≈ 19 px each.
    legend_lines = sum(1 for t in fig.data if t.showlegend is not False)
    fig.update_layout(
        title=title,
        height=max(400, 140 + 19 * legend_lines),
        template="plotly_white",
        margin={"t": 70, "b": 50},
    )
    return fig


def signature_figure(
    signatures: Sequence[Any] | Mapping[str, Any], *, max_points: int = 2000, title: str = ""
) -> go.Figure:
    """The mismatch signature per engine: signed mean Δ per trainer-probability bin, and Δ vs log p.

    Left: mean Δ = log μ − log π of the sampled tokens in each bin of the trainer's probability p (the
    positive mode of Prop 4.3 is a mean above 0 in the low-p bins; Prop 4.2 makes |Δ| shrink as p → 1).
    Right: a sample of the individual tokens, Δ against log₁₀ p.

    Args:
        signatures: :class:`workbench.experiments.signature.Signature` records (or their ``to_dict()``),
            as a list or ``{label: record}``.
        max_points: tokens per engine in the scatter.
        title: figure title.

    Returns:
        A two-panel figure, one colour per engine.
    """
    items = _non_empty("signatures", signatures)
    if max_points < 1:
        raise ValueError(f"max_points={max_points} must be >= 1")
    names = list(signatures) if isinstance(signatures, Mapping) else [str(_field(s, "engine")) for s in items]
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.55, 0.45],
        subplot_titles=("mean Δ = log μ − log π by trainer p", "sampled tokens: Δ vs log₁₀ p"),
        horizontal_spacing=0.1,
    )
    for i, (name, sig) in enumerate(zip(names, items)):
        color = _COLORS[i % len(_COLORS)]
        bins = [b for b in _field(sig, "bins") if b["count"] > 0]
        labels = [f"[{b['lo']:.0e}, {b['hi']:.2g})" if b["lo"] > 0 else f"[0, {b['hi']:.0e})" for b in bins]
        fig.add_trace(
            go.Scatter(
                x=labels,
                y=_finite([b["mean_delta"] for b in bins]),
                mode="lines+markers",
                name=name,
                legendgroup=name,
                line={"color": color},
                customdata=[[b["count"], b["frac_positive"]] for b in bins],
                hovertemplate="%{x}: mean Δ %{y:.3g}<br>tokens %{customdata[0]}, Δ>0 %{customdata[1]:.0%}",
            ),
            row=1,
            col=1,
        )
        pairs = list(_field(sig, "deltas"))[:max_points]
        fig.add_trace(
            go.Scatter(
                x=[lp / math.log(10) for lp, _ in pairs],
                y=[d for _, d in pairs],
                mode="markers",
                name=name,
                legendgroup=name,
                showlegend=False,
                marker={"color": color, "size": 4, "opacity": 0.35},
            ),
            row=1,
            col=2,
        )
    fig.add_hline(y=0, line={"color": "gray", "width": 1, "dash": "dot"})
    fig.update_yaxes(title_text="mean Δ (> 0: engine over-confident)", row=1, col=1)
    fig.update_yaxes(title_text="Δ", row=1, col=2)
    fig.update_xaxes(title_text="trainer probability bin", row=1, col=1)
    fig.update_xaxes(title_text="log₁₀ π(token)", row=1, col=2)
    fig.update_layout(title=title, height=420, template="plotly_white", margin={"t": 70, "b": 60})
    return fig


def overlap_figure(overlaps: Sequence[Any] | Mapping[str, Any], *, title: str = "") -> go.Figure:
    """Safe-set agreement between trainer and engine, and the boundary-token rate, per engine setting.

    Args:
        overlaps: :class:`workbench.experiments.overlap.Overlap` records (or their ``to_dict()``), as a
            list or ``{label: record}``.
        title: figure title.

    Returns:
        Left: mean |V_S ∩ V'_S| / |V_S| (trainer view) and / |V'_S| (engine view), and the fraction of
        positions where the sets agree exactly. Right: sampled tokens outside the trainer's safe set per
        position (log axis; an empty bar is exactly 0).

    >>> fig = overlap_figure([{"engine": "bf16", "overlap_mean": 1.0, "reverse_mean": 0.99, "frac_exact": 1.0,
    ...                        "boundary_rate": 0.0}])
    >>> [t.name for t in fig.data], fig.data[3].y
    (['trainer view |V_S ∩ V′_S|/|V_S|', 'engine view |V_S ∩ V′_S|/|V′_S|', 'exact agreement', 'boundary tokens per position'], (None,))
    """
    items = _non_empty("overlaps", overlaps)
    names = list(overlaps) if isinstance(overlaps, Mapping) else [str(_field(o, "engine")) for o in items]
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("safe-set overlap (1 = identical)", "boundary tokens per position"),
        horizontal_spacing=0.1,
    )
    for j, (key, name) in enumerate(
        (
            ("overlap_mean", "trainer view |V_S ∩ V′_S|/|V_S|"),
            ("reverse_mean", "engine view |V_S ∩ V′_S|/|V′_S|"),
            ("frac_exact", "exact agreement"),
        )
    ):
        fig.add_trace(
            go.Bar(
                x=names, y=_finite([_field(o, key) for o in items]), name=name, marker={"color": _COLORS[j]}
            ),
            row=1,
            col=1,
        )
    fig.add_trace(
        go.Bar(
            x=names,
            y=_positive([_field(o, "boundary_rate") for o in items]),
            name="boundary tokens per position",
            marker={"color": _COLORS[4]},
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(range=[0, 1.05], row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=title, height=400, template="plotly_white", barmode="group", margin={"t": 70})
    return fig


def prop55_figure(points: Sequence[Any], *, title: str = "") -> go.Figure:
    """Prop 5.5 on a policy's own states: the bound, the exact trajectory TV and the measured gap vs ρ.

    Args:
        points: :class:`workbench.experiments.beyond.Prop55Point` records (or their ``to_dict()``).
        title: figure title.

    Returns:
        One log-log panel: ``T (1 − Z_min)`` (the bound, R_max = 1), ``1 − E[Π_t Z]`` (exact TV of
        pruning), ``|J_mp − J|`` (Monte Carlo, with ±2 standard errors), and the mean 1 − Z per state.

    >>> fig = prop55_figure([{"rho": 1e-2, "bound": 0.5, "tv_exact": 0.1, "j_gap": -0.02, "j_gap_se": 0.01,
    ...                       "one_minus_z_mean": 0.004}])
    >>> [t.name for t in fig.data]
    ['bound T·(1 − Z_min)', 'exact TV 1 − E[Π Z]', '|J_mp − J| (Monte Carlo)', 'mean 1 − Z per state']
    """
    pts = sorted(_non_empty("points", points), key=lambda p: float(_field(p, "rho")))
    rhos = [float(_field(p, "rho")) for p in pts]
    gaps = [abs(float(_field(p, "j_gap"))) for p in pts]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=rhos, y=_positive([_field(p, "bound") for p in pts]), name="bound T·(1 − Z_min)",
                             mode="lines+markers", line={"color": _COLORS[0]}))  # fmt: skip
    fig.add_trace(go.Scatter(x=rhos, y=_positive([_field(p, "tv_exact") for p in pts]),
                             name="exact TV 1 − E[Π Z]", mode="lines+markers", line={"color": _COLORS[1]}))  # fmt: skip
    fig.add_trace(
        go.Scatter(
            x=rhos,
            y=_positive(gaps),
            error_y={"type": "data", "array": [2 * float(_field(p, "j_gap_se")) for p in pts]},
            name="|J_mp − J| (Monte Carlo)",
            mode="markers",
            marker={"color": _COLORS[2], "size": 9},
        )
    )
    fig.add_trace(go.Scatter(x=rhos, y=_positive([_field(p, "one_minus_z_mean") for p in pts]),
                             name="mean 1 − Z per state", mode="lines+markers",
                             line={"color": _COLORS[4], "dash": "dot"}))  # fmt: skip
    fig.update_xaxes(type="log", title_text="ρ")
    fig.update_yaxes(type="log", title_text="objective gap / TV (R_max = 1)")
    fig.update_layout(title=title, height=420, template="plotly_white", margin={"t": 70})
    return fig


def _atomic(path: str | os.PathLike[str], write: Any) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it over ``path`` (never half-written)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=target.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def save_html(fig: go.Figure, path: str | os.PathLike[str], header_html: str = "") -> Path:
    """Write a self-contained HTML report atomically (temp file + rename).

    ``header_html`` (already escaped) goes at the top of the page, above the figure: a report's findings.
    """
    page = fig.to_html(include_plotlyjs=True, full_html=True).replace("<body>", "<body>" + header_html, 1)
    return _atomic(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


def save_training_report(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike[str],
    *,
    title: str,
    findings: Sequence[str] = (),
    panels: Sequence[tuple[str, str, bool]] = EXPERIMENT_PANELS,
) -> Path:
    """A self-contained HTML report: the findings in words, then the training curves of ``runs``.

    What ``workbench demo`` writes: ``runs`` and ``findings`` come from
    :class:`workbench.experiments.demo.DemoRun` (``.histories()``, ``.findings()``); the default panels
    lead with the clean-eval reward the verdicts read first, then the tail mechanism.
    """
    fig = training_figure(runs, panels, title=title)
    items = "".join(f"<li>{html.escape(f)}</li>" for f in findings)
    header = (
        "<div style='font-family:sans-serif;max-width:70em'>"
        f"<h3>What the runs measured</h3><ul>{items}</ul></div>"
    )
    return save_html(fig, path, header_html=header)


#: Static formats :func:`save_figure` writes through plotly's exporter (kaleido), besides ``.html``.
IMAGE_SUFFIXES = (".svg", ".png", ".pdf")


def save_figure(fig: go.Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as HTML or, by the suffix of ``path``, as a static SVG / PNG / PDF image (atomically).

    Static images go through plotly's own exporter, kaleido, which drives a local Chrome/Chromium (set
    ``BROWSER_PATH=/usr/bin/chromium`` for Debian's). It is optional: ``pip install kaleido``.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".html":
        return save_html(fig, path)
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"cannot write {str(path)!r}: the suffix must be .html or one of {IMAGE_SUFFIXES}")
    try:
        import kaleido  # noqa: F401  (plotly's exporter; imported here only to give a clear error)
    except ImportError as e:
        raise ImportError(
            f"writing {str(path)!r} needs plotly's image exporter: pip install kaleido "
            "(and BROWSER_PATH=/usr/bin/chromium where Chrome is not installed), or write .html instead"
        ) from e
    width = fig.layout.width or 1100  # plotly's 700 px default squeezes the three-column panels
    return _atomic(path, lambda tmp: fig.write_image(tmp, width=width))
