"""Explorers for notebooks 01–05: the data behind each picture, the static figure, and a slider widget.

Every explorer has three layers, so the notebooks stay thin and everything is testable without a browser:

1. a **data function** (pure torch, tested): e.g. :func:`envelope_data` measures Δ under a perturbation of
   size ε and evaluates Prop 4.2's bounds at the same tokens;
2. a **figure builder** (plotly ``go.Figure``): e.g. :func:`envelope_figure` — what a headless run shows;
3. an :class:`Explorer` — a ``go.FigureWidget`` plus ipywidgets controls whose callback recomputes the data
   and copies the new traces into the widget inside ``fig.batch_update()`` (one redraw per change).
   ``explorer.static_figure()`` is the figure at the default parameters.

=====================  ==========================================================  =========
explorer               what it shows                                               notebook
=====================  ==========================================================  =========
(static)               Δ between trainer and fp32/bf16/fp16 engines, by p-bin      01
EnvelopeExplorer       ε slider: measured |Δ| under ‖δ‖∞ ≤ ε vs 2ε(1 − p)          02
PositiveModeExplorer   σ slider: Δ of sampled tokens by p, MC vs mode and mean      03
(static)               bias and sequence mismatch vs the horizon T                 04
SafeSetExplorer        ρ slider on real logits: V_S, Z, 1 − Z vs Props 5.4/5.5     05
=====================  ==========================================================  =========

The sampling helpers (:func:`sample_policy`, :func:`trainer_logits`, :func:`precision_logits`) produce the
"real logits" the explorers run on: a policy's responses, sampled by a :class:`~workbench.engines.TorchEngine`,
scored by the trainer's forward with the same position-id convention as :class:`~workbench.trainer.RLOOTrainer`.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from workbench import dvp, metrics
from workbench.theory.prop42 import logit_error, prop42_envelope
from workbench.theory.prop43 import SIGN_CONVENTION, mode_mismatch, second_order_conditional_mean

__all__ = [
    "EnvelopeExplorer",
    "Explorer",
    "FigureSwitcher",
    "PolicySample",
    "PositiveModeExplorer",
    "SafeSetExplorer",
    "accumulation_figure",
    "envelope_data",
    "envelope_figure",
    "exact_bias_vs_horizon",
    "mismatch_by_bin_figure",
    "mismatch_summary",
    "positive_mode_data",
    "positive_mode_figure",
    "precision_envelope_data",
    "precision_envelope_figure",
    "precision_logits",
    "rho_sweep",
    "safe_set_figure",
    "safe_set_view",
    "sample_policy",
    "sequence_mismatch_vs_length",
    "tail_draws",
    "trainer_logits",
    "valid_rows",
]

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ====================================================================================================
# Real logits: sample a policy, score it with the trainer


@dataclass
class PolicySample:
    """A batch of sampled responses and both policies' view of them.

    ``Δ = logp_infer − logp_train`` on every valid sampled token is the mismatch the paper studies.
    """

    rollout: Any
    """The engine's :class:`~workbench.engines.Rollout`."""
    logits: torch.Tensor
    """``(N, T, V)`` fp32 trainer logits at the response positions (the distribution each token was drawn at)."""
    logp_train: torch.Tensor
    """``(N, T)`` log π(token) of the trainer (full vocabulary, fp32 forward)."""
    logp_infer: torch.Tensor
    """``(N, T)`` log μ(token) as the engine sampled it."""
    mask: torch.Tensor
    """``(N, T)`` bool, valid response tokens."""
    config: dict[str, Any] = field(default_factory=dict)
    """How it was made (engine dtype, perturbation, ρ, seed, …)."""

    @property
    def tokens(self) -> torch.Tensor:
        """``(N, T)`` the sampled token ids."""
        return self.rollout.tokens

    @property
    def delta(self) -> torch.Tensor:
        """``(N, T)`` Δ = log μ − log π (0 where masked)."""
        return torch.where(self.mask, self.logp_infer - self.logp_train, 0.0)


def _check_dtype_name(name: str, value: str) -> torch.dtype:
    if value not in _DTYPES:
        raise ValueError(f"{name}={value!r} must be one of {tuple(_DTYPES)}")
    return _DTYPES[value]


@torch.no_grad()
def trainer_logits(model: torch.nn.Module, rollout: Any) -> torch.Tensor:
    """The trainer's logits for each response position: ``(N, T, V)`` fp32.

    Same convention as :class:`~workbench.trainer.RLOOTrainer`: one full forward over ``rollout.sequences``
    with position ids ``cumsum(attention_mask) − 1``, logits shifted by one (position ``P − 1 + t`` predicts
    response token ``t``). An fp32 engine reproduces these log-probs to ~1e-6.

    Args:
        model: the trainer's causal LM.
        rollout: a :class:`~workbench.engines.Rollout`.

    Returns:
        ``(N, T, V)`` float32 logits.
    """
    from workbench.engines import position_ids

    attn = rollout.attention_mask
    out = model(input_ids=rollout.sequences, attention_mask=attn, position_ids=position_ids(attn))
    p = rollout.prompt_len
    return out.logits[:, p - 1 : -1].float()  # (N, T, V)


