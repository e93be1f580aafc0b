"""Mismatch metrics: how far the rollout engine's policy μ is from the trainer's policy π.

The field logs a handful of numbers to watch training–inference mismatch (THEORY.md, "Metrics to log").
This module computes them from per-token log-probs of the *sampled* tokens, always under a validity
mask, so padding never changes any value (even NaN or inf in padded positions):

================  ==========================================================================
metric            estimator (Δ = log μ − log π on sampled tokens, u = −Δ, r = e^u = π/μ)
================  ==========================================================================
k1 ("vllm-kl")    mean Δ — KL(μ‖π) estimate, unbiased but noisy, can be negative
k3                mean(e^u − u − 1) — KL(μ‖π) estimate, ≥ 0 per token, lower variance
χ² token          mean r_t² − 1 — χ²(π‖μ) per token: the variance of token-level IS
χ² sequence       mean_y r(y)² − 1 — χ² of whole responses: the variance of sequence-level IS
ESS               1 / mean(w²), w = r / mean r — effective sample fraction of token IS (want > 0.5)
PPL ratio         exp(mean_y (log ppl_π(y) − log ppl_μ(y))) — >1: the trainer finds the text less likely
                  (geometric mean over sequences; ``ppl_ratio_arith``: verl's arithmetic mean of the ratios)
|Δ|               max and mean absolute token log-prob gap
================  ==========================================================================

plus the mismatch *signature* (Δ by trainer-probability bin, :func:`delta_by_prob_bin`), the "positive
mode" of sampled low-probability tokens (:func:`sampled_tail_delta`, Prop 4.3), the tail draws of a
training batch (:func:`tail_draw_metrics`), the safe-set overlap
between trainer and engine (:func:`safe_set_overlap`), boundary tokens (:func:`boundary_tokens`) and a
summary of a :class:`workbench.dvp.TokenStats` (:func:`dvp_metrics`).

Every key a function emits is documented, with its estimator, in :data:`MISMATCH_METRIC_DOCS`,
:data:`TAIL_METRIC_DOCS` or :data:`DVP_METRIC_DOCS` (a test checks the sets agree). Reductions run in float64; a metric of an
empty selection (no valid token) is ``nan``, never a made-up 0.

verl's names and definitions. :func:`verl_rollout_corr_metrics` emits the same quantities as verl 0.9.1's
rollout-correction helper (``rollout_corr/…``, :data:`VERL_METRIC_DOCS`), with verl's definitions — rows with no
valid token averaged in, the arithmetic PPL ratio, ESS over the applied weights with IcePop's zeros and
sequence weights counted once per token — so a run can be overlaid on a verl dashboard
(``RLOOConfig.verl_metrics``; lessons/switching.md).

Run the doctests: ``pytest --doctest-modules workbench/metrics.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from statistics import NormalDist

import torch

from workbench.dvp import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_RHO,
    MASK_MARGIN,
    TokenStats,
    safe_mask,
    token_in_safe_set,
    validate_rho,
)
from workbench.importance import ISConfig

__all__ = [
    "DEFAULT_LOG_CLAMP",
    "DEFAULT_P_EDGES",
    "DVP_METRIC_DOCS",
    "MISMATCH_METRIC_DOCS",
    "TAIL_METRIC_DOCS",
    "VERL_METRIC_DOCS",
    "boundary_from_logprobs",
    "boundary_tokens",
    "delta_by_prob_bin",
    "dvp_metrics",
    "kde_mode",
    "mean_ci",
    "mismatch_metrics",
    "mode_ci",
    "safe_set_overlap",
    "sampled_tail_delta",
    "tail_draw_metrics",
    "verl_rollout_corr_metrics",
]

DEFAULT_P_EDGES: tuple[float, ...] = (0.0, 1e-6, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 0.9, 0.99, 1.0)
"""Trainer-probability bin edges for the mismatch signature: fine in the tail, where Δ is large."""

DEFAULT_LOG_CLAMP: float = 20.0
"""Log-ratios are clamped to ±20 before exponentiating in the χ² and ESS metrics (verl's SAFETY_BOUND)."""

MISMATCH_METRIC_DOCS: dict[str, str] = {
    "mismatch/k1": "k1 'vllm-kl': mean over valid sampled tokens of Δ = log μ − log π; KL(μ‖π) estimate, can be < 0",
    "mismatch/k3": "k3: mean of e^u − u − 1, u = log π − log μ (≥ 0 per token); low-variance KL(μ‖π) estimate",
    "mismatch/chi2_token": "mean r_t² − 1 over valid tokens, r_t = π/μ with log r_t clamped to ±log_clamp; χ²(π‖μ) per token",
    "mismatch/chi2_seq": "mean over sequences of r(y)² − 1, log r(y) = Σ_t log r_t clamped to ±log_clamp (log space)",
    "mismatch/ess": "1 / mean(w²) with w = r_t / mean r_t over valid tokens (log space, log r_t clamped): ESS fraction in (0, 1], want > 0.5",
    "mismatch/ppl_ratio": "geometric: exp(mean over sequences of log ppl_π − log ppl_μ) = exp(mean_y mean_t Δ); > 1: "
    "trainer less sure (verl's exp(rollout_corr/log_ppl_diff))",
    "mismatch/ppl_ratio_arith": "arithmetic: mean over sequences of ppl_π / ppl_μ = mean_y exp(mean_t Δ) (verl's "
    "rollout_corr/ppl_ratio, without its empty rows); ≥ the geometric ppl_ratio",
    "mismatch/max_abs_delta": "max |Δ| = max |log μ − log π| over valid sampled tokens",
    "mismatch/mean_abs_delta": "mean |Δ| over valid sampled tokens",
    "mismatch/lowp_count": "number of valid sampled tokens with trainer probability p = e^{log π} < p_max (default 1e-3)",
    "mismatch/lowp_delta_mean": "mean Δ over those low-p sampled tokens; > 0 is the 'positive mode' of Prop 4.3 (nan if none)",
    "mismatch/lowp_delta_ci_lo": "lower end of the 95% CI of lowp_delta_mean: mean − t_{0.975, n−1} · s/√n (nan if n < 2)",
    "mismatch/lowp_delta_ci_hi": "upper end of the 95% CI of lowp_delta_mean: mean + t_{0.975, n−1} · s/√n (nan if n < 2)",
    "mismatch/lowp_frac_positive": "fraction of low-p sampled tokens with Δ > 0 (≈ 0.5 without bias; nan if none)",
}
"""Keys emitted by :func:`mismatch_metrics` and :func:`sampled_tail_delta`: key → meaning and estimator."""

DVP_METRIC_DOCS: dict[str, str] = {
    "dvp/one_minus_z_mean": "mean over valid positions of 1 − Z, the π-mass outside the safe set = TV(π, π^mp) (Prop 5.4)",
    "dvp/one_minus_z_max": "max over valid positions of 1 − Z; T · this bounds the objective bias |J_mp − J| / R_max (Prop 5.5)",
    "dvp/safe_size_mean": "mean safe-set size |V_S| over valid positions (the whole vocabulary when ρ is None)",
    "dvp/safe_size_min": "smallest safe set over valid positions (1 = only the argmax survives: greedy there)",
    "dvp/entropy_mean": "mean entropy (nats) of the trainer's pruned policy π^mp over valid positions",
    "dvp/logp_mean": "mean log π^mp of the sampled tokens over valid positions (= −log perplexity of the trainer)",
}
"""Keys emitted by :func:`dvp_metrics`: key → meaning and estimator."""


# ----------------------------------------------------------------------------------------------------
# input checks


def _check_float(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor (got {type(x).__name__}); wrap it with torch.as_tensor"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor of log-probs (got dtype {x.dtype}); pass .float()"
        )
    return x


def _check_pair(logp_train: object, logp_infer: object, mask: object, *, ndim: int | None) -> None:
    """Validate two same-shape float tensors and a bool mask of that shape."""
    a = _check_float("logp_train", logp_train)
    b = _check_float("logp_infer", logp_infer)
    if ndim is not None and a.dim() != ndim:
        raise ValueError(
            f"logp_train must be {ndim}-D [B, T] (got shape {tuple(a.shape)}); pass one row per response"
        )
    if b.shape != a.shape:
        raise ValueError(
            f"logp_infer has shape {tuple(b.shape)} but logp_train has shape {tuple(a.shape)}; "
            "pass log-probs of the same sampled tokens from both policies"
        )
    _check_mask(mask, a.shape)


def _check_mask(mask: object, shape: torch.Size, name: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor, True = valid token (got {got}); pass mask.bool()")
    if mask.shape != shape:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but the values have shape {tuple(shape)}; "
            "pass the validity mask of the same tokens"
        )
    return mask


def _check_positive(name: str, value: float, *, upper: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    if ok and upper is not None:
        ok = value <= upper
    if not ok:
        rng = f"(0, {upper}]" if upper is not None else "(0, inf)"
        raise ValueError(f"{name}={value!r} must be a finite number in {rng}")


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size={chunk_size!r} must be a positive int (rows per chunk, e.g. 1024) or None (automatic)"
        )


def _check_edges(edges: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Probability bin edges → float64 tensor, or ValueError saying what is wrong."""
    try:
        e = torch.as_tensor(edges, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"edges={edges!r} must be a sequence of floats in [0, 1] ({err})") from err
    if e.numel() < 2:
        raise ValueError(f"edges={edges!r} needs at least 2 values (one bin); e.g. DEFAULT_P_EDGES")
    if not bool(torch.isfinite(e).all()) or bool((e < 0).any()) or bool((e > 1).any()):
        raise ValueError(f"edges={edges!r} must lie in [0, 1] (they are probabilities p = exp(logp_train))")
    if not bool((e[1:] > e[:-1]).all()):
        raise ValueError(f"edges={edges!r} must be strictly increasing; sort them and drop duplicates")
    return e


# ----------------------------------------------------------------------------------------------------
# helpers


def _nan() -> float:
    return float("nan")


def _log_mean_exp(x: torch.Tensor) -> torch.Tensor:
    """log(mean(exp(x))) of a 1-D tensor, stable for large |x|."""
    return torch.logsumexp(x, dim=0) - math.log(x.numel())


def _student_t_cdf(t: float, df: int) -> float:
    """CDF of Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3/26.7.4, exact finite series)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        term = total = math.cos(theta) if df > 1 else 0.0
        for k in range(3, df - 1, 2):  # (2·4···(k−1)) / (1·3···k) cos^k θ
            term *= (k - 1) / k * c2
            total += term
        a = 2.0 / math.pi * (theta + s * total)
    else:
        term = total = 1.0
        for k in range(2, df - 1, 2):  # (1·3···(k−1)) / (2·4···k) cos^k θ
            term *= (k - 1) / k * c2
            total += term
        a = s * total
    return 0.5 + math.copysign(0.5 * a, t)  # A = P(|T| < |t|)


def _student_t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t: closed form for df 1 and 2, bisection on the exact CDF up to df 200,
    and the Cornish–Fisher expansion (A&S 26.7.5, error < 1e-9 there) above.

    >>> round(_student_t_quantile(0.975, 10), 3)
    2.228
    """
    if df < 1:
        raise ValueError(f"df={df} must be >= 1")
    if df == 1:
        return math.tan(math.pi * (q - 0.5))
    if df == 2:
        return (2 * q - 1) / math.sqrt(2 * q * (1 - q))
    z = NormalDist().inv_cdf(q)
    if df > 200:
        g1 = (z**3 + z) / 4
        g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
        g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
        g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
        return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4
    if q < 0.5:
        return -_student_t_quantile(1.0 - q, df)
    lo, hi = z, 2.0 * z + 1.0  # t_q ≥ z_q for q ≥ 0.5; grow hi until it brackets the quantile
    while _student_t_cdf(hi, df) < q:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _student_t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------------
# token / sequence mismatch


def mismatch_metrics(
    logp_train: torch.Tensor,
    logp_infer: torch.Tensor,
    mask: torch.Tensor,
    *,
    log_clamp: float = DEFAULT_LOG_CLAMP,
) -> dict[str, float]:
    """The field's mismatch metrics between trainer (π) and engine (μ) on the sampled tokens.

    Keys and estimators are listed in :data:`MISMATCH_METRIC_DOCS` (``mismatch/k1`` … ``mismatch/mean_abs_delta``).
    Only ``mask``-ed positions are read, so padding (even NaN/inf) never changes a value. Sequence metrics
    (``chi2_seq``, ``ppl_ratio``) average over rows with at least one valid token. With no valid token every
    value is ``nan``.

    Args:
        logp_train: ``[B, T]`` log π of the sampled tokens (the trainer's, e.g. ``dvp.token_logprobs``).
        logp_infer: ``[B, T]`` log μ of the same tokens as the engine sampled them.
        mask: ``[B, T]`` bool, True for valid response tokens.
        log_clamp: log-ratios are clamped to ±log_clamp before exponentiating (χ² and ESS; k1, k3 and
            |Δ| use the exact values).

    Returns:
        ``{key: float}`` for the keys of :data:`MISMATCH_METRIC_DOCS` starting ``mismatch/`` except the
        ``lowp_*`` ones (see :func:`sampled_tail_delta`).

    >>> lp = torch.log(torch.tensor([[0.5, 0.25, 1.0]]))
    >>> m = mismatch_metrics(lp, lp, torch.tensor([[True, True, False]]))
    >>> m["mismatch/k1"], m["mismatch/k3"], m["mismatch/chi2_token"], m["mismatch/ess"]
    (0.0, 0.0, 0.0, 1.0)
    """
    _check_pair(logp_train, logp_infer, mask, ndim=2)
    _check_positive("log_clamp", log_clamp)
    keys = [k for k in MISMATCH_METRIC_DOCS if not k.startswith("mismatch/lowp_")]
    if not bool(mask.any()):
        return dict.fromkeys(keys, _nan())

    # Padding is replaced by 0 with `where` *before* any arithmetic reads it (x * mask keeps NaN · 0 = NaN).
    u_bt = torch.where(mask, logp_train.double() - logp_infer.double(), 0.0)  # (B, T) log r_t = −Δ
    u = u_bt[mask]  # (n,) valid tokens only
    u_c = u.clamp(-log_clamp, log_clamp)
    n_t = mask.sum(-1)  # (B,)
    has = n_t > 0
    log_r_seq = u_bt.sum(-1)[has]  # (B',) log r(y)
    mean_delta_seq = -log_r_seq / n_t[has]  # (B',) log ppl_π − log ppl_μ

    values = torch.stack(
        [
            (-u).mean(),  # k1
            (torch.expm1(u) - u).mean(),  # k3 = e^u − 1 − u (expm1: exact near 0)
            torch.expm1(_log_mean_exp(2 * u_c)),  # chi2_token = mean r² − 1
            torch.expm1(_log_mean_exp(2 * log_r_seq.clamp(-log_clamp, log_clamp))),  # chi2_seq
            torch.exp(2 * _log_mean_exp(u_c) - _log_mean_exp(2 * u_c)),  # ess = (mean r)² / mean r²
            torch.exp(mean_delta_seq.mean()),  # ppl_ratio (geometric)
            torch.exp(mean_delta_seq).mean(),  # ppl_ratio_arith
            u.abs().max(),
            u.abs().mean(),
        ]
    )
    return dict(zip(keys, values.tolist()))


# ----------------------------------------------------------------------------------------------------
# verl's rollout_corr/… metrics, with verl's definitions

_VERL_OFFPOLICY_DOCS: dict[str, str] = {
    "training_ppl": "mean over all rows of exp(−mean_t log π) (rows without a valid token count as 1)",
    "training_log_ppl": "mean over all rows of −mean_t log π (empty rows count as 0)",
    "kl": "mean over valid tokens of log μ − log π (= mismatch/k1)",
    "k3_kl": "mean over valid tokens of r − log r − 1, r = π/μ unclamped (= mismatch/k3)",
    "rollout_ppl": "mean over all rows of exp(−mean_t log μ) (empty rows count as 1)",
    "rollout_log_ppl": "mean over all rows of −mean_t log μ (empty rows count as 0)",
    "log_ppl_diff": "mean over all rows of mean_t (log μ − log π) (empty rows count as 0; = log mismatch/ppl_ratio "
    "without them)",
    "log_ppl_abs_diff": "mean over all rows of |mean_t (log μ − log π)|",
    "log_ppl_diff_max": "max over all rows of mean_t (log μ − log π) (an empty row gives 0)",
    "log_ppl_diff_min": "min over all rows of mean_t (log μ − log π) (an empty row gives 0)",
    "ppl_ratio": "arithmetic: mean over all rows of exp(mean_t (log μ − log π)) (empty rows count as 1)",
    "chi2_token": "mean over valid tokens of r_t² − 1, log r_t clamped at ±20 (= mismatch/chi2_token)",
    "chi2_seq": "mean over all rows of r(y)² − 1, log r(y) clamped at ±20 (empty rows count as 0)",
}
_VERL_IS_DOCS: dict[str, str] = {
    "rollout_is_mean": "mean over valid tokens of the applied IS weight (IcePop zeros included)",
    "rollout_is_max": "token level: max applied weight; sequence level: e^min(max_y log r(y), 20) over all rows",
    "rollout_is_min": "token level: min applied weight; sequence level: e^{min_y log r(y)} over all rows",
    "rollout_is_ratio_fraction_high": "fraction of valid tokens (sequence level: of all rows) whose ratio exceeds hi",
    "rollout_is_ratio_fraction_low": "fraction of valid tokens (sequence level: of all rows) whose ratio is below lo "
    "(1/hi for truncation)",
    "rollout_is_std": "token-weighted std of the applied weights clipped to [0, hi] (0 with ≤ 1 valid token)",
    "rollout_is_eff_sample_size": "ESS 1/mean(w̃²), w̃ = w/mean w over valid tokens of the applied weights clipped to "
    "[0, hi]: IcePop zeros count, a sequence weight counts once per token",
    "rollout_is_seq_mean": "mean over all rows of the row's mean applied weight (empty rows count as 0)",
    "rollout_is_seq_std": "std (unbiased) over all rows of the row's mean applied weight",
    "rollout_is_seq_max": "max over all rows of the row's mean applied weight",
    "rollout_is_seq_min": "min over all rows of the row's mean applied weight",
    "rollout_is_seq_max_deviation": "max over all rows of |row mean applied weight − 1|",
    "rollout_is_seq_fraction_high": "fraction of all rows whose mean raw weight exceeds hi",
    "rollout_is_seq_fraction_low": "fraction of all rows whose mean raw weight is below lo (1/hi for truncation)",
    "rollout_is_oob_ratio": "IcePop (token_mis / seq_mis) only: fraction of valid tokens whose ratio is outside "
    "[lo, hi]",
}
_VERL_RS_OPTION_DOCS: dict[str, str] = {
    "mean": "token-weighted mean of the option's per-sequence statistic",
    "max": "max of the statistic over sequences with a valid token",
    "min": "min of the statistic over sequences with a valid token",
    "fraction_high": "fraction of sequences with a valid token whose statistic exceeds the upper bound",
    "fraction_low": "fraction below the lower bound (k1 options; 0 otherwise)",
    "std": "token-weighted std of the statistic clipped to the bounds",
    "seq_mean": "mean of the statistic over sequences with a valid token",
    "seq_std": "std (unbiased) of the statistic over those sequences",
    "seq_max": "max of the statistic over those sequences",
    "seq_min": "min of the statistic over those sequences",
    "seq_max_deviation": "max |statistic| over those sequences",
    "seq_fraction_high": "fraction of those sequences above the upper bound",
    "seq_fraction_low": "k1 options only: fraction of those sequences below the lower bound",
    "masked_fraction": "fraction of valid tokens this option rejects",
    "seq_masked_fraction": "fraction of sequences with a valid token this option rejects",
}
_VERL_RS_OPTIONS: dict[str, str] = {
    "seq_mean_k1": "geo_mask's window (statistic mean_t −log r_t, bounds log(1/hi), log(1/lo))",
    "seq_max_k2": "trust region, k2 (statistic max_t ½ log² r_t)",
    "seq_max_k3": "trust region, k3 (statistic max_t r_t − 1 − log r_t)",
}
VERL_METRIC_DOCS: dict[str, str] = {
    **{f"rollout_corr/{k}": f"verl: {v}" for k, v in _VERL_OFFPOLICY_DOCS.items()},
    **{
        f"rollout_corr/{k}": f"verl, IS modes verl can express (token/seq tis/mis): {v}"
        for k, v in _VERL_IS_DOCS.items()
    },
    **{
        f"rollout_corr/rollout_rs_{o}_{k}": f"verl, {where}: {v}"
        for o, where in _VERL_RS_OPTIONS.items()
        for k, v in _VERL_RS_OPTION_DOCS.items()
        if not (k == "seq_fraction_low" and not o.endswith("k1"))
    },
    "rollout_corr/rollout_rs_masked_fraction": "verl, with geo_mask or a trust region: fraction of valid tokens "
    "rejected by any rejection option",
    "rollout_corr/rollout_rs_seq_masked_fraction": "verl, with geo_mask or a trust region: fraction of all rows "
    "with a rejected valid token",
}
"""Keys :func:`verl_rollout_corr_metrics` can emit (``RLOOConfig.verl_metrics``): verl 0.9.1's names and
definitions (``verl.trainer.ppo.rollout_corr_helper``); which ones depend on the IS settings."""


def _verl_is_spec(cfg: ISConfig) -> tuple[str, float, float | None] | None:
    """``(level, upper, lower or None)`` of verl's ``rollout_is`` for ``cfg``, None where verl has no counterpart."""
    lo, hi = cfg.bounds
    if cfg.mode in ("token_tis", "seq_tis") and lo is None:
        assert hi is not None
        return ("token" if cfg.mode == "token_tis" else "sequence"), hi, None
    if cfg.mode in ("token_mis", "seq_mis") and lo:
        assert hi is not None
        return ("token" if cfg.mode == "token_mis" else "sequence"), hi, lo
    return None


def verl_rollout_corr_metrics(
    logp_train: torch.Tensor,
    logp_infer: torch.Tensor,
    mask: torch.Tensor,
    is_config: ISConfig | None = None,
) -> dict[str, float]:
    """verl 0.9.1's ``rollout_corr/…`` metrics of a batch, with verl's definitions (:data:`VERL_METRIC_DOCS`).

    What ``compute_rollout_correction_and_rejection_mask`` logs for the verl settings equivalent to
    ``is_config`` (:func:`workbench.integrations.verl.rollout_correction_for`): the off-policy metrics always;
    the ``rollout_is_*`` weight statistics when the mode is one verl expresses (``token_tis``, ``seq_tis``
    without a lower clip, ``token_mis``, ``seq_mis`` with ``lo > 0``); the ``rollout_rs_*`` statistics of
    ``geo_mask`` (verl's ``seq_mean_k1``) and of the trust region (``seq_max_k2`` / ``seq_max_k3``). The veto
    has no verl counterpart and no metric here. Differences from :func:`mismatch_metrics`, all verl's: rows
    without a valid token are averaged in (PPL 1, log-PPL gap 0, r(y)² = 1), ``ppl_ratio`` is the arithmetic
    mean, ESS is over the applied weights (IcePop zeros included, a sequence weight once per token). Computed in
    float64; verl's ``+1e-8`` denominators are not reproduced (relative differences ~1e-8 / tokens).

    Args:
        logp_train: ``[B, T]`` trainer log-probs (verl's ``old_log_prob``).
        logp_infer: ``[B, T]`` engine log-probs (verl's ``rollout_log_prob``).
        mask: ``[B, T]`` bool valid tokens (verl's ``response_mask``).
        is_config: the IS settings (None: off-policy metrics only).

    Returns:
        ``{"rollout_corr/…": float}``; every value ``nan`` when no token is valid (verl raises there).

    >>> lp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 1.0]]))
    >>> m = verl_rollout_corr_metrics(lp, lp, torch.tensor([[True, True], [False, False]]))
    >>> m["rollout_corr/ppl_ratio"], round(m["rollout_corr/training_ppl"], 4)  # the empty row: (1 + 1)/2, (√8 + 1)/2
    (1.0, 1.9142)
    """
    _check_pair(logp_train, logp_infer, mask, ndim=2)
    if not bool(mask.any()):
        one = torch.ones(1, 1, dtype=torch.bool)
        keys = verl_rollout_corr_metrics(torch.zeros(1, 1), torch.zeros(1, 1), one, is_config)
        return dict.fromkeys(keys, _nan())
    clamp = DEFAULT_LOG_CLAMP  # verl's SAFETY_BOUND
    m = mask.double()  # (B, T)
    lt = torch.where(mask, logp_train.double(), 0.0)  # (B, T)
    li = torch.where(mask, logp_infer.double(), 0.0)  # (B, T)
    lr = lt - li  # (B, T) log r_t, 0 on padding
    n = m.sum(-1)  # (B,)
    has = n > 0  # (B,)
    n_all = m.sum()

    def row_mean(x: torch.Tensor) -> torch.Tensor:  # (B, T) → (B,), 0 for an empty row (verl's masked_mean)
        return torch.where(has, (x * m).sum(-1) / n.clamp_min(1), 0.0)

    def tok_mean(x: torch.Tensor) -> torch.Tensor:  # mean over valid tokens
        return (x * m).sum() / n_all

    out: dict[str, torch.Tensor] = {}
    mlp_t, mlp_i = row_mean(lt), row_mean(li)  # (B,)
    gap = mlp_i - mlp_t  # (B,) log ppl_π − log ppl_μ
    seq_lr = lr.sum(-1)  # (B,) log r(y)
    out |= {
        "training_ppl": torch.exp(-mlp_t).mean(),
        "training_log_ppl": (-mlp_t).mean(),
        "kl": tok_mean(li - lt),
        "k3_kl": tok_mean(torch.expm1(lr) - lr),
        "rollout_ppl": torch.exp(-mlp_i).mean(),
        "rollout_log_ppl": (-mlp_i).mean(),
        "log_ppl_diff": gap.mean(),
        "log_ppl_abs_diff": gap.abs().mean(),
        "log_ppl_diff_max": gap.max(),
        "log_ppl_diff_min": gap.min(),
        "ppl_ratio": torch.exp(gap).mean(),
        "chi2_token": tok_mean(torch.exp(2 * lr.clamp(-clamp, clamp))) - 1,
        "chi2_seq": torch.exp(2 * seq_lr.clamp(-clamp, clamp)).mean() - 1,
    }

    spec = None if is_config is None else _verl_is_spec(is_config)
    if spec is not None:
        level, hi, lo = spec
        lo_m = 1.0 / hi if lo is None else lo  # verl's lower bound for the *_fraction_low metrics
        if level == "token":
            raw = torch.exp(lr.clamp(-clamp, clamp)) * m  # (B, T)
        else:
            raw = torch.exp(seq_lr.clamp(-clamp, clamp))[:, None] * m  # (B, T)
        if lo is None:
            w = raw.clamp(max=hi)  # (B, T) TIS
        else:
            w = torch.where((raw >= lo) & (raw <= hi), raw, 0.0)  # (B, T) IcePop
        if level == "sequence":
            out |= {
                "rollout_is_max": torch.exp(seq_lr.max().clamp(max=clamp)),
                "rollout_is_min": torch.exp(seq_lr.min()),
                "rollout_is_mean": tok_mean(w),
                "rollout_is_ratio_fraction_high": (seq_lr > math.log(hi)).double().mean(),
                "rollout_is_ratio_fraction_low": (seq_lr < math.log(lo_m)).double().mean(),
            }
        else:
            out |= {
                "rollout_is_mean": tok_mean(w),
                "rollout_is_ratio_fraction_high": tok_mean((raw > hi).double()),
                "rollout_is_ratio_fraction_low": tok_mean((raw < lo_m).double()),
                "rollout_is_max": w[mask].max(),
                "rollout_is_min": w[mask].min(),
            }
        wc = w.clamp(0.0, hi)  # (B, T)
        wc_mean = tok_mean(wc)
        out["rollout_is_std"] = (
            (tok_mean(wc * wc) - wc_mean**2).clamp_min(0).sqrt() if n_all > 1 else torch.zeros(())
        )
        out["rollout_is_eff_sample_size"] = 1.0 / tok_mean((wc / (wc_mean + 1e-8)) ** 2)
        seq_w, raw_seq_w = row_mean(w), row_mean(raw)  # (B,)
        out |= {
            "rollout_is_seq_mean": seq_w.mean(),
            "rollout_is_seq_std": seq_w.std() if seq_w.numel() > 1 else torch.zeros(()),
            "rollout_is_seq_max": seq_w.max(),
            "rollout_is_seq_min": seq_w.min(),
            "rollout_is_seq_max_deviation": (seq_w - 1).abs().max(),
            "rollout_is_seq_fraction_high": (raw_seq_w > hi).double().mean(),
            "rollout_is_seq_fraction_low": (raw_seq_w < lo_m).double().mean(),
        }
        if lo is not None:
            out["rollout_is_oob_ratio"] = tok_mean(((raw < lo) | (raw > hi)).double())

    # rejection options: (name, per-sequence statistic, lower bound or None, upper bound)
    options: list[tuple[str, torch.Tensor, float | None, float]] = []
    u = lr.clamp(-clamp, clamp)  # (B, T)
    if is_config is not None and is_config.mode == "geo_mask":
        lo, hi = is_config.bounds
        assert lo is not None and hi is not None
        options.append(("seq_mean_k1", row_mean(-u), math.log(1.0 / hi), math.log(1.0 / lo)))
    if is_config is not None and is_config.trust_region is not None:
        div = 0.5 * u * u if is_config.trust_region_div == "k2" else torch.expm1(u) - u  # (B, T)
        worst = torch.where(mask, div, -math.inf).amax(-1)  # (B,)
        options.append(
            (
                f"seq_max_{is_config.trust_region_div}",
                torch.where(has, worst, 0.0),
                None,
                is_config.trust_region,
            )
        )
    final_keep = torch.ones_like(has)  # (B,)
    for name, stat, lower, upper in options:
        keep = stat <= upper if lower is None else (stat >= lower) & (stat <= upper)  # (B,)
        final_keep &= keep
        sv = stat[has]
        low_m = 0.0 if lower is None else lower
        clipped = stat.clamp(low_m, upper)[:, None].expand_as(m)  # (B, T)
        c_mean = tok_mean(clipped)
        p = f"rollout_rs_{name}_"
        out |= {
            p + "mean": tok_mean(stat[:, None].expand_as(m)),
            p + "max": sv.max(),
            p + "min": sv.min(),
            p + "fraction_high": (sv > upper).double().mean(),
            p + "fraction_low": (sv < lower).double().mean() if lower is not None else torch.zeros(()),
            p + "std": (tok_mean(clipped**2) - c_mean**2).clamp_min(0).sqrt()
            if n_all > 1
            else torch.zeros(()),
            p + "seq_mean": sv.mean(),
            p + "seq_std": sv.std() if sv.numel() > 1 else torch.zeros(()),
            p + "seq_max": sv.max(),
            p + "seq_min": sv.min(),
            p + "seq_max_deviation": sv.abs().max(),
            p + "seq_fraction_high": (sv > upper).double().mean(),
        }
        if lower is not None:
            out[p + "seq_fraction_low"] = (sv < lower).double().mean()
        out[p + "masked_fraction"] = tok_mean((~keep).double()[:, None].expand_as(m))
        out[p + "seq_masked_fraction"] = (~keep & has).double().sum() / has.double().sum()
    if options:
        out["rollout_rs_masked_fraction"] = tok_mean((~final_keep).double()[:, None].expand_as(m))
        out["rollout_rs_seq_masked_fraction"] = (~final_keep & has).double().mean()
    values = torch.stack([v.double().reshape(()) for v in out.values()]).tolist()
    return {f"rollout_corr/{k}": v for k, v in zip(out, values, strict=True)}


def mean_ci(x: torch.Tensor, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lo, hi)`` of the values in ``x``: the mean and its two-sided Student-t interval.

    ``mean ± t_{(1+c)/2, n−1} · s / √n`` with ``s`` the sample standard deviation; the mean is ``nan``
    for an empty ``x``, the interval ``nan`` with fewer than 2 values.

    >>> [round(v, 4) for v in mean_ci(torch.tensor([1.0, 2.0, 3.0]))]
    [2.0, -0.4841, 4.4841]
    """
    x = x.double().reshape(-1)
    n = x.numel()
    mean = float(x.mean()) if n else _nan()
    if n < 2:
        return mean, _nan(), _nan()
    half = _student_t_quantile(0.5 + confidence / 2, n - 1) * float(x.std()) / math.sqrt(n)
    return mean, mean - half, mean + half


def kde_mode(x: torch.Tensor, grid: int = 512) -> float:
    """The mode of the values in ``x``: the peak of a Gaussian kernel density estimate.

    Bandwidth by Silverman's rule, ``h = 0.9 · min(s, IQR / 1.34) · n^(−1/5)``; the density is evaluated
    on ``grid`` points spanning the data and the highest one wins. Smoother (lower variance) than a
    histogram mode, whose answer moves with the bin width. ``nan`` for an empty ``x``; the value itself
    when all values are equal.

    >>> round(kde_mode(torch.tensor([0.0, 0.9, 1.0, 1.1, 1.2, 5.0])), 1)
    1.0
    """
    v = x.double().reshape(-1)
    if v.numel() == 0:
        return _nan()
    if v.numel() == 1 or bool((v == v[0]).all()):
        return float(v[0])
    q1, q3 = torch.quantile(v, torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    spread = min(float(v.std()), (q3 - q1) / 1.34) if q3 > q1 else float(v.std())
    h = 0.9 * spread * v.numel() ** -0.2
    points = torch.linspace(float(v.min()), float(v.max()), grid, dtype=torch.float64)  # (G,)
    density = torch.exp(-0.5 * ((points[:, None] - v[None, :]) / h) ** 2).sum(-1)  # (G,) up to a constant
    return float(points[density.argmax()])


def mode_ci(
    x: torch.Tensor, generator: torch.Generator, *, confidence: float = 0.95, n_boot: int = 200
) -> tuple[float, float, float]:
    """``(mode, lo, hi)``: :func:`kde_mode` of ``x`` and a percentile-bootstrap interval.

    Prop 4.3 is a statement about the *mode* of Δ given that a tail token was sampled, so the sampled-tail
    signature reports this beside :func:`mean_ci`. The interval is ``nan`` with fewer than 2 values.

    Args:
        x: the values (any shape).
        generator: seeds the bootstrap resamples (results are reproducible).
        confidence: level of the two-sided interval, in (0, 1).
        n_boot: bootstrap resamples.

    >>> mode, lo, hi = mode_ci(torch.tensor([0.0, 0.9, 1.0, 1.0, 1.1, 9.0]), torch.Generator().manual_seed(0))
    >>> round(mode, 1), lo <= mode <= hi
    (1.0, True)
    """
    x = x.double().reshape(-1)
    mode = kde_mode(x)
    if x.numel() < 2:
        return mode, _nan(), _nan()
    picks = torch.randint(0, x.numel(), (n_boot, x.numel()), generator=generator)  # (n_boot, n)
    boots = torch.tensor([kde_mode(x[row]) for row in picks], dtype=torch.float64)
    q = torch.tensor([0.5 - confidence / 2, 0.5 + confidence / 2], dtype=torch.float64)
    lo, hi = torch.quantile(boots, q).tolist()
    return mode, lo, hi


def sampled_tail_delta(
    logp_train: torch.Tensor,
    logp_infer: torch.Tensor,
    mask: torch.Tensor,
    p_max: float = 1e-3,
    *,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Mean Δ of sampled low-probability tokens with a confidence interval: the "positive mode" test.

    Prop 4.3 (Δ = log μ − log π, the paper's Δ'): conditioning on "the engine sampled token a" tilts its logit
    noise upwards, so for tail tokens (trainer probability ``p ≪ 1``) the mode of Δ is
    ``≈ σ²[(1 − p_a)(1 − p'_a) + Σ_{k≠a} p_k p'_k] > 0`` and its mean, what this estimates, is
    ``σ²(½ − 2p_a + (3/2)Σ_b p_b²) > 0`` (:mod:`workbench.theory.prop43`). This selects valid tokens
    with ``p = exp(logp_train) < p_max`` and reports their count, mean Δ, a two-sided ``confidence``
    interval ``mean ± t_{(1+c)/2, n−1} · s / √n`` (Student t, which tends to the normal approximation for
    large n; ``s`` is the sample standard deviation) and the fraction with Δ > 0. The mean is ``nan`` with
    no such token, the interval ``nan`` with fewer than 2. Works for any shape.

    Args:
        logp_train: ``[...]`` log π of the sampled tokens.
        logp_infer: ``[...]`` log μ of the same tokens.
        mask: ``[...]`` bool, True for valid tokens.
        p_max: select tokens with trainer probability below this, in (0, 1].
        confidence: level of the interval, in (0, 1). The key names say 95% but follow this value.

    Returns:
        ``{"mismatch/lowp_count", "mismatch/lowp_delta_mean", "mismatch/lowp_delta_ci_lo",
        "mismatch/lowp_delta_ci_hi", "mismatch/lowp_frac_positive"}``.

    >>> lt = torch.log(torch.tensor([1e-4, 2e-4, 0.9]))
    >>> li = lt + torch.tensor([0.3, 0.1, -0.5])
    >>> out = sampled_tail_delta(lt, li, torch.ones(3, dtype=torch.bool))
    >>> out["mismatch/lowp_count"], round(out["mismatch/lowp_delta_mean"], 4), out["mismatch/lowp_frac_positive"]
    (2.0, 0.2, 1.0)
    """
    _check_pair(logp_train, logp_infer, mask, ndim=None)
    _check_positive("p_max", p_max, upper=1.0)
    if not (isinstance(confidence, float) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence={confidence!r} must be a float in (0, 1), e.g. 0.95")
    lt = logp_train.double()[mask]  # (n,)
    d = logp_infer.double()[mask] - lt  # (n,) Δ
    d = d[lt < math.log(p_max)]  # (k,) sampled low-p tokens
    k = d.numel()
    mean, lo, hi = mean_ci(d, confidence)
    return {
        "mismatch/lowp_count": float(k),
        "mismatch/lowp_delta_mean": mean,
        "mismatch/lowp_delta_ci_lo": lo,
        "mismatch/lowp_delta_ci_hi": hi,
        "mismatch/lowp_frac_positive": float((d > 0).double().mean()) if k else _nan(),
    }


TAIL_METRIC_DOCS: dict[str, str] = {
    "mismatch/tail_tokens": "sampled tokens whose trainer probability is below e^-13 of the row max (tail draws)",
    "mismatch/tail_delta_mean": "mean Δ = log μ − log π over tail draws (0 when there are none)",
    "mismatch/tail_logp_mean": "mean trainer log π (full vocabulary) of the tail draws; nan when there are none",
    "mismatch/tail_seqs": "sequences holding at least one tail draw",
    "mismatch/tail_pos_adv": "tail draws in sequences with a positive advantage (the loss pushes them *up*)",
}
"""Keys emitted by :func:`tail_draw_metrics`. The trainer logs them every step, so
:data:`workbench.trainer.TRAINER_METRIC_DOCS` includes them (the glossary lists them there)."""


def tail_draw_metrics(
    stats: TokenStats,
    logp_infer: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    rho: float = DEFAULT_RHO,
) -> dict[str, float]:
    """Tail draws of a training batch: sampled tokens outside the safe set of ``rho``, whatever ρ the run uses.

    A tail draw is a valid token with trainer probability below ``rho`` (e^-13 by default) times its row's max,
    read off the token's gap to the row max (:meth:`workbench.dvp.TokenStats.outside`). Over them: the count,
    the mean ``Δ = log μ − stats.logp`` (``log π^mp`` under DVP), the mean full-vocabulary ``log π`` (the tail is
    about π, not π^mp), the sequences holding one, and the tail draws in sequences with a positive advantage
    (the policy gradient pushes those *up*). Reductions run in the inputs' dtype (fp32), as the trainer logs them.

    Args:
        stats: ``[N, T]`` trainer statistics of the sampled tokens, with ``gap`` and ``full_logp`` set
            (:func:`workbench.dvp.token_stats` and :func:`workbench.dvp.lm_head_token_stats` fill both).
        logp_infer: ``[N, T]`` engine log-probs ``log μ`` of the same tokens.
        mask: ``[N, T]`` bool, True for valid tokens.
        advantages: ``[N]`` per-sequence advantages.
        rho: the tail's threshold, in (0, 1].

    Returns:
        ``{key: float}`` for every key of :data:`TAIL_METRIC_DOCS`; with no tail draw ``tail_delta_mean`` is 0
        and ``tail_logp_mean`` is ``nan``.

    >>> from workbench.dvp import token_stats
    >>> z = torch.tensor([[[0.0, -20.0], [0.0, -1.0]], [[0.0, -1.0], [0.0, -1.0]]])  # (N=2, T=2, V=2)
    >>> st = token_stats(z, torch.tensor([[1, 1], [1, 1]]))  # row 0, t=0 draws a token 20 nats down
    >>> m = tail_draw_metrics(st, st.logp + 0.5, torch.ones(2, 2, dtype=torch.bool), torch.tensor([1.0, -1.0]))
    >>> m["mismatch/tail_tokens"], m["mismatch/tail_seqs"], m["mismatch/tail_pos_adv"]
    (1.0, 1.0, 1.0)
    >>> round(m["mismatch/tail_delta_mean"], 4), round(m["mismatch/tail_logp_mean"], 2)
    (0.5, -20.0)
    """
    if stats.full_logp is None:
        raise ValueError(
            "stats.full_logp is None; pass TokenStats from dvp.token_stats or dvp.lm_head_token_stats"
        )
    tail = stats.outside(rho, mask)  # (N, T)
    delta = (logp_infer - stats.logp.detach())[tail]  # (n_tail,)
    tail_logp = stats.full_logp[tail]  # (n_tail,)
    return {
        "mismatch/tail_tokens": float(tail.sum()),
        "mismatch/tail_delta_mean": float(delta.mean()) if delta.numel() else 0.0,
        "mismatch/tail_logp_mean": float(tail_logp.mean()) if tail_logp.numel() else _nan(),
        "mismatch/tail_seqs": float(tail.any(-1).sum()),
        "mismatch/tail_pos_adv": float(tail[advantages > 0].sum()),
    }


def delta_by_prob_bin(
    logp_train: torch.Tensor,
    logp_infer: torch.Tensor,
    mask: torch.Tensor,
    edges: Sequence[float] | torch.Tensor = DEFAULT_P_EDGES,
) -> list[dict[str, float]]:
    """The mismatch signature: Δ = log μ − log π of sampled tokens binned by trainer probability.

    ``p = exp(logp_train)``; bin ``i`` holds ``edges[i] ≤ p < edges[i+1]`` (the last bin also holds
    ``p = edges[-1]``); tokens outside ``[edges[0], edges[-1]]`` are left out. Prop 4.2 predicts
    ``|Δ| ≤ 2ε (1 − p)`` (small for confident tokens), Prop 4.3 a positive mean Δ in the sampled tail.
    Works for any shape; only ``mask``-ed positions are read.

    Args:
        logp_train: ``[...]`` log π of the sampled tokens.
        logp_infer: ``[...]`` log μ of the same tokens.
        mask: ``[...]`` bool, True for valid tokens.
        edges: strictly increasing probabilities in [0, 1], at least two.

    Returns:
        One dict per bin: ``lo``, ``hi``, ``count``, ``mean_delta``, ``mean_abs_delta``, ``frac_positive``
        (means ``nan`` for an empty bin).

    >>> lt = torch.log(torch.tensor([0.05, 0.6, 0.95]))
    >>> bins = delta_by_prob_bin(lt, lt + 0.1, torch.ones(3, dtype=torch.bool), edges=[0.0, 0.5, 1.0])
    >>> [(b["lo"], b["hi"], b["count"], round(b["mean_delta"], 6)) for b in bins]
    [(0.0, 0.5, 1.0, 0.1), (0.5, 1.0, 2.0, 0.1)]
    """
    _check_pair(logp_train, logp_infer, mask, ndim=None)
    e = _check_edges(edges).to(logp_train.device)  # (E,)
    n_bins = e.numel() - 1
    lt = logp_train.double()[mask]  # (n,)
    d = logp_infer.double()[mask] - lt  # (n,)
    p = lt.exp()
    idx = torch.bucketize(p, e, right=True) - 1  # edges[i] <= p < edges[i+1]  ->  i
    idx = torch.where(p == e[-1], n_bins - 1, idx)  # close the last bin on the right
    keep = (idx >= 0) & (idx < n_bins)
    idx, d = idx[keep], d[keep]
    count = torch.bincount(idx, minlength=n_bins).double()  # (n_bins,)
    s = torch.bincount(idx, weights=d, minlength=n_bins)
    s_abs = torch.bincount(idx, weights=d.abs(), minlength=n_bins)
    n_pos = torch.bincount(idx, weights=(d > 0).double(), minlength=n_bins)
    rows = torch.stack([e[:-1], e[1:], count, s / count, s_abs / count, n_pos / count], dim=1)  # 0/0 -> nan
    names = ("lo", "hi", "count", "mean_delta", "mean_abs_delta", "frac_positive")
    return [dict(zip(names, row)) for row in rows.tolist()]


# ----------------------------------------------------------------------------------------------------
# safe sets


def _check_logits(name: str, logits: object) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        got = (
            f"dtype {logits.dtype}, shape {tuple(logits.shape)}"
            if isinstance(logits, torch.Tensor)
            else type(logits).__name__
        )
        raise ValueError(f"{name} must be a floating-point tensor [..., V] of logits (got {got})")
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} has an empty vocabulary dimension (shape {tuple(logits.shape)})")
    return logits


def _rows_per_chunk(vocab: int, chunk_size: int | None) -> int:
    """``chunk_size``, or (None) as many rows as fit one fp32 block of ``dvp.DEFAULT_BLOCK_BYTES``."""
    return chunk_size if chunk_size is not None else max(1, DEFAULT_BLOCK_BYTES // (4 * vocab))


def _row_blocks(
    xs: Sequence[torch.Tensor], chunk: int, start: int = 0
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Walk same-shape ``[..., V]`` tensors in lockstep, ``≤ chunk`` rows at a time, without copying.

    Yields ``(first_row, [block, ...])`` with 2-D ``[c, V]`` views; an input that cannot be viewed as
    ``[N, V]`` (e.g. ``logits[:, :-1]``) is walked one leading index at a time instead of being copied.
    """
    vocab = xs[0].shape[-1]
    try:
        flats = [x.view(-1, vocab) for x in xs]  # (N, V) views
    except RuntimeError:
        for subs in zip(*(x.unbind(0) for x in xs)):
            yield from _row_blocks(subs, chunk, start)
            start += subs[0].numel() // vocab
        return
    for i in range(0, flats[0].shape[0], chunk):
        yield start + i, [f[i : i + chunk] for f in flats]


def _blank_invalid(block: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Zero the logits of invalid rows (padding may hold NaN, which the safe-set rule rejects)."""
    return block if bool(valid.all()) else torch.where(valid[:, None], block, 0.0)  # (c, V)


@torch.no_grad()
def safe_set_overlap(
    logits_train: torch.Tensor,
    logits_infer: torch.Tensor,
    rho: float | None,
    *,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position overlap ``|V_S ∩ V'_S| / |V_S|`` of the trainer's and the engine's safe sets.

    ``V_S`` is the trainer's safe set (:func:`workbench.dvp.safe_mask` at ``rho``) and ``V'_S`` the
    engine's at the same ``rho``. 1 means every token the trainer keeps, the engine keeps too (swap the
    arguments for the engine-side view: a boundary token makes *that* overlap < 1). Rows are processed a
    chunk at a time, so ``[N, 150k]`` logits need only ``[chunk, V]`` scratch, never an ``[N, V]`` mask;
    non-contiguous inputs such as ``logits[:, :-1]`` are read in place.

    Args:
        logits_train: ``[..., V]`` trainer logits.
        logits_infer: ``[..., V]`` engine logits at the same positions (same vocabulary size: slice a
            padded engine vocabulary to the tokenizer's first).
        rho: min-p threshold in (0, 1]; ``None`` (no pruning) gives all ones.
        mask: optional ``[...]`` bool; positions where it is False (padding, whose logits may be NaN)
            are not read and come back as ``nan``.
        chunk_size: rows per chunk; ``None`` sizes chunks like :mod:`workbench.dvp` (32 MiB fp32 blocks).
        temperature: logits are divided by this before the safe-set rule, as the sampler does.

    Returns:
        ``[...]`` float32 in (0, 1] (``nan`` where ``mask`` is False).

    >>> zt = torch.tensor([[0.0, -1.0, -20.0], [0.0, -1.0, -5.0]])
    >>> zi = torch.tensor([[0.0, -20.0, -20.0], [0.0, -1.0, -1.0]])
    >>> safe_set_overlap(zt, zi, rho=1e-3)
    tensor([0.5000, 1.0000])
    """
    validate_rho(rho)
    _check_chunk_size(chunk_size)
    _check_positive("temperature", temperature)
    _check_logits("logits_train", logits_train)
    _check_logits("logits_infer", logits_infer)
    if logits_infer.shape != logits_train.shape:
        raise ValueError(
            f"logits_infer has shape {tuple(logits_infer.shape)} but logits_train has shape "
            f"{tuple(logits_train.shape)}; pass logits of the same positions over the same vocabulary "
            "(slice a padded vocabulary with [..., :V])"
        )
    lead, vocab, dev = logits_train.shape[:-1], logits_train.shape[-1], logits_train.device
    valid = torch.ones(lead, dtype=torch.bool, device=dev) if mask is None else _check_mask(mask, lead)
    valid_flat = valid.reshape(-1)  # (N,)
    if rho is None:
        return torch.where(valid, 1.0, float("nan")).float()
    out = torch.empty(valid_flat.shape[0], dtype=torch.float32, device=dev)  # (N,)
    chunk = _rows_per_chunk(vocab, chunk_size)
    for i, (zt, zi) in _row_blocks((logits_train, logits_infer), chunk):
        ok = valid_flat[i : i + zt.shape[0]]  # (c,)
        m_t = safe_mask(_blank_invalid(zt, ok), rho, temperature=temperature, chunk_size=chunk)  # (c, V)
        m_i = safe_mask(_blank_invalid(zi, ok), rho, temperature=temperature, chunk_size=chunk)  # (c, V)
        out[i : i + zt.shape[0]] = (m_t & m_i).sum(-1).float() / m_t.sum(-1).float()
    return torch.where(valid_flat, out, float("nan")).reshape(lead)


@torch.no_grad()
def boundary_tokens(
    logits_train: torch.Tensor,
    tokens: torch.Tensor,
    rho: float | None,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Sampled tokens outside the trainer's safe set: the engine kept them, the trainer prunes them.

    A sampled token was inside the engine's safe set (it was sampled from ``μ^mp``), so a token outside
    the trainer's ``V_S`` marks a safe-set disagreement: its trainer log-prob under DVP sits near the mask
    value, and the loss should mask or veto it (THEORY.md, Section 5). Uses
    :func:`workbench.dvp.token_in_safe_set` (the row max and the token's logit: no ``[..., V]`` mask), so the cut
    is bit-identical to the one :func:`workbench.dvp.token_logprobs` applies.

    Args:
        logits_train: ``[..., V]`` trainer logits at the positions the tokens were sampled.
        tokens: ``[...]`` sampled token ids in ``[0, V)`` (integer tensor).
        rho: min-p threshold in (0, 1]; ``None`` means no pruning, so nothing is a boundary token.
        mask: optional ``[...]`` bool; positions where it is False are reported False, and neither their
            token ids (padding may hold any id) nor their logits (may be NaN) are used.
        temperature: logits are divided by this before the safe-set rule, as the sampler does.

    Returns:
        ``[...]`` bool, True where the token lies outside the trainer's safe set.

    >>> z = torch.tensor([[0.0, -1.0, -20.0], [0.0, -1.0, -20.0]])
    >>> boundary_tokens(z, torch.tensor([1, 2]), rho=1e-3)
    tensor([False,  True])
    """
    validate_rho(rho)
    _check_positive("temperature", temperature)
    _check_logits("logits_train", logits_train)
    lead, vocab, dev = logits_train.shape[:-1], logits_train.shape[-1], logits_train.device
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.dtype == torch.bool:
        got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an integer tensor of token ids (got {got}); pass tokens.long()")
    if tokens.shape != lead:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)} but logits_train has positions {tuple(lead)}; "
            "pass one sampled id per logits row"
        )
    valid = torch.ones(lead, dtype=torch.bool, device=dev) if mask is None else _check_mask(mask, lead)
    ids = torch.where(valid, tokens, 0).long()  # (...,) padding -> id 0
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)][0].item()
        raise ValueError(
            f"tokens contains id {bad} outside [0, {vocab}); pass mask= to skip padding ids, "
            "or check that tokenizer and logits share a vocabulary"
        )
    return ~token_in_safe_set(logits_train, ids, rho, temperature=temperature, mask=valid)  # invalid: inside


