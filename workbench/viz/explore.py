"""Explorers for notebooks 01–05: the static figure of each picture and a slider widget that redraws it.

Each picture has three layers, so the notebooks stay thin and everything is testable without a browser: a
**data function** in :mod:`workbench.analysis` (pure torch, given logits that the notebook sampled with
:mod:`workbench.experiments.real_logits`), a **figure builder** here (``go.Figure``, what a headless run
shows), and an :class:`Explorer`: a ``go.FigureWidget`` plus ipywidgets controls whose callback recomputes
the data and copies the new traces into the widget inside ``fig.batch_update()`` (one redraw per change).

=====================  ==========================================================  =========
explorer               what it shows                                               notebook
=====================  ==========================================================  =========
(static)               Δ between trainer and fp32/bf16/fp16 engines, by p-bin      01
EnvelopeExplorer       ε slider: measured |Δ| under ‖δ‖∞ ≤ ε vs 2ε(1 − p)          02
PositiveModeExplorer   σ slider: Δ of sampled tokens by p, MC vs mode and mean      03
(static)               bias and sequence mismatch vs the horizon T                 04
SafeSetExplorer        ρ slider on real logits: V_S, Z, 1 − Z vs Props 5.4/5.5     05
=====================  ==========================================================  =========
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from workbench import dvp, metrics
from workbench.analysis import (
    PolicySample,
    check_logit_rows,
    envelope_data,
    positive_mode_data,
    rho_sweep,
    safe_set_view,
)
from workbench.theory.prop43 import SIGN_CONVENTION

__all__ = [
    "EnvelopeExplorer",
    "Explorer",
    "FigureSwitcher",
    "PositiveModeExplorer",
    "SafeSetExplorer",
    "accumulation_figure",
    "envelope_figure",
    "mismatch_by_bin_figure",
    "positive_mode_figure",
    "precision_envelope_figure",
    "safe_set_figure",
]

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


# ====================================================================================================
# 01 — where mismatch comes from


def mismatch_by_bin_figure(
    samples: Mapping[str, PolicySample], edges: Sequence[float] = metrics.DEFAULT_P_EDGES
) -> go.Figure:
    """Mean |Δ| of sampled tokens per trainer-probability bin, one line per engine (log y).

    Args:
        samples: ``{engine label: PolicySample}``.
        edges: probability bin edges (``workbench.metrics.delta_by_prob_bin``).

    Returns:
        A two-panel figure: mean |Δ| per bin (left) and the token count per bin (right).
    """
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.65, 0.35],
        subplot_titles=("mean |Δ| by trainer p", "sampled tokens per bin"),
    )
    for i, (name, s) in enumerate(samples.items()):
        bins = metrics.delta_by_prob_bin(s.logp_train, s.logp_infer, s.mask, edges)
        labels = [f"[{b['lo']:.0e}, {b['hi']:.2g})" if b["lo"] > 0 else f"[0, {b['hi']:.0e})" for b in bins]
        color = _COLORS[i % len(_COLORS)]
        y = [b["mean_abs_delta"] if b["count"] > 0 and b["mean_abs_delta"] > 0 else None for b in bins]
        fig.add_trace(
            go.Scatter(
                x=labels, y=y, mode="lines+markers", name=name, legendgroup=name, line={"color": color}
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Bar(
                x=labels,
                y=[b["count"] for b in bins],
                name=name,
                legendgroup=name,
                showlegend=False,
                marker={"color": color},
            ),
            row=1,
            col=2,
        )
    fig.update_yaxes(type="log", title_text="mean |Δ| = |log μ − log π|", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="trainer probability p of the sampled token", row=1, col=1)
    fig.update_layout(template="plotly_white", height=420, barmode="group", margin={"t": 50, "b": 40})
    return fig


# ====================================================================================================
# 02 — Proposition 4.2: the asymmetric envelope


def envelope_figure(data: Mapping[str, Any]) -> go.Figure:
    """|Δ| against 1 − p on log–log axes, with the first-order, exact and attainable bounds of Prop 4.2.

    Args:
        data: the output of :func:`workbench.analysis.envelope_data`.

    Returns:
        A ``go.Figure`` with 4 traces (points, first-order, exact, attainable) in that order.
    """
    x = data["one_minus_p"].clamp_min(1e-12)
    order = torch.argsort(x)
    floor = 1e-12
    eps = data["eps"]
    fig = go.Figure()
    fig.add_trace(
        go.Scattergl(
            x=x.tolist(),
            y=data["abs_delta"].clamp_min(floor).tolist(),
            mode="markers",
            name="measured |Δ| (one point per token)",
            marker={"size": 4, "opacity": 0.45, "color": _COLORS[0]},
        )
    )
    for key, label, color, dash in (
        ("first_order", "2ε(1 − p): first order", _COLORS[1], "solid"),
        ("exact", "2ε(1 − p·e^{−2ε}): exact bound", _COLORS[2], "dash"),
        ("attainable", "largest |Δ| any ‖δ‖∞ ≤ ε can cause", _COLORS[3], "dot"),
    ):
        fig.add_trace(
            go.Scatter(
                x=x[order].tolist(),
                y=data[key][order].clamp_min(floor).tolist(),
                mode="lines",
                name=label,
                line={"color": color, "dash": dash, "width": 2},
            )
        )
    fig.update_xaxes(type="log", title_text="1 − p   (left: confident tokens · right: tail tokens)")
    fig.update_yaxes(type="log", title_text="|Δ| = |log μ(a) − log π(a)|", range=[-9, math.log10(4 * eps)])
    fig.update_layout(
        title=f"Prop 4.2 at ε = {eps:.3g} ({data['kind']} δ): max |Δ| / exact bound = {data['max_ratio_exact']:.3f}",
        template="plotly_white",
        height=460,
        legend={"x": 0.01, "y": 0.01, "xanchor": "left", "yanchor": "bottom"},
        margin={"t": 60, "b": 40},
    )
    return fig


def precision_envelope_figure(data: Mapping[str, Any], title: str = "") -> go.Figure:
    """The ratio |Δ| / 2ε(1 − p) per token (Prop 4.2 says ≤ 1 to first order), against 1 − p."""
    x = data["one_minus_p"].clamp_min(1e-12)
    fig = go.Figure(
        go.Scattergl(
            x=x.tolist(),
            y=data["ratio"].tolist(),
            mode="markers",
            marker={"size": 4, "opacity": 0.45, "color": _COLORS[0]},
            name="|Δ| / 2ε(1 − p)",
        )
    )
    fig.add_hline(y=1.0, line={"color": _COLORS[1], "dash": "dash"}, annotation_text="Prop 4.2 (first order)")
    fig.update_xaxes(type="log", title_text="1 − p")
    fig.update_yaxes(title_text="|Δ| / 2ε_row(1 − p)", rangemode="tozero")
    fig.update_layout(
        title=title or f"real precision gap: ε per row ≈ {data['eps_mean']:.3g} (max {data['eps_max']:.3g})",
        template="plotly_white",
        height=380,
        margin={"t": 60, "b": 40},
    )
    return fig


# ====================================================================================================
# 03 — Proposition 4.3: the positive mode of sampled tail tokens


def _finite_or_none(xs: Sequence[float]) -> list[float | None]:
    """NaN/inf → None: plotly draws a gap, and the figure stays valid JSON (Jupyter rejects NaN in messages)."""
    return [float(x) if math.isfinite(x) else None for x in xs]


def _bin_labels(lo: Sequence[float], hi: Sequence[float]) -> list[str]:
    return [f"[{a:.0e}, {b:.0e})" if a > 0 else f"[0, {b:.0e})" for a, b in zip(lo, hi)]


def positive_mode_figure(data: Mapping[str, Any]) -> go.Figure:
    """Two panels: E[Δ | a sampled] by p-bin with the paper's mode and the second-order mean (left), and Δ of
    tail tokens with and without conditioning on being sampled, the tail's mean and the paper's mode marked
    (right). Δ = log μ − log π throughout (:data:`~workbench.theory.prop43.SIGN_CONVENTION`). Trace order is
    fixed (see :class:`PositiveModeExplorer`)."""
    s2 = data["sigma"] ** 2
    labels = _bin_labels(data["lo"], data["hi"])
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.58, 0.42],
        subplot_titles=(
            "Δ of sampled tokens by trainer probability p",
            f"Δ of tail tokens (p < {data['tail_p']:.0e})",
        ),
    )
    ci = {"type": "data", "array": _finite_or_none(data["cond_ci"]), "visible": True}
    # Monte Carlo curves (dash None: markers on a solid line), each followed by its theory curves (dashed)
    for key, label, color, dash in (
        ("cond", "E[Δ | engine sampled a] (Monte Carlo, 95% CI)", _COLORS[1], None),
        ("theory_mode", "paper's mode σ²[(1−p)(1−p′) + Σ p_k p′_k], p′ ≈ p", _COLORS[4], "dot"),
        ("theory_second_order", "mean σ²(½ − 2p + 3/2·Σp²) (2nd order)", _COLORS[3], "dash"),
        ("uncond", "E[Δ] for any token (Monte Carlo)", _COLORS[0], None),
        ("theory_uncond", "−(σ²/2)(1 − Σp²)", _COLORS[0], "dot"),
    ):
        fig.add_trace(
            go.Scatter(
                x=labels,
                y=_finite_or_none(data[key]),
                error_y=ci if key == "cond" else None,
                mode="lines" if dash else "markers+lines",
                name=label,
                line={"color": color, "dash": dash},
            ),
            row=1,
            col=1,
        )
    for key, label, color in (
        ("hist_cond", "tail token the engine sampled", _COLORS[1]),
        ("hist_uncond", "any tail token", _COLORS[0]),
    ):
        fig.add_trace(
            go.Bar(x=data["hist_centers"], y=data[key], name=label, marker={"color": color}, opacity=0.6),
            row=1,
            col=2,
        )
    for key, label, color in (
        ("tail_cond_mean", "mean", _COLORS[1]),
        ("tail_mode_theory", "paper's mode", _COLORS[4]),
    ):
        if math.isfinite(data[key]):
            fig.add_vline(
                x=data[key], line={"color": color, "dash": "dot"}, annotation_text=label, row=1, col=2
            )
    fig.add_hline(y=0, line={"color": "gray", "width": 1}, row=1, col=1)
    fig.update_yaxes(title_text="Δ = log μ(a) − log π(a)  (paper: Δ′ = −Δ^paper)", row=1, col=1)
    fig.update_xaxes(title_text="bin of p = π(a)", row=1, col=1)
    fig.update_xaxes(title_text="Δ", row=1, col=2)
    fig.update_yaxes(title_text="fraction", row=1, col=2)
    fig.update_layout(
        title=(
            f"Prop 4.3 at σ = {data['sigma']:.3g} (σ² = {s2:.3g}): sampled tail tokens have mean Δ = "
            f"{data['tail_cond_mean']:+.3g} (paper's mode {data['tail_mode_theory']:+.3g}), any tail token "
            f"{data['tail_uncond_mean']:+.3g}<br><sup>{SIGN_CONVENTION}</sup>"
        ),
        template="plotly_white",
        barmode="overlay",
        height=460,
        legend={"orientation": "h", "y": -0.25},
        margin={"t": 70, "b": 40},
    )
    return fig


# ====================================================================================================
# 04 — Theorem 4.1: bias accumulates over the horizon


def accumulation_figure(
    exact_rows: Sequence[Mapping[str, float]] | None = None,
    sampled_rows: Mapping[str, Sequence[Mapping[str, float]]] | None = None,
) -> go.Figure:
    """Theorem 4.1 over the horizon: exact bias vs its bounds (left), sampled-response S_{≤T} (right).

    Args:
        exact_rows: output of :func:`workbench.analysis.exact_bias_vs_horizon` (or ``None``).
        sampled_rows: ``{label: output of sequence_mismatch_vs_length}`` (or ``None``).

    Returns:
        A two-panel figure (log–log on the left).
    """
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            "exact gradient bias vs horizon T (enumerated)",
            "sampled responses: E_μ|1 − e^(−S)| vs T",
        ),
    )
    if exact_rows:
        ts = [r["T"] for r in exact_rows]
        for key, label, color, dash in (
            ("bias_norm", "‖E_μ g − E_π g‖ (measured)", _COLORS[1], "solid"),
            ("bound_weight", "2 sup‖g‖ D_TV", _COLORS[2], "dash"),
            ("bound_t_delta", "2 sup‖g‖ T Δ_max", _COLORS[3], "dash"),
            ("bound_t2", "2√2 R_max T² Δ_max", _COLORS[4], "dot"),
        ):
            fig.add_trace(
                go.Scatter(
                    x=ts,
                    y=[r[key] for r in exact_rows],
                    name=label,
                    mode="lines+markers",
                    line={"color": color, "dash": dash},
                ),
                row=1,
                col=1,
            )
        fig.update_xaxes(type="log", title_text="horizon T", row=1, col=1)
        fig.update_yaxes(type="log", row=1, col=1)
    for i, (label, rows) in enumerate((sampled_rows or {}).items()):
        color = _COLORS[(i + 1) % len(_COLORS)]
        ts = [r["T"] for r in rows]
        for key, what, dash in (
            ("mean_abs_weight", "E|1 − e^(−S)| ≈ 2 D_TV", None),
            ("frac_outside", "share outside seq-MIS [0.5, 2]", "dot"),
        ):
            fig.add_trace(
                go.Scatter(
                    x=ts,
                    y=[r[key] for r in rows],
                    name=f"{label}: {what}",
                    mode="lines",
                    line={"color": color, "dash": dash},
                ),
                row=1,
                col=2,
            )
    fig.update_xaxes(title_text="response length T", row=1, col=2)
    fig.update_layout(
        template="plotly_white", height=460, legend={"orientation": "h", "y": -0.2}, margin={"t": 60, "b": 40}
    )
    return fig


# ====================================================================================================
# 05 — the safe vocabulary


def safe_set_figure(view: Mapping[str, Any], sweep: Sequence[Mapping[str, float]], rho: float) -> go.Figure:
    """Left: one position's sorted vocabulary with the ρ cut; right: 1 − Z over ρ with Props 5.4/5.5's bounds.

    Trace order: kept tokens, pruned tokens, 1 − Z mean, 1 − Z max, |V|ρ, (|V| − |V_S|)ρ max π, T(1 − Z_min),
    the current-ρ marker.
    """
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            f"one position: |V_S| = {view['size']}, 1 − Z = {view['one_minus_z']:.3g}",
            "pruned mass 1 − Z over positions",
        ),
    )
    rank, logp, keep = view["rank"], view["logp"], view["keep"]
    log10 = logp / math.log(10)
    fig.add_trace(
        go.Scattergl(
            x=rank[keep].tolist(),
            y=log10[keep].tolist(),
            mode="markers",
            name="kept: V_S",
            marker={"size": 5, "color": _COLORS[2]},
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scattergl(
            x=rank[~keep].tolist(),
            y=log10[~keep].tolist(),
            mode="markers",
            name="pruned",
            marker={"size": 4, "color": "lightgray"},
        ),
        row=1,
        col=1,
    )
    rhos = [r["rho"] for r in sweep]
    floor = 1e-300
    for key, label, color, dash in (
        ("one_minus_z_mean", "1 − Z, mean over positions", _COLORS[0], "solid"),
        ("one_minus_z_max", "1 − Z, worst position", _COLORS[1], "solid"),
        ("bound_vocab", "Prop 5.4: |V|ρ", _COLORS[3], "dot"),
        ("bound_pruned", "Prop 5.4: (|V| − |V_S|)ρ max π", _COLORS[4], "dash"),
        ("bound_prop55", "Prop 5.5: T(1 − Z_min) (R_max = 1)", _COLORS[5], "dashdot"),
    ):
        fig.add_trace(
            go.Scatter(
                x=rhos,
                y=[max(r[key], floor) for r in sweep],
                mode="lines",
                name=label,
                line={"color": color, "dash": dash},
            ),
            row=1,
            col=2,
        )
    here = min(sweep, key=lambda r: abs(math.log(r["rho"]) - math.log(rho)))
    fig.add_trace(
        go.Scatter(
            x=[rho],
            y=[max(here["one_minus_z_max"], floor)],
            mode="markers",
            name=f"ρ = {rho:.2g}",
            marker={"size": 12, "symbol": "diamond", "color": "black"},
        ),
        row=1,
        col=2,
    )
    fig.update_layout(
        shapes=[
            {
                "type": "line",
                "xref": "x",
                "yref": "y",
                "x0": 1,
                "x1": float(rank[-1]),
                "y0": view["cut"] / math.log(10),
                "y1": view["cut"] / math.log(10),
                "line": {"color": _COLORS[1], "dash": "dash"},
            }
        ],
        template="plotly_white",
        height=460,
        legend={"orientation": "h", "y": -0.22},
        margin={"t": 60, "b": 40},
        title=f"ρ = {rho:.3g} (log ρ = {math.log(rho):.1f}): the dashed line is ρ · max π",
    )
    fig.update_xaxes(type="log", title_text="rank of the token (by trainer probability)", row=1, col=1)
    fig.update_yaxes(title_text="log10 π(a)", row=1, col=1)
    fig.update_xaxes(type="log", title_text="ρ", row=1, col=2)
    fig.update_yaxes(type="log", title_text="1 − Z = D_TV(π, π^mp)", range=[-16, 0.5], row=1, col=2)
    return fig


# ====================================================================================================
# Widgets


class Explorer:
    """A plotly ``FigureWidget`` plus ipywidgets controls; every control change redraws in one batch.

    Subclasses define :meth:`figure_for` (parameters → ``go.Figure``, the same builder the static figure uses)
    and :meth:`_controls`. :meth:`update` recomputes the figure for new parameters and copies each trace's data
    (and the layout's title, shapes and annotations) into the widget inside ``fig.batch_update()``.

    Display the explorer as the last expression of a cell (it renders its widget), and call
    :meth:`static_figure` for the figure at the default parameters (what a headless run records).
    """

    defaults: dict[str, Any]

    def __init__(self, **defaults: Any) -> None:
        self.defaults = dict(defaults)
        self.params = dict(defaults)
        self._static = self.figure_for(**self.defaults)
        self.figure = go.FigureWidget(self._static)
        self.controls = self._controls()
        for name, control in self.controls.items():
            control.observe(self._on_change(name), names="value")
        self._box: Any = None

    # -- subclass API
    def figure_for(self, **params: Any) -> go.Figure:
        """The figure at ``params`` (pure: no widget state)."""
        raise NotImplementedError

    def _controls(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- shared behaviour
    def static_figure(self) -> go.Figure:
        """The figure at the default parameters (a plain ``go.Figure``: renders in any headless run)."""
        return go.Figure(self._static)

    def _on_change(self, name: str) -> Callable[[dict[str, Any]], None]:
        def callback(change: dict[str, Any]) -> None:
            self.update(**{name: change["new"]})

        return callback

    def update(self, **params: Any) -> None:
        """Redraw for new parameter values (others keep their current values)."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; this explorer takes {sorted(self.params)}")
        self.params.update(params)
        new = self.figure_for(**self.params)
        with self.figure.batch_update():
            if [t.type for t in self.figure.data] == [t.type for t in new.data]:
                for old, fresh in zip(self.figure.data, new.data):  # same traces: update in place
                    payload = fresh.to_plotly_json()
                    for key in ("type", "uid"):
                        payload.pop(key, None)
                    old.update(payload, overwrite=True)
            else:  # a different set of traces (e.g. more runs selected): replace them
                self.figure.data = ()
                self.figure.add_traces(list(new.data))
            self.figure.layout.title = new.layout.title
            self.figure.layout.shapes = new.layout.shapes
            self.figure.layout.annotations = new.layout.annotations

    def widget(self) -> Any:
        """The controls above the figure, as one ``ipywidgets.VBox``."""
        import ipywidgets as widgets

        if self._box is None:
            self._box = widgets.VBox([widgets.HBox(list(self.controls.values())), self.figure])
        return self._box

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget()._repr_mimebundle_(**kwargs)


