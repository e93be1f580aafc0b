"""The one-page report of ``workbench diagnose``, built from the data of ``diagnosis.json``.

:func:`diagnose_figure` draws six panels (Δ by trainer-probability bin against Prop 4.2's envelope, the
signed mean Δ per bin, Δ against log p, S(y) against length, the ρ sweep, batch invariance);
:func:`diagnose_report_html` wraps it in a self-contained page that opens with the verdict (recommended
ρ, naive-trainer metrics, the sampled-tail signature) and says how to read each panel, so it stands
without the lessons. Both take the mapping ``Diagnosis.to_dict()`` returns (or the parsed JSON file); this
module never runs an engine or an experiment.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from workbench.theory.prop42 import prop42_envelope

__all__ = ["diagnose_figure", "diagnose_report_html"]

_PANELS = (
    "|Δ| by trainer probability vs Prop 4.2's envelope",
    "signed mean Δ per bin (95 % CI)",
    "Δ of sampled tokens vs log p (sample)",
    "sequence log-ratio S(y) vs response length",
    "ρ sweep: what pruning removes and what it may cost",
    "batch invariance: |log μ(bs 1) − log μ(full batch)|",
)

_HOW_TO_READ = (
    "Δ = log μ − log π on sampled tokens (μ the engine, π the fp32 trainer): Δ > 0 means the engine "
    "over-weights the token. Prop 4.2 bounds |Δ| by 2ε(1 − p): confident tokens (right) should have "
    "tiny |Δ|, tail tokens (left) the largest.",
    "Prop 4.3 (reconstructed) predicts a positive Δ for sampled tail tokens: bars above 0 on the left, "
    "with intervals that exclude 0, are the signature a naive trainer is biased by.",
    "Each point is one sampled token; the dashed curves are ±2ε(1 − p) with ε fitted to the data.",
    "Theorem 4.1: the per-sequence log-ratio log μ(y)/π(y) accumulates over the response, so longer "
    "responses drift further if tail tokens keep being sampled.",
    "For each ρ: 1 − Z_max and Prop 5.5's bound T(1 − Z_min) (the objective bias DVP may add, R_max = 1), "
    "the rate of sampled tokens outside the trainer's safe set and their share of Σ|Δ| (what DVP removes), "
    "the boundary-token rate and 1 − safe-set overlap (engines whose logits are recorded). The dotted "
    "line is the recommended ρ.",
    "The engine's weights re-score the same responses alone and inside the padded batch: a non-zero "
    "difference is mismatch that comes from batching alone (common in bf16 kernels).",
)


def _num(x: Any) -> float | None:
    """A finite float, or None (JSON null, nan)."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _pos(x: Any) -> float | None:
    """A finite positive float, or None (for log axes)."""
    v = _num(x)
    return v if v is not None and v > 0 else None


def _bin_labels(bins: Sequence[Mapping[str, Any]]) -> list[str]:
    return [f"[{b['lo']:.0e}, {b['hi']:.0e})" if b["lo"] > 0 else f"[0, {b['hi']:.0e})" for b in bins]


def _cloud(points: Sequence[Sequence[float]], name: str, color: str) -> go.Scattergl:
    """A point cloud of ``(x, y)`` pairs."""
    return go.Scattergl(
        x=[a for a, _ in points],
        y=[b for _, b in points],
        mode="markers",
        marker={"size": 3, "color": color, "opacity": 0.4},
        name=name,
        showlegend=False,
    )