def boundary_from_logprobs(logp_mp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Boundary tokens read from DVP log-probs alone, for callers that never see logits (verl's loss).

    A token outside the trainer's safe set gets ``log π^mp = −MASK_MARGIN − log Σ_{V_S} e^{z − max} ≤
    −MASK_MARGIN`` (:func:`workbench.dvp.token_logprobs`), a token inside at least ``log ρ − log |V|``. The
    cut at ``−MASK_MARGIN / 2`` separates the two for every ``ρ > e^{−500} |V|``, so this equals
    :func:`boundary_tokens` on the logits the log-probs came from.

    Args:
        logp_mp: ``[...]`` ``log π^mp`` of the sampled tokens (any float dtype).
        mask: ``[...]`` bool, valid tokens (others are reported False).

    Returns:
        ``[...]`` bool, True where the token was pruned by the trainer.

    >>> boundary_from_logprobs(torch.tensor([-0.1, -1000.7, -1000.7]), torch.tensor([True, True, False]))
    tensor([False,  True, False])
    """
    return mask & (logp_mp.detach() < -MASK_MARGIN / 2)


# ----------------------------------------------------------------------------------------------------
# DVP summary


def dvp_metrics(stats: TokenStats, mask: torch.Tensor) -> dict[str, float]:
    """Summarise a :class:`workbench.dvp.TokenStats` over valid positions (keys: :data:`DVP_METRIC_DOCS`).

    ``1 − Z`` is computed as ``−expm1(logz)`` so a tiny pruned mass (1e-9) is not lost to rounding.
    With no valid position every value is ``nan``.

    Args:
        stats: per-position ``logp``, ``logz``, ``entropy``, ``safe_size`` of shape ``[...]``.
        mask: ``[...]`` bool, True for valid positions.

    Returns:
        ``{key: float}`` for every key of :data:`DVP_METRIC_DOCS`.

    >>> from workbench.dvp import TokenStats
    >>> st = TokenStats(logp=torch.log(torch.tensor([0.5, 0.5])), logz=torch.log(torch.tensor([0.9, 1.0])),
    ...                 entropy=torch.tensor([1.0, 0.0]), safe_size=torch.tensor([3, 7]))
    >>> m = dvp_metrics(st, torch.tensor([True, True]))
    >>> round(m["dvp/one_minus_z_mean"], 6), round(m["dvp/one_minus_z_max"], 6), m["dvp/safe_size_min"]
    (0.05, 0.1, 3.0)
    """
    fields = {}
    for name in ("logp", "logz", "entropy", "safe_size"):
        x = getattr(stats, name, None)
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"stats.{name} must be a tensor (got {type(x).__name__}); pass dvp.token_stats(...)"
            )
        fields[name] = x
    shape = fields["logz"].shape
    for name, x in fields.items():
        if x.shape != shape:
            raise ValueError(
                f"stats.{name} has shape {tuple(x.shape)} but stats.logz has shape {tuple(shape)}; "
                "pass a TokenStats from one dvp.token_stats call"
            )
    _check_mask(mask, shape)
    keys = list(DVP_METRIC_DOCS)
    if not bool(mask.any()):
        return dict.fromkeys(keys, _nan())
    with torch.no_grad():
        one_minus_z = -torch.expm1(fields["logz"].detach().double()[mask])  # (n,)
        size = fields["safe_size"].detach().double()[mask]
        values = torch.stack(
            [
                one_minus_z.mean(),
                one_minus_z.max(),
                size.mean(),
                size.min(),
                fields["entropy"].detach().double()[mask].mean(),
                fields["logp"].detach().double()[mask].mean(),
            ]
        )
    return dict(zip(keys, values.tolist()))