class FigureSwitcher(Explorer):
    """Any figure builder behind ipywidgets controls, redrawn in place — this project's ``interact``.

    ``FigureSwitcher(lambda loss: training_figure(runs[loss]), loss=widgets.ToggleButtons(options=[...]))`` shows
    the controls above one ``FigureWidget`` and rebuilds the figure whenever a control's value changes.
    ``ipywidgets.interact`` would render into an ``Output`` widget instead, whose state nbclient (behind nbmake
    and papermill) sends back on the kernel's shell socket while it is waiting there for the cell's reply; that
    race can stall a headless run until the cell times out (jupyter/nbclient#312).

    Args:
        make_figure: ``(**values) -> go.Figure``, called with one keyword per control.
        **controls: ipywidgets value widgets (anything with ``.value`` and ``.observe``), by parameter name.
    """

    def __init__(self, make_figure: Callable[..., go.Figure], **controls: Any) -> None:
        if not controls:
            raise ValueError(
                "FigureSwitcher needs at least one control, e.g. loss=widgets.ToggleButtons(...)"
            )
        self._make, self._given = make_figure, dict(controls)
        super().__init__(**{name: control.value for name, control in controls.items()})

    def figure_for(self, **params: Any) -> go.Figure:
        return self._make(**params)

    def _controls(self) -> dict[str, Any]:
        return self._given


