"""Measurements on logit rows behind the pictures of notebooks 01–05: pure tensor functions, no model, no I/O.

Each function takes logits (or a :class:`PolicySample` of them) and returns plain data — tensors, lists,
floats — that a figure in :mod:`workbench.viz.explore` draws and a test checks. They are built on the core
(:mod:`workbench.dvp`, :mod:`workbench.metrics`) and :mod:`workbench.theory`; sampling the logits in the
first place (a policy, a rollout engine) is :mod:`workbench.experiments.real_logits`.

==================================  =============================================================  ========
function                            what it measures                                               notebook
==================================  =============================================================  ========
:func:`mismatch_summary`            tokens, mean/max |Δ|, k1, k3 per engine                        01
:func:`envelope_data`               |Δ| under ‖δ‖∞ ≤ ε beside Prop 4.2's three bounds              02
:func:`precision_envelope_data`     Prop 4.2 on a real precision gap (ε per row)                   01, 02
:func:`positive_mode_data`          E[Δ | a sampled] by p-bin vs Prop 4.3's mode (Monte Carlo)     03
:func:`exact_bias_vs_horizon`       exact ‖E_μ g − E_π g‖ vs T on a stationary toy (Thm 4.1)       04
:func:`sequence_mismatch_vs_length` S_{≤T} of sampled responses vs T                               04
:func:`safe_set_view`               one position's V_S and Z at ρ                                  05
:func:`rho_sweep`                   1 − Z over a ρ grid beside Props 5.4/5.5's bounds              05
:func:`tail_draws`                  sampled tokens outside V_S (boundary tokens)                   05
==================================  =============================================================  ========
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench import dvp, metrics
from workbench.theory.prop42 import logit_error, prop42_envelope
from workbench.theory.prop43 import mode_mismatch, second_order_conditional_mean

__all__ = [
    "PolicySample",
    "check_logit_rows",
    "envelope_data",
    "exact_bias_vs_horizon",
    "mismatch_summary",
    "positive_mode_data",
    "precision_envelope_data",
    "rho_sweep",
    "safe_set_view",
    "sequence_mismatch_vs_length",
    "tail_draws",
    "valid_rows",
]


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


def valid_rows(sample: PolicySample) -> torch.Tensor:
    """The trainer logits of every valid response position, ``(M, V)`` (``M = mask.sum()``)."""
    return sample.logits[sample.mask]


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


def check_logit_rows(name: str, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` if it is a float ``(R, V)`` tensor of logit rows (R ≥ 1, V ≥ 2); else a ValueError naming ``name``."""
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
    z = check_logit_rows("logits", logits).double()  # (R, V)
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
    zt = check_logit_rows("logits_train", logits_train).double()
    ze = check_logit_rows("logits_engine", logits_engine).double()
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
    z = check_logit_rows("logits", logits).float()
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
    z = check_logit_rows("logits", logits)
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