@torch.no_grad()
def precision_logits(model: torch.nn.Module, rollout: Any, dtype: str) -> torch.Tensor:
    """Logits of a copy of ``model`` whose *weights* are rounded to ``dtype``, as an engine holds them.

    Args:
        model: the trainer's model (not modified).
        rollout: the sequences to score.
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    Returns:
        ``(N, T, V)`` float32 logits of the rounded copy (full forward, no KV cache).
    """
    target = _check_dtype_name("dtype", dtype)
    clone = copy.deepcopy(model).to(target).eval()
    return trainer_logits(clone, rollout)


def sample_policy(
    model: torch.nn.Module,
    tokenizer: Any,
    task: str = "addition",
    *,
    task_kwargs: Mapping[str, Any] | None = None,
    num_prompts: int = 16,
    n: int = 4,
    max_tokens: int | None = None,
    engine: str = "torch",
    engine_dtype: str = "fp32",
    perturbation: str | None = None,
    rho: float | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> PolicySample:
    """Sample responses with a rollout engine and score them with the trainer.

    Args:
        model: the trainer's policy (fp32); the engine rounds its own copy to ``engine_dtype``.
        tokenizer: the policy's tokenizer (eos/pad ids).
        task: task name (``workbench.tasks.TASKS``) that supplies the prompts.
        task_kwargs: keyword arguments of the task.
        num_prompts: distinct prompts (drawn with ``random.Random(seed)``).
        n: samples per prompt.
        max_tokens: response budget (default: the task's ``max_new_tokens``).
        engine: ``"torch"`` (:class:`~workbench.engines.TorchEngine`, emulated) or ``"vllm"`` (real vLLM,
            started on a saved copy of ``model``: ~15 s), built by :func:`workbench.engines.make_engine`.
        engine_dtype: engine weight precision.
        perturbation: engine logit perturbation spec (``"gaussian:0.3"``, …) or ``None``.
        rho: min-p threshold of the engine (``None``: full vocabulary).
        temperature: sampling temperature (the trainer's log-probs use the same).
        seed: seeds prompts, sampling and perturbation noise.

    Returns:
        A :class:`PolicySample`.
    """
    from workbench import engines, models, tasks

    _check_dtype_name("engine_dtype", engine_dtype)
    the_task = tasks.make_task(task, **dict(task_kwargs or {}))
    problems = the_task.sample(num_prompts, random.Random(seed))
    prompts = [models.encode_prompt(tokenizer, p.prompt) for p in problems]
    sampler = engines.make_engine(
        engine, model, tokenizer, dtype=engine_dtype, perturbation=engines.make_perturbation(perturbation)
    )
    rollout = sampler.generate(
        prompts,
        n=n,
        max_tokens=max_tokens or the_task.max_new_tokens,
        rho=rho,
        temperature=temperature,
        seed=seed,
    )
    logits = trainer_logits(model, rollout) / temperature  # (N, T, V)
    logp_train = dvp.token_logprobs(logits, rollout.tokens)  # (N, T) full-vocabulary log π
    return PolicySample(
        rollout=rollout,
        logits=logits,
        logp_train=logp_train,
        logp_infer=rollout.logprobs,
        mask=rollout.mask,
        config={
            "task": task,
            "engine": engine,
            "engine_dtype": engine_dtype,
            "perturbation": perturbation,
            "rho": rho,
            "temperature": temperature,
            "seed": seed,
            "num_prompts": num_prompts,
            "n": n,
        },
    )


def valid_rows(sample: PolicySample) -> torch.Tensor:
    """The trainer logits of every valid response position, ``(M, V)`` (``M = mask.sum()``)."""
    return sample.logits[sample.mask]


# ====================================================================================================
# 01 — where mismatch comes from


def mismatch_summary(samples: Mapping[str, PolicySample]) -> list[dict[str, float | str]]:
    """One row per engine: tokens, mean and max |Δ|, k1, k3 (``workbench.metrics.mismatch_metrics``).

    Args:
        samples: ``{engine label: PolicySample}``.

    Returns:
        Rows ``{"engine", "tokens", "mean_abs_delta", "max_abs_delta", "k1", "k3"}``.
    """
    rows: list[dict[str, float | str]] = []
    for name, s in samples.items():
        m = metrics.mismatch_metrics(s.logp_train, s.logp_infer, s.mask)
        rows.append(
            {
                "engine": name,
                "tokens": float(s.mask.sum()),
                "mean_abs_delta": m["mismatch/mean_abs_delta"],
                "max_abs_delta": m["mismatch/max_abs_delta"],
                "k1": m["mismatch/k1"],
                "k3": m["mismatch/k3"],
            }
        )
    return rows


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


def _check_logits_2d(name: str, logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"{name} must be a float tensor (R, V) of logit rows, got {got}; use valid_rows(sample)"
        )
    if logits.shape[0] < 1 or logits.shape[1] < 2:
        raise ValueError(f"{name} has shape {tuple(logits.shape)}; need at least one row and two tokens")
    return logits


def _check_positive(name: str, value: float, hi: float | None = None) -> float:
    ok = (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        rng = f"(0, {hi}]" if hi is not None else "(0, inf)"
        raise ValueError(f"{name}={value!r} must be a finite number in {rng}")
    return float(value)


def _subsample(
    p: torch.Tensor, max_points: int, generator: torch.Generator, keep_above: float = 1e-2
) -> torch.Tensor:
    """Indices of at most ``max_points`` entries of ``p``: every ``p ≥ keep_above`` (rare, confident tokens)
    plus a uniform random subset of the rest."""
    head = (p >= keep_above).nonzero().flatten()
    rest = (p < keep_above).nonzero().flatten()
    room = max(0, max_points - head.numel())
    if rest.numel() > room:
        rest = rest[torch.randperm(rest.numel(), generator=generator)[:room]]
    return torch.cat([head[:max_points], rest])


def envelope_data(
    logits: torch.Tensor,
    eps: float,
    *,
    kind: str = "vertex",
    seed: int = 0,
    max_points: int = 4000,
) -> dict[str, torch.Tensor | float | str]:
    """Measured ``|Δ_a|`` for every token under a perturbation ``‖δ‖_∞ ≤ ε``, beside Prop 4.2's bounds.

    ``δ`` is drawn per row: ``"vertex"`` puts every logit at ``±ε`` (random signs, where the bound is nearly
    attained), ``"uniform"`` draws each logit uniformly in ``[−ε, ε]``. ``Δ_a = log softmax(z + δ)_a −
    log softmax(z)_a`` for every token of every row (via :func:`workbench.dvp.token_logprobs`'s reference
    math, fp64), then at most ``max_points`` tokens are kept for plotting (all confident ones).

    Args:
        logits: ``(R, V)`` trainer logit rows.
        eps: the perturbation size ε > 0.
        kind: ``"vertex"`` or ``"uniform"``.
        seed: seeds δ and the subsample.
        max_points: tokens returned for plotting.

    Returns:
        ``p``, ``one_minus_p``, ``abs_delta``, ``first_order`` (2ε(1 − p)), ``exact`` (2ε(1 − p e^{−2ε})),
        ``attainable`` (the largest |Δ_a| any ``‖δ‖∞ ≤ ε`` can cause, ``2ε + log(1 − p(1 − e^{−2ε}))``, reached by
        ``δ_a = −ε`` and ``δ_b = +ε`` elsewhere) for the kept
        tokens, plus ``eps``, ``kind``, ``max_ratio_exact`` (max |Δ| / exact bound over *all* tokens) and
        ``max_ratio_first_order``.

    >>> d = envelope_data(torch.tensor([[4.0, 0.0, -2.0, -9.0]]), 0.1)
    >>> bool((d["abs_delta"] <= d["exact"] + 1e-12).all()), d["max_ratio_exact"] <= 1.0
    (True, True)
    """
    z = _check_logits_2d("logits", logits).double()  # (R, V)
    eps = _check_positive("eps", eps)
    if kind not in ("vertex", "uniform"):
        raise ValueError(f"kind={kind!r} must be 'vertex' (δ = ±ε) or 'uniform' (δ ~ U[−ε, ε])")
    g = torch.Generator().manual_seed(seed)
    if kind == "vertex":
        delta = eps * (torch.randint(0, 2, z.shape, generator=g, dtype=torch.float64) * 2 - 1)  # (R, V)
    else:
        delta = eps * (2 * torch.rand(z.shape, generator=g, dtype=torch.float64) - 1)
    lp = torch.log_softmax(z, -1)  # (R, V)
    abs_delta = (torch.log_softmax(z + delta, -1) - lp).abs()  # (R, V)
    p = lp.exp()
    one_minus_p = -torch.expm1(lp)  # accurate near p = 1
    first = prop42_envelope(lp, eps, exact=False)
    exact = prop42_envelope(lp, eps)
    # the largest |Δ_a| over the box: δ_a = −ε, every other δ_b = +ε (pushing a down beats pushing it up)
    attainable = 2 * eps + torch.log1p(-p * -math.expm1(-2 * eps))
    meaningful = first > 1e-12
    idx = _subsample(p.flatten(), max_points, g)
    flat = {
        k: v.flatten()[idx]
        for k, v in dict(
            p=p,
            one_minus_p=one_minus_p,
            abs_delta=abs_delta,
            first_order=first,
            exact=exact,
            attainable=attainable,
        ).items()
    }
    return {
        **flat,
        "eps": eps,
        "kind": kind,
        "max_ratio_exact": float((abs_delta / exact).max()),
        "max_ratio_first_order": float((abs_delta[meaningful] / first[meaningful]).max()),
    }


def envelope_figure(data: Mapping[str, Any]) -> go.Figure:
    """|Δ| against 1 − p on log–log axes, with the first-order, exact and attainable bounds of Prop 4.2.

    Args:
        data: the output of :func:`envelope_data`.

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


def precision_envelope_data(
    logits_train: torch.Tensor, logits_engine: torch.Tensor, *, seed: int = 0, max_points: int = 4000
) -> dict[str, torch.Tensor | float]:
    """Prop 4.2 on a real precision gap: each row's own ε is :func:`workbench.theory.logit_error`, half the
    range of ``z_engine − z_train`` (softmax ignores a constant shift, so ``max |δ|`` would overstate it).

    Args:
        logits_train: ``(R, V)`` trainer logits.
        logits_engine: ``(R, V)`` logits of the same positions from the low-precision copy.
        seed: seeds the plotting subsample.
        max_points: tokens returned for plotting.

    Returns:
        ``one_minus_p``, ``abs_delta``, ``ratio`` (= |Δ| / (2ε_row(1 − p)), ≤ 1 to first order) for the kept
        tokens; ``eps_mean``, ``eps_max`` over rows; ``max_ratio`` over all tokens with a meaningful bound.
    """
    zt = _check_logits_2d("logits_train", logits_train).double()
    ze = _check_logits_2d("logits_engine", logits_engine).double()
    eps_row = logit_error(zt, ze)[:, None]  # (R, 1)
    lp = torch.log_softmax(zt, -1)
    abs_delta = (torch.log_softmax(ze, -1) - lp).abs()  # (R, V)
    one_minus_p = -torch.expm1(lp)
    bound = prop42_envelope(lp, eps_row, exact=False)  # (R, V)
    ratio = abs_delta / bound.clamp_min(1e-300)
    meaningful = bound > 1e-9
    g = torch.Generator().manual_seed(seed)
    idx = _subsample(lp.exp().flatten(), max_points, g)
    return {
        "one_minus_p": one_minus_p.flatten()[idx],
        "abs_delta": abs_delta.flatten()[idx],
        "ratio": ratio.flatten()[idx],
        "eps_mean": float(eps_row.mean()),
        "eps_max": float(eps_row.max()),
        "max_ratio": float(ratio[meaningful].max()) if bool(meaningful.any()) else float("nan"),
    }


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


def positive_mode_data(
    logits: torch.Tensor,
    sigma: float,
    *,
    num_draws: int = 256,
    seed: int = 0,
    edges: Sequence[float] = (0.0, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0),
    tail_p: float = 1e-3,
    hist_bins: int = 60,
) -> dict[str, Any]:
    """Monte Carlo of Prop 4.3 on logit rows: ``E[Δ_a | a sampled]`` by trainer probability, vs the paper's mode.

    Δ is in our sign convention, :data:`workbench.theory.prop43.SIGN_CONVENTION` (``log μ − log π``, the
    paper's ``Δ'``; the paper's own Δ has the opposite sign). For each row ``z`` and each of ``num_draws`` draws ``δ ~ N(0, σ²I)``, every token ``a`` is weighted by
    ``μ_a(δ) = softmax(z + δ)_a`` — the probability the engine samples it — so the conditional mean
    ``E[Δ_a | a sampled] = E_δ[μ_a Δ_a] / E_δ[μ_a]`` is estimated from all tokens at once (no sampling noise in
    ``a``, so rare tail tokens get precise estimates too). Per bin of ``p = π(a)``:

    - ``cond``: the conditional mean over the bin's tokens (each weighted by how often the engine samples it),
      with a 95% interval over draws (delta method);
    - ``uncond``: the plain mean of Δ over the bin's tokens (a token picked without looking at δ);
    - ``theory_mode``: the paper's mode ``σ²[(1 − p_a)(1 − p'_a) + Σ_{k≠a} p_k p'_k]`` at its leading order
      ``p' = p`` (:func:`workbench.theory.mode_mismatch`; ``p'`` at the exact posterior mode differs by O(σ²),
      the value by O(σ⁴), see :func:`workbench.theory.check_prop43`) and ``theory_second_order``: the mean
      ``σ²(½ − 2p + (3/2)Σ_b p_b²)`` (:func:`workbench.theory.second_order_conditional_mean`), both weighted
      like ``cond``; ``theory_uncond``: ``−(σ²/2)(1 − Σ_b p_b²)``.

    Also the distribution of Δ of tail tokens (``p < tail_p``) with and without conditioning on being sampled
    (a μ-weighted and an unweighted histogram) with ``tail_cond_mean`` and ``tail_mode_theory`` (the paper's
    mode averaged over the tail tokens, weighted by ``p``, as the engine samples them) to mark on it, and ``tail``: :func:`workbench.metrics.sampled_tail_delta` of
    one token actually sampled per (row, draw) — what a training log would show.

    Args:
        logits: ``(R, V)`` trainer logit rows.
        sigma: noise standard deviation σ > 0 (≤ 3).
        num_draws: noise draws per row.
        seed: seeds noise and sampling.
        edges: probability bin edges.
        tail_p: probability below which a token counts as a tail token (histograms).
        hist_bins: histogram bins.

    Returns:
        A dict of lists (one entry per bin) and scalars; see the keys above.

    >>> d = positive_mode_data(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3, 0.3)
    >>> d["tail_cond_mean"] > 0 > d["tail_uncond_mean"]
    True
    """
    z = _check_logits_2d("logits", logits).float()
    sigma = _check_positive("sigma", sigma, hi=3.0)
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 8:
        raise ValueError(f"num_draws={num_draws!r} must be an int >= 8 (Monte Carlo draws per row)")
    e = torch.as_tensor(edges, dtype=torch.float64)
    if e.numel() < 2 or not bool((e[1:] > e[:-1]).all()) or float(e[0]) < 0 or float(e[-1]) > 1:
        raise ValueError(f"edges={edges!r} must be strictly increasing probabilities in [0, 1]")
    _check_positive("tail_p", tail_p, hi=1.0)
    g = torch.Generator().manual_seed(seed)
    n_bins = e.numel() - 1
    R, V = z.shape
    lp = torch.log_softmax(z.double(), -1)  # (R, V)
    p = lp.exp()
    idx = (torch.bucketize(p, e, right=True) - 1).clamp(0, n_bins - 1)  # (R, V) bin of each token
    sum_sq = (p * p).sum(-1, keepdim=True)  # (R, 1)
    theory_mode = mode_mismatch(p, p, sigma)  # (R, V), leading order p' = p
    theory_second = second_order_conditional_mean(p, sigma)  # (R, V)
    theory_unc = (-(sigma**2) / 2 * (1 - sum_sq)).expand(R, V)

    num = torch.zeros(num_draws, n_bins, dtype=torch.float64)  # per draw: Σ_{(r,a) ∈ bin} μ_a Δ_a
    den = torch.zeros(num_draws, n_bins, dtype=torch.float64)  # per draw: Σ_{(r,a) ∈ bin} μ_a
    unc = torch.zeros(n_bins, dtype=torch.float64)
    tail = p < tail_p  # (R, V)
    span = 4 * sigma
    hist_edges = torch.linspace(-span, span, hist_bins + 1, dtype=torch.float64)
    hist_cond = torch.zeros(hist_bins, dtype=torch.float64)
    hist_unc = torch.zeros(hist_bins, dtype=torch.float64)
    tail_cond_num = tail_cond_den = tail_unc_sum = 0.0
    tail_unc_n = 0
    sampled_lt, sampled_li = [], []
    flat_idx = idx.flatten()
    for r in range(R):
        noise = sigma * torch.randn(num_draws, V, generator=g)  # (D, V)
        lmu = torch.log_softmax(z[r] + noise, -1).double()  # (D, V)
        d = lmu - lp[r]  # (D, V) Δ of every token
        mu = lmu.exp()
        bins_r = flat_idx[r * V : (r + 1) * V]
        num.index_add_(1, bins_r, mu * d)
        den.index_add_(1, bins_r, mu)
        unc.index_add_(0, bins_r, d.mean(0))
        t = tail[r]
        if bool(t.any()):
            dt, wt = d[:, t], mu[:, t]  # (D, K)
            tail_cond_num += float((wt * dt).sum())
            tail_cond_den += float(wt.sum())
            tail_unc_sum += float(dt.sum())
            tail_unc_n += dt.numel()
            hb = (torch.bucketize(dt.flatten(), hist_edges) - 1).clamp(0, hist_bins - 1)
            hist_cond.index_add_(0, hb, wt.flatten())
            hist_unc.index_add_(0, hb, torch.ones_like(dt.flatten()))
        a = torch.multinomial(mu.float(), 1, generator=g).squeeze(-1)  # (D,) one engine sample per draw
        sampled_lt.append(lp[r][a])
        sampled_li.append(lmu.gather(-1, a[:, None]).squeeze(-1))

    count = torch.bincount(flat_idx, minlength=n_bins).double()  # tokens per bin (over rows)
    n_mean, d_mean = num.mean(0), den.mean(0)  # (n_bins,)
    cond = n_mean / d_mean
    resid = num - cond * den  # (D, n_bins): delta method for a ratio of means
    se = resid.std(0) / d_mean / math.sqrt(num_draws)
    w = p.flatten()  # weight of a token in a bin ≈ how often it is sampled (first order)

    def weighted(x: torch.Tensor) -> torch.Tensor:
        s = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, flat_idx, w * x.flatten())
        return s / torch.zeros(n_bins, dtype=torch.float64).index_add_(0, flat_idx, w)

    def plain(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_bins, dtype=torch.float64).index_add_(0, flat_idx, x.flatten()) / count

    has = count > 0
    nan = float("nan")
    lt_s, li_s = torch.cat(sampled_lt), torch.cat(sampled_li)
    summary = metrics.sampled_tail_delta(lt_s, li_s, torch.ones_like(lt_s, dtype=torch.bool), p_max=tail_p)
    hist_c = hist_cond / hist_cond.sum() if float(hist_cond.sum()) > 0 else hist_cond
    hist_u = hist_unc / hist_unc.sum() if float(hist_unc.sum()) > 0 else hist_unc

    def listed(x: torch.Tensor) -> list[float]:
        return [float(v) if bool(h) else nan for v, h in zip(x, has)]

    return {
        "sigma": sigma,
        "lo": e[:-1].tolist(),
        "hi": e[1:].tolist(),
        "count": count.tolist(),
        "cond": listed(cond),
        "cond_ci": listed(1.96 * se),
        "uncond": listed(unc / count),
        "theory_mode": listed(weighted(theory_mode)),
        "theory_second_order": listed(weighted(theory_second)),
        "theory_uncond": listed(plain(theory_unc)),
        "tail_p": tail_p,
        "tail_cond_mean": tail_cond_num / tail_cond_den if tail_cond_den > 0 else nan,
        "tail_uncond_mean": tail_unc_sum / tail_unc_n if tail_unc_n else nan,
        "tail_mode_theory": float((w * theory_mode.flatten())[tail.flatten()].sum() / w[tail.flatten()].sum())
        if bool(tail.any())
        else nan,
        "hist_centers": ((hist_edges[1:] + hist_edges[:-1]) / 2).tolist(),
        "hist_cond": hist_c.tolist(),
        "hist_uncond": hist_u.tolist(),
        "sampled": summary,
    }


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


def exact_bias_vs_horizon(
    *,
    probs: Sequence[float] = (0.85, 0.1, 0.04, 0.01),
    horizons: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8),
    eps: float = 0.2,
    kind: str = "tail",
    seed: int = 0,
) -> list[dict[str, float]]:
    """Theorem 4.1 by exact enumeration: the naive gradient's bias and its bounds as the horizon T grows.

    The policy is *stationary*, as a language model's parameters are shared across positions: one logit
    vector ``θ = log probs`` emits every token, so ``π(y) = Π_t π(y_t)`` and ``∇_θ log π(y) = Σ_t (e_{y_t} − π)``
    has norm up to O(T). The engine's logits are ``θ + δ`` with ``‖δ‖_∞ = ε``: ``"tail"`` raises the least
    likely token by ε (a systematic, same-sign error like Prop 4.3's positive mode), ``"random"`` draws
    ``δ = ±ε`` with random signs. The reward is the fraction of tokens equal to token 0 (in [0, 1]). Over all
    ``V^T`` sequences: ``g(y) = R(y) ∇_θ log π(y)`` by autograd through :func:`workbench.dvp.token_logprobs`,
    the exact bias ``E_μ[g] − E_π[g]`` and the chain of bounds of the theorem (THEORY.md):
    ``‖bias‖ ≤ 2 sup‖g‖ D_TV(μ, π) ≤ 2 sup‖g‖ T Δ_max ≤ 2√2 R_max T² Δ_max``.

    Args:
        probs: the trainer's per-step distribution π (positive, sums to 1).
        horizons: the T values, strictly increasing (``V ** max(horizons)`` sequences; keep it ≤ 200k).
        eps: perturbation size ε > 0.
        kind: ``"tail"`` or ``"random"``.
        seed: seeds the random signs.

    Returns:
        One row per T: ``T``, ``bias_norm``, ``tv`` (sequence-level D_TV), ``sup_g``, ``delta_max``,
        ``bound_weight`` (2 sup‖g‖ D_TV), ``bound_t_delta`` (2 sup‖g‖ T Δ_max), ``bound_t2``
        (2√2 R_max T² Δ_max), ``mean_s`` (E_μ S = T · KL(μ‖π) per step).

    >>> rows = exact_bias_vs_horizon(horizons=(1, 2, 4))
    >>> all(r["bias_norm"] <= r["bound_weight"] * (1 + 1e-9) for r in rows), rows[2]["bias_norm"] > rows[0]["bias_norm"]
    (True, True)
    """
    hs = list(horizons)
    if (
        not hs
        or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hs)
        or hs != sorted(set(hs))
    ):
        raise ValueError(f"horizons={horizons!r} must be strictly increasing integers >= 1")
    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.dim() != 1 or p.numel() < 2 or bool((p <= 0).any()) or abs(float(p.sum()) - 1) > 1e-9:
        raise ValueError(f"probs={probs!r} must be >= 2 positive probabilities summing to 1")
    eps = _check_positive("eps", eps, hi=5.0)
    if kind not in ("tail", "random"):
        raise ValueError(f"kind={kind!r} must be 'tail' (systematic) or 'random' (δ = ±ε, random signs)")
    vocab = p.numel()
    if vocab ** hs[-1] > 200_000:
        raise ValueError(
            f"len(probs) ** max(horizons) = {vocab ** hs[-1]} sequences is too many to enumerate; keep it <= 200000"
        )
    theta = p.log()  # (V,)
    if kind == "tail":
        delta = torch.zeros(vocab, dtype=torch.float64)
        delta[int(p.argmin())] = eps
    else:
        g = torch.Generator().manual_seed(seed)
        delta = eps * (torch.randint(0, 2, (vocab,), generator=g, dtype=torch.float64) * 2 - 1)
    per_token = torch.log_softmax(theta + delta, -1) - torch.log_softmax(theta, -1)  # (V,) Δ_a
    delta_max = float(per_token.abs().max())

    rows = []
    for T in hs:
        n = vocab**T
        powers = vocab ** torch.arange(T - 1, -1, -1)  # (T,)
        seqs = (torch.arange(n)[:, None] // powers) % vocab  # (N, T): every sequence, lexicographic
        reward = (seqs == 0).double().mean(-1)  # (N,) in [0, 1]
        copies = theta.expand(n, vocab).clone().requires_grad_(True)  # (N, V): one θ per sequence
        log_pi = dvp.token_logprobs(copies[:, None, :].expand(n, T, vocab).contiguous(), seqs).sum(-1)  # (N,)
        (grad,) = torch.autograd.grad(log_pi.sum(), copies)  # (N, V) = ∇_θ log π(y)
        grads = grad * reward[:, None]  # g(y)
        log_pi = log_pi.detach()
        log_mu = dvp.token_logprobs((theta + delta).expand(n, T, vocab).contiguous(), seqs).sum(-1)  # (N,)
        pi, mu = log_pi.exp(), log_mu.exp()
        bias = ((mu - pi)[:, None] * grads).sum(0)  # (V,)
        sup_g = float(grads.norm(dim=-1).max())
        tv = 0.5 * float((mu - pi).abs().sum())
        rows.append(
            {
                "T": float(T),
                "bias_norm": float(bias.norm()),
                "tv": tv,
                "sup_g": sup_g,
                "delta_max": delta_max,
                "bound_weight": 2 * sup_g * tv,
                "bound_t_delta": 2 * sup_g * T * delta_max,
                "bound_t2": 2 * math.sqrt(2) * 1.0 * T**2 * delta_max,
                "mean_s": float((mu * (log_mu - log_pi)).sum()),
            }
        )
    return rows


def sequence_mismatch_vs_length(
    sample: PolicySample, *, lo: float = 0.5, hi: float = 2.0
) -> list[dict[str, float]]:
    """How the sequence log-ratio ``S_{≤T} = Σ_{t ≤ T} Δ_t`` of sampled responses grows with the length T.

    Responses are truncated at T (a response shorter than T contributes its whole S), so ``e^{−S_{≤T}}`` is the
    exact ratio π/μ of the truncated responses and ``mean |1 − e^{−S_{≤T}}|`` estimates ``2 D_TV`` between the
    two policies' length-T prefixes (Theorem 4.1's ``E_μ|1 − e^{−S}|``).

    Args:
        sample: a :class:`PolicySample`.
        lo, hi: the sequence-MIS window; ``frac_outside`` counts ratios outside ``[lo, hi]``.

    Returns:
        One row per T = 1 … max length: ``T``, ``mean_s``, ``std_s``, ``mean_abs_weight`` (E|1 − e^{−S}|),
        ``frac_outside`` (share of responses seq-MIS would mask), ``t_mean_abs_delta`` (T · mean |Δ|).
    """
    if not (0 < lo <= 1 <= hi):
        raise ValueError(f"lo={lo!r}, hi={hi!r} must satisfy 0 < lo <= 1 <= hi (a ratio window)")
    d = sample.delta.double()  # (N, T) 0 where masked
    s = d.cumsum(-1)  # (N, T) S_{≤T}
    mean_abs = float(d[sample.mask].abs().mean()) if bool(sample.mask.any()) else float("nan")
    rows = []
    for t in range(s.shape[1]):
        st = s[:, t]
        ratio = torch.exp(-st.clamp(-20, 20))
        rows.append(
            {
                "T": float(t + 1),
                "mean_s": float(st.mean()),
                "std_s": float(st.std()) if st.numel() > 1 else 0.0,
                "mean_abs_weight": float((1 - ratio).abs().mean()),
                "frac_outside": float(((ratio < lo) | (ratio > hi)).double().mean()),
                "t_mean_abs_delta": (t + 1) * mean_abs,
            }
        )
    return rows


def accumulation_figure(
    exact_rows: Sequence[Mapping[str, float]] | None = None,
    sampled_rows: Mapping[str, Sequence[Mapping[str, float]]] | None = None,
) -> go.Figure:
    """Theorem 4.1 over the horizon: exact bias vs its bounds (left), sampled-response S_{≤T} (right).

    Args:
        exact_rows: output of :func:`exact_bias_vs_horizon` (or ``None``).
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


def safe_set_view(logits_row: torch.Tensor, rho: float) -> dict[str, Any]:
    """One position's vocabulary sorted by probability, and what ρ keeps.

    Args:
        logits_row: ``(V,)`` trainer logits of one position.
        rho: min-p threshold in (0, 1].

    Returns:
        ``rank`` (1-based), ``logp`` (sorted, descending), ``keep`` (bool per rank), ``cut`` (log of ρ · max p),
        ``z`` (retained mass), ``size`` (|V_S|), ``one_minus_z``.

    >>> v = safe_set_view(torch.tensor([0.0, -1.0, -20.0]), 1e-3)
    >>> v["size"], v["keep"].tolist()
    (2, [True, True, False])
    """
    dvp.validate_rho(rho)
    if rho is None:
        raise ValueError("rho=None keeps every token; pass a threshold in (0, 1] to see a cut")
    if not isinstance(logits_row, torch.Tensor) or logits_row.dim() != 1:
        raise ValueError("logits_row must be a 1-D tensor (V,): one position, e.g. valid_rows(sample)[i]")
    lp = torch.log_softmax(logits_row.double(), -1)
    order = torch.argsort(lp, descending=True)
    keep = dvp.safe_mask(logits_row[None], rho)[0][order]
    zmass = float(dvp.retained_mass(logits_row[None].double(), rho)[0])
    pruned = float(lp[order][~keep].exp().sum())  # summed directly: exact where 1 − Z underflows in 1 − zmass
    return {
        "rank": torch.arange(1, lp.numel() + 1),
        "logp": lp[order],
        "keep": keep,
        "cut": float(lp.max()) + math.log(rho),
        "z": zmass,
        "size": int(keep.sum()),
        "one_minus_z": pruned,
    }


def rho_sweep(logits: torch.Tensor, rhos: Sequence[float], *, horizon: int = 1) -> list[dict[str, float]]:
    """Safe-set statistics over positions for each ρ, beside Props 5.4 and 5.5.

    Args:
        logits: ``(M, V)`` trainer logit rows (e.g. :func:`valid_rows`).
        rhos: thresholds in (0, 1].
        horizon: response length T for Prop 5.5's bound ``T (1 − Z_min)`` (with R_max = 1).

    Returns:
        One row per ρ: ``rho``, ``size_mean``, ``size_min``, ``one_minus_z_mean``, ``one_minus_z_max``,
        ``bound_pruned`` (max over rows of (|V| − |V_S|) ρ max π: Prop 5.4's middle term), ``bound_vocab``
        (|V| ρ), ``bound_prop55`` (T (1 − Z_min)).

    >>> rows = rho_sweep(torch.tensor([[0.0, -1.0, -20.0]]), [1e-3, 1e-12])
    >>> [r["size_mean"] for r in rows], rows[0]["one_minus_z_max"] <= rows[0]["bound_vocab"]
    ([2.0, 3.0], True)
    """
    z = _check_logits_2d("logits", logits)
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon={horizon!r} must be an int >= 1 (the response length T)")
    vocab = z.shape[-1]
    probs = torch.softmax(z.double(), -1)  # (M, V) once; each ρ only needs its mask
    pmax = probs.amax(-1)  # (M,)
    rows = []
    for rho in rhos:
        dvp.validate_rho(rho)
        if rho is None:
            raise ValueError("rhos must be thresholds in (0, 1]; None (no pruning) has nothing to sweep")
        keep = dvp.safe_mask(z, rho)  # (M, V): the exact cut dvp.token_logprobs applies
        one_minus = (probs * ~keep).sum(-1)  # (M,) pruned mass, summed directly: exact even at 1e-300
        size = keep.sum(-1).double()
        rows.append(
            {
                "rho": float(rho),
                "size_mean": float(size.mean()),
                "size_min": float(size.min()),
                "one_minus_z_mean": float(one_minus.mean()),
                "one_minus_z_max": float(one_minus.max()),
                "bound_pruned": float(((vocab - size) * rho * pmax).max()),
                "bound_vocab": vocab * float(rho),
                "bound_prop55": horizon * float(one_minus.max()),
            }
        )
    return rows


def tail_draws(sample: PolicySample, rho: float = dvp.DEFAULT_RHO) -> dict[str, float]:
    """What the engine sampled from outside the trainer's safe set at ``rho`` — the tail DVP removes.

    With a full-vocabulary engine these are *tail draws*; with an engine that prunes at the same ρ they can only
    be *boundary tokens* (the engine's perturbed logits moved them across the cut).

    Args:
        sample: a :class:`PolicySample`.
        rho: the trainer's min-p threshold.

    Returns:
        ``tokens`` (valid sampled tokens), ``outside`` (how many lie outside the trainer's V_S),
        ``mean_delta_outside`` (their mean Δ = log μ − log π; NaN when there are none), ``min_gap`` (the
        smallest ``log π(a) − log max_b π(b)`` of a sampled token: ≥ log ρ exactly when none is outside) and
        ``log_rho``.
    """
    dvp.validate_rho(rho)
    if rho is None:
        raise ValueError("rho=None has no safe set; pass the trainer's threshold, e.g. dvp.DEFAULT_RHO")
    outside = metrics.boundary_tokens(sample.logits, sample.tokens, rho, mask=sample.mask)  # (N, T)
    d = (sample.logp_infer - sample.logp_train)[outside].double()
    top = torch.log_softmax(sample.logits.double(), -1).amax(-1)  # (N, T) log max_b π(b)
    gap = (sample.logp_train.double() - top)[sample.mask]  # (n,) log π(a) − log max π
    return {
        "tokens": float(sample.mask.sum()),
        "outside": float(outside.sum()),
        "mean_delta_outside": float(d.mean()) if d.numel() else float("nan"),
        "min_gap": float(gap.min()) if gap.numel() else float("nan"),
        "log_rho": math.log(rho),
    }


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
        logits: ``(R, V)`` trainer logit rows (e.g. :func:`valid_rows` of a policy sample).
        eps: initial ε.
        kind: ``"vertex"`` or ``"uniform"`` perturbations (:func:`envelope_data`).
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
        self.logits = _check_logits_2d("logits", logits)
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
        self.logits = _check_logits_2d("logits", logits)
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
        self.logits = _check_logits_2d("logits", logits)
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