class EnvelopeExplorer(Explorer):
    """ε slider over Prop 4.2's envelope, with |Δ| measured on the given logit rows (notebook 02).

    Args:
        logits: ``(R, V)`` trainer logit rows (e.g. :func:`workbench.analysis.valid_rows` of a policy sample).
        eps: initial ε.
        kind: ``"vertex"`` or ``"uniform"`` perturbations (:func:`workbench.analysis.envelope_data`).
        seed: seeds δ.
        max_points: tokens drawn.
    """

    def __init__(
        self,
        logits: torch.Tensor,
        eps: float = 0.1,
        *,
        kind: str = "vertex",
        seed: int = 0,
        max_points: int = 3000,
    ) -> None:
        self.logits = check_logit_rows("logits", logits)
        self.seed, self.max_points = seed, max_points
        super().__init__(eps=eps, kind=kind)

    def figure_for(self, eps: float, kind: str) -> go.Figure:
        return envelope_figure(
            envelope_data(self.logits, eps, kind=kind, seed=self.seed, max_points=self.max_points)
        )

    def _controls(self) -> dict[str, Any]:
        import ipywidgets as widgets

        return {
            "eps": widgets.FloatLogSlider(
                value=self.defaults["eps"],
                base=10,
                min=-3,
                max=0.3,
                step=0.05,
                description="ε",
                continuous_update=False,
                readout_format=".3g",
            ),
            "kind": widgets.ToggleButtons(
                options=["vertex", "uniform"], value=self.defaults["kind"], description="δ"
            ),
        }