def diagnose_figure(data: Mapping[str, Any]) -> go.Figure:
    """Six panels of one diagnosis (module docstring).

    Args:
        data: ``Diagnosis.to_dict()`` or the parsed ``diagnosis.json``.

    Returns:
        A plotly figure (3 rows × 2 columns).
    """
    fig = make_subplots(
        rows=3, cols=2, subplot_titles=_PANELS, vertical_spacing=0.09, horizontal_spacing=0.08
    )
    bins = data["bins"]
    labels = _bin_labels(bins)
    eps = data["envelope"]["eps_fit"]

    # 1. |Δ| by bin against the envelope
    for key, name, color in (
        ("mean_abs_delta", "mean |Δ|", "#1f77b4"),
        ("max_abs_delta", "max |Δ|", "#d62728"),
        ("envelope", f"2ε̂(1 − p_lo), ε̂ = {eps:.3g}" if _num(eps) else "envelope", "#7f7f7f"),
    ):
        fig.add_trace(
            go.Scatter(
                x=labels,
                y=[_pos(b.get(key)) for b in bins],
                name=name,
                mode="lines+markers",
                line={"color": color, "dash": "dash" if key == "envelope" else "solid"},
                legendgroup="bins",
            ),
            row=1,
            col=1,
        )
    fig.update_yaxes(type="log", title_text="|Δ| (nats)", row=1, col=1)

    # 2. signed mean with CI
    means = [_num(b.get("mean_delta")) for b in bins]
    fig.add_trace(
        go.Bar(
            x=labels,
            y=means,
            name="mean Δ",
            marker_color=["#d62728" if (m or 0) > 0 else "#1f77b4" for m in means],
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [(_num(b.get("ci_hi")) or m or 0) - (m or 0) for b, m in zip(bins, means)],
                "arrayminus": [(m or 0) - (_num(b.get("ci_lo")) or m or 0) for b, m in zip(bins, means)],
            },
            text=[f"n={int(b['count'])}" for b in bins],
            showlegend=False,
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(title_text="mean Δ (nats)", row=1, col=2)

    # 3. Δ vs log p with ±2ε(1 − p)
    pts = data.get("deltas") or []
    fig.add_trace(_cloud(pts, "sampled tokens", "#1f77b4"), row=2, col=1)
    if _num(eps) and pts:
        grid = torch.linspace(min(a for a, _ in pts), 0.0, 81, dtype=torch.float64)  # log p
        env = prop42_envelope(grid, eps, exact=False).tolist()
        grid = grid.tolist()
        for sign in (1, -1):
            fig.add_trace(
                go.Scatter(
                    x=grid,
                    y=[sign * e for e in env],
                    mode="lines",
                    line={"color": "#7f7f7f", "dash": "dash"},
                    showlegend=False,
                ),
                row=2,
                col=1,
            )
    fig.update_xaxes(title_text="log π(token)", row=2, col=1)
    fig.update_yaxes(title_text="Δ = log μ − log π", row=2, col=1)

    # 4. S(y) vs length
    seq = data["sequence"]
    fig.add_trace(_cloud(seq["points"], "responses", "#9467bd"), row=2, col=2)
    fig.add_trace(
        go.Scatter(
            x=[r["length"] for r in seq["by_length"]],
            y=[r["mean_log_ratio"] for r in seq["by_length"]],
            mode="lines+markers",
            line={"color": "#2ca02c"},
            name="mean S per length",
        ),
        row=2,
        col=2,
    )
    fig.update_xaxes(title_text="response length (tokens)", row=2, col=2)
    fig.update_yaxes(title_text="S(y) = log μ(y)/π(y)", row=2, col=2)

    # 5. ρ sweep
    sweep = data["rho_sweep"]
    rhos = [r["rho"] for r in sweep]
    for key, name, color in (
        ("one_minus_z_max", "1 − Z_min", "#ff7f0e"),
        ("bias_bound", "Prop 5.5 bound T(1 − Z_min)", "#d62728"),
        ("outside_rate", "sampled tokens outside V_S", "#1f77b4"),
        ("mismatch_removed", "share of Σ|Δ| removed", "#2ca02c"),
        ("boundary_rate", "boundary-token rate", "#8c564b"),
    ):
        fig.add_trace(
            go.Scatter(
                x=rhos,
                y=[_pos(r.get(key)) for r in sweep],
                name=name,
                mode="lines+markers",
                line={"color": color},
            ),
            row=3,
            col=1,
        )
    fig.add_trace(
        go.Scatter(
            x=rhos,
            y=[
                _pos(1 - r["overlap_mean"]) if _num(r.get("overlap_mean")) is not None else None
                for r in sweep
            ],
            name="1 − safe-set overlap",
            mode="lines+markers",
            line={"color": "#e377c2"},
        ),
        row=3,
        col=1,
    )
    best = _num(data["recommendation"].get("rho"))
    if best:
        fig.add_vline(x=math.log10(best), line_dash="dot", line_color="#2ca02c", row=3, col=1)
    fig.update_xaxes(type="log", title_text="ρ", row=3, col=1)
    fig.update_yaxes(type="log", row=3, col=1)

    # 6. batch invariance
    inv = data["batch_invariance"]
    if inv.get("available"):
        ib = inv["bins"]
        for key, name, color in (("mean_abs_diff", "mean", "#17becf"), ("max_abs_diff", "max", "#7f7f7f")):
            fig.add_trace(
                go.Bar(
                    x=_bin_labels(ib),
                    y=[_pos(b.get(key)) for b in ib],
                    name=f"{name} |diff|",
                    marker_color=color,
                ),
                row=3,
                col=2,
            )
        fig.update_yaxes(type="log", title_text="nats", row=3, col=2)
    else:
        fig.add_annotation(
            text=f"not measured: {inv.get('reason', '')}",
            showarrow=False,
            xref="x6 domain",
            yref="y6 domain",
            x=0.5,
            y=0.5,
        )
    for col in (1, 2):
        fig.update_xaxes(title_text="trainer probability p", row=1, col=col)
    fig.update_xaxes(title_text="trainer probability p", row=3, col=2)
    fig.update_layout(height=1250, template="plotly_white", barmode="group", margin={"t": 60})
    return fig


def _fmt(x: Any) -> str:
    v = _num(x)
    return "—" if v is None else f"{v:.3g}"


def _tail_sentence(name: str, t: Mapping[str, Any]) -> str:
    if not t.get("count"):
        return f"{name}: no sampled token."
    return (
        f"{name}: {int(t['count'])} tokens, mode Δ {_fmt(t['mode'])} [{_fmt(t['mode_ci_lo'])}, {_fmt(t['mode_ci_hi'])}], "
        f"mean Δ {_fmt(t['mean'])} [{_fmt(t['mean_ci_lo'])}, {_fmt(t['mean_ci_hi'])}], "
        f"{_fmt(t['frac_positive'])} positive."
    )


def diagnose_report_html(data: Mapping[str, Any]) -> str:
    """A self-contained HTML page: the verdict, the naive-trainer metrics, the figure, how to read it.

    Args:
        data: ``Diagnosis.to_dict()`` or the parsed ``diagnosis.json``.

    Returns:
        The page (plotly.js inlined, so it opens offline).
    """
    cfg = data["config"]
    naive = data["naive"]
    rec = data["recommendation"]
    inv = data["batch_invariance"]
    env = data["envelope"]
    measured = env.get("measured") or {}
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(k)}</td><td>{_fmt(naive.get(k))}</td><td>{esc(why)}</td></tr>"
        for k, why in (
            ("k1", "mean Δ; KL(μ‖π) estimate (healthy dense models ≈ 1e-3)"),
            ("k3", "mean(e^u − u − 1), u = −Δ; low-variance KL (healthy 1e-5 … 1e-3)"),
            ("chi2_token", "mean r² − 1, r = π/μ: variance of token-level IS"),
            ("ess", "effective sample fraction of token IS (want > 0.5)"),
            ("max_abs_delta", "largest |Δ| of a sampled token"),
            ("mean_abs_delta", "mean |Δ|"),
        )
    )
    invariance = (
        f"max |diff| {_fmt(inv['max_abs_diff'])}, mean {_fmt(inv['mean_abs_diff'])}, "
        f"{_fmt(inv['frac_changed'])} of {inv['n_tokens']} token log-probs changed "
        f"({inv['rows']} responses alone vs a batch of {inv['batch_size']})"
        if inv.get("available")
        else f"not measured ({inv.get('reason', '')})"
    )
    envelope = f"ε̂ fitted to the data {_fmt(env.get('eps_fit'))}" + (
        f"; measured ε(s) median {_fmt(measured.get('eps_median'))}, exact bound 2ε(1 − p e^(−2ε)) holds for "
        f"{_fmt(measured.get('frac_within_exact'))} of tokens"
        if measured
        else ""
    )
    how = "".join(f"<li><b>{esc(t)}</b>: {esc(h)}</li>" for t, h in zip(_PANELS, _HOW_TO_READ))
    figure = diagnose_figure(data).to_html(full_html=False, include_plotlyjs=True)
    title = f"workbench diagnose: {cfg['model']} on {data['engine']}"
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}}
td,th{{padding:2px 10px;text-align:left}} .rec{{background:#eef7ee;padding:.6em;border-left:4px solid #2ca02c}}</style>
</head><body>
<h1>{esc(title)}</h1>
<p>{data["n_trajectories"]} responses, {data["n_tokens"]} sampled tokens, horizon T = {data["horizon"]},
temperature {cfg["temperature"]}, seed {data["seed"]}, {data["wall_s"]:.1f} s. Sign convention: Δ = log μ − log π
(μ the engine, π the fp32 trainer); Δ &gt; 0 means the engine over-weights the token.</p>
<p class="rec"><b>Recommended ρ = {_fmt(rec["rho"])}.</b> {esc(rec["reason"])}</p>
<h2>What a naive trainer would see</h2>
<table><tr><th>metric</th><th>value</th><th>meaning</th></tr>{rows}</table>
<h2>Sampled-tail signature (Prop 4.3, mode and mean with 95 % intervals)</h2>
<p>{esc(_tail_sentence("p < 1e-3", data["tail"]["lowp"]))}<br>
{esc(_tail_sentence("outside the e^-13 safe set", data["tail"]["e13"]))}</p>
<h2>Envelope and batch invariance</h2>
<p>Prop 4.2: {esc(envelope)}.<br>S(y) grows by {_fmt(data["sequence"]["slope"])} nats per response token
(least squares).<br>Batch invariance: {esc(invariance)}.</p>
{figure}
<h2>How to read the panels</h2><ul>{how}</ul>
<p>Versions: {esc(", ".join(f"{k} {v}" for k, v in data["versions"].items()))}.</p>
</body></html>
"""