class PositiveModeExplorer(Explorer):
    """σ slider for Prop 4.3's positive mode: Monte Carlo vs theory on the given logit rows (notebook 03).

    Args:
        logits: ``(R, V)`` trainer logit rows.
        sigma: initial noise standard deviation.
        num_draws: Monte Carlo draws per row (per redraw).
        seed: seeds the noise.
        tail_p: tail threshold of the histograms.
    """

    def __init__(
        self,
        logits: torch.Tensor,
        sigma: float = 0.5,
        *,
        num_draws: int = 128,
        seed: int = 0,
        tail_p: float = 1e-3,
    ) -> None:
        self.logits = check_logit_rows("logits", logits)
        self.num_draws, self.seed, self.tail_p = num_draws, seed, tail_p
        super().__init__(sigma=sigma)

    def figure_for(self, sigma: float) -> go.Figure:
        return positive_mode_figure(
            positive_mode_data(
                self.logits, sigma, num_draws=self.num_draws, seed=self.seed, tail_p=self.tail_p
            )
        )

    def _controls(self) -> dict[str, Any]:
        import ipywidgets as widgets

        return {
            "sigma": widgets.FloatSlider(
                value=self.defaults["sigma"],
                min=0.05,
                max=1.5,
                step=0.05,
                description="σ",
                continuous_update=False,
            ),
        }


class SafeSetExplorer(Explorer):
    """ρ slider on real logits: one position's safe set and the pruned mass over all positions (notebook 05).

    Args:
        logits: ``(M, V)`` trainer logit rows.
        rho: initial ρ (default the paper's e^-13).
        position: initial row shown on the left.
        horizon: response length T for Prop 5.5's bound.
        rhos: the ρ grid of the right panel.
    """

    def __init__(
        self,
        logits: torch.Tensor,
        rho: float = dvp.DEFAULT_RHO,
        *,
        position: int = 0,
        horizon: int = 1,
        rhos: Sequence[float] | None = None,
    ) -> None:
        self.logits = check_logit_rows("logits", logits)
        if not 0 <= position < self.logits.shape[0]:
            raise ValueError(f"position={position} must be in [0, {self.logits.shape[0]})")
        grid = list(rhos) if rhos is not None else [10.0**k for k in range(-16, 1)] + [dvp.DEFAULT_RHO]
        self.sweep = rho_sweep(self.logits, sorted(grid), horizon=horizon)
        super().__init__(rho=rho, position=position)

    def figure_for(self, rho: float, position: int) -> go.Figure:
        return safe_set_figure(safe_set_view(self.logits[position], rho), self.sweep, rho)

    def _controls(self) -> dict[str, Any]:
        import ipywidgets as widgets

        return {
            "rho": widgets.FloatLogSlider(
                value=self.defaults["rho"],
                base=10,
                min=-16,
                max=0,
                step=0.25,
                description="ρ",
                continuous_update=False,
                readout_format=".2g",
            ),
            "position": widgets.IntSlider(
                value=self.defaults["position"],
                min=0,
                max=self.logits.shape[0] - 1,
                description="position",
                continuous_update=False,
            ),
        }
