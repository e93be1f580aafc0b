"""Importance-sampling (IS) corrections for training–inference mismatch.

The rollout engine samples from ``μ`` (low precision, other kernels, min-p renormalised) while the trainer
differentiates ``π``. With the per-token ratio ``r_t = π(y_t|s_t) / μ(y_t|s_t)`` this module turns the two
log-prob tensors into stop-gradient weights and a keep mask, one estimator per ``mode`` (THEORY.md,
"Importance-sampling corrections"):

==============  ======================================================  ====================  ===============
mode            weight on the sequence's tokens                         level                 default bounds
==============  ======================================================  ====================  ===============
``none``        1 (naive estimator: no correction, no veto)             token                 —
``token_tis``   ``min(r_t, hi)``                                        token                 hi = 2.0
``token_mis``   ``r_t · 1[lo ≤ r_t ≤ hi]`` (masked tokens dropped)      token                 [0.5, 2.0]
``seq_is``      ``r(y) = Π_t r_t`` (unbiased, variance exp. in T)       sequence              —
``seq_tis``     ``min(r(y), hi)``                                       sequence              hi = 2.0
``seq_mis``     ``r(y) · 1[lo ≤ r(y) ≤ hi]`` (masked seqs dropped)      sequence              [0.5, 2.0]
``geo_mask``    ``1[lo ≤ r(y)^{1/T} ≤ hi]`` (no weight, only a mask)    sequence (geometric)  [0.999, 1.001]
==============  ======================================================  ====================  ===============

Default bounds follow THEORY.md's typical thresholds and verl's presets: a token cap of 2.0 (THEORY: 1.5–5;
verl ``decoupled_token_is``), a sequence cap of 2.0 (THEORY: 2–10; verl ``decoupled_seq_is``), seq-MIS
``[0.5, 2]`` (THEORY; verl ``decoupled_seq_is_rs``) and the geometric window ``[0.999, 1.001]`` (THEORY's
tightest value; verl ``decoupled_geo_rs``). The geometric window is tight: on short toy responses with bf16
mismatch it can mask many sequences — widen it (e.g. ``lo=0.99``) and watch ``is/frac_masked``.
When only one bound of a window is given, the other is its reciprocal (verl's rule), so ``hi=1.5`` means
``[1/1.5, 1.5]``. Every window must contain 1 (``0 < lo ≤ 1 ≤ hi``): a perfectly matched sample must pass
unchanged, so identical log-probs always give weights of exactly 1.

Veto (all modes but ``none``): drop the whole sequence if any valid token has ``r_t < veto`` (default 1e-4,
``None`` disables). All ratios are computed in log space; log-ratios are clamped to ``±log_clamp``
(default 20) only right before ``exp`` — comparisons with bounds use the exact log-ratio.
Weights are always detached (``loss = −w.detach() · A · log π``): they change the measure, not the objective.

Padding never matters: positions where ``mask`` is False may hold anything (even NaN/inf); they affect neither
weights nor statistics.

Example:
    >>> import torch
    >>> logp_train = torch.tensor([[-0.1, -1.0, -2.0]])
    >>> logp_infer = torch.tensor([[-1.0, -1.0, -2.0]])
    >>> mask = torch.tensor([[True, True, False]])
    >>> res = importance_weights(logp_train, logp_infer, mask, mode="token_tis", hi=2.0)
    >>> res.weights.tolist()  # r_0 = e^0.9 ≈ 2.46 is capped at 2; the padding position gets 0
    [[2.0, 1.0, 0.0]]
    >>> res.stats["is/frac_truncated"]
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DEFAULT_LOG_CLAMP",
    "DEFAULT_VETO",
    "IS_METRIC_DOCS",
    "IS_MODES",
    "MODE_DEFAULT_BOUNDS",
    "VERL_PRESETS",
    "ISConfig",
    "ISResult",
    "importance_weights",
    "resolve_bounds",
]

IS_MODES: tuple[str, ...] = ("none", "token_tis", "token_mis", "seq_is", "seq_tis", "seq_mis", "geo_mask")
_TOKEN_LEVEL = ("none", "token_tis", "token_mis")
_TIS_MODES = ("token_tis", "seq_tis")
_WINDOW_MODES = ("token_mis", "seq_mis", "geo_mask")
_UNBOUNDED_MODES = ("none", "seq_is")

#: Default ``(lo, hi)`` per mode; ``None`` means "no such bound". Sources in the module docstring.
MODE_DEFAULT_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "none": (None, None),
    "token_tis": (None, 2.0),  # THEORY: token cap 1.5–5; verl decoupled_token_is(threshold=2.0)
    "token_mis": (0.5, 2.0),  # reciprocal window around the token cap
    "seq_is": (None, None),  # untruncated: unbiased, variance exponential in T
    "seq_tis": (None, 2.0),  # THEORY: sequence cap 2–10; verl decoupled_seq_is(threshold=2.0)
    "seq_mis": (0.5, 2.0),  # THEORY: seq-MIS [0.5, 2]; verl decoupled_seq_is_rs("0.5_2.0")
    "geo_mask": (0.999, 1.001),  # THEORY: [0.999, 1.001] … [0.5, 2]; verl decoupled_geo_rs("0.999_1.001")
}
DEFAULT_VETO: float = 1e-4  # THEORY: veto τ = 1e-4 ("When Speed Kills Stability")
DEFAULT_LOG_CLAMP: float = 20.0  # THEORY: clamp log-ratios at ±20 before exp (verl SAFETY_BOUND)

IS_METRIC_DOCS: dict[str, str] = {
    "is/token_ratio_mean": "before correction: mean of r_t = π/μ over valid tokens (log-ratio clamped at ±log_clamp)",
    "is/token_ratio_min": "before correction: min of r_t over valid tokens",
    "is/token_ratio_max": "before correction: max of r_t over valid tokens (e^log_clamp when clamped)",
    "is/token_ess": "before correction: ESS of the normalised token ratios, (Σr)²/(n·Σr²) in (0, 1]; want > 0.5",
    "is/seq_ratio_mean": "before correction: mean of the sequence ratio r(y) = Π_t r_t over sequences with valid tokens",
    "is/seq_ratio_min": "before correction: min of r(y) over sequences with valid tokens",
    "is/seq_ratio_max": "before correction: max of r(y) over sequences with valid tokens",
    "is/seq_ess": "before correction: ESS of the normalised sequence ratios, (Σr)²/(n·Σr²)",
    "is/geo_ratio_mean": "before correction: mean of the geometric ratio r(y)^{1/T} over sequences with valid tokens",
    "is/geo_ratio_min": "before correction: min of r(y)^{1/T}",
    "is/geo_ratio_max": "before correction: max of r(y)^{1/T}",
    "is/weight_mean": "after correction: mean applied weight over kept units at the mode's level "
    "(tokens for none/token_*, sequences otherwise)",
    "is/weight_min": "after correction: min applied weight over kept units",
    "is/weight_max": "after correction: max applied weight over kept units",
    "is/weight_ess": "after correction: ESS (Σw)²/(n·Σw²) of the applied weights over kept units (0 if none kept)",
    "is/frac_truncated": "fraction of valid units whose ratio exceeded hi and was capped (TIS modes; 0 otherwise)",
    "is/frac_masked": "fraction of valid units outside [lo, hi] and dropped (MIS / geo_mask modes; 0 otherwise)",
    "is/frac_vetoed": "fraction of sequences with valid tokens dropped by the veto (some valid r_t < veto)",
    "is/frac_clamped": "fraction of valid units whose |log-ratio| exceeded log_clamp before exp",
    "is/frac_tokens_kept": "kept tokens / valid tokens (what reaches the loss)",
    "is/frac_seqs_kept": "kept sequences / sequences with valid tokens",
    "is/tokens": "number of valid tokens (mask=True)",
    "is/seqs": "number of sequences with at least one valid token",
}


# --------------------------------------------------------------------------------------------- validation
def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_positive_finite(name: str, value: object, mode: str) -> float:
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) <= 0:  # type: ignore[arg-type]
        d_lo, d_hi = MODE_DEFAULT_BOUNDS[mode]
        raise ValueError(
            f"{name}={value!r} for mode={mode!r} must be a finite ratio bound > 0 (0 < lo ≤ 1 ≤ hi); "
            f"the defaults for {mode} are lo={d_lo}, hi={d_hi}."
        )
    return float(value)  # type: ignore[arg-type]


def resolve_bounds(
    mode: str, lo: float | None = None, hi: float | None = None
) -> tuple[float | None, float | None]:
    """Fill in and validate the ratio bounds of ``mode``.

    Rules: ``none``/``seq_is`` take no bounds; TIS modes take only ``hi`` (the lower bound is irrelevant
    to truncation); window modes (``token_mis``, ``seq_mis``, ``geo_mask``) take both, a missing one being
    the reciprocal of the other and both missing meaning the mode default. Every bound satisfies
    ``0 < lo ≤ 1 ≤ hi < ∞``.

    Args:
        mode: one of :data:`IS_MODES`.
        lo: lower ratio bound or None.
        hi: upper ratio bound or None.

    Returns:
        ``(lo, hi)`` with ``None`` where the mode has no such bound.

    Raises:
        ValueError: unknown mode, a bound the mode does not use, or a bound outside its range.

    >>> resolve_bounds("token_mis", hi=4.0)
    (0.25, 4.0)
    >>> resolve_bounds("seq_tis")
    (None, 2.0)
    """
    if mode not in IS_MODES:
        raise ValueError(f"mode={mode!r} is not an IS mode; choose one of {IS_MODES}.")
    if mode in _UNBOUNDED_MODES:
        if lo is not None or hi is not None:
            hint = "seq_tis or seq_mis" if mode == "seq_is" else "token_tis / token_mis / seq_* / geo_mask"
            raise ValueError(
                f"mode={mode!r} takes no bounds but got lo={lo!r}, hi={hi!r}; leave both None or use {hint}."
            )
        return None, None
    if mode in _TIS_MODES:
        if lo is not None:
            raise ValueError(
                f"lo={lo!r} has no effect for mode={mode!r} (truncation only caps weights at hi); "
                f"leave lo=None or use mode={mode.replace('tis', 'mis')!r} to mask ratios below lo."
            )
        hi_v = MODE_DEFAULT_BOUNDS[mode][1] if hi is None else _check_positive_finite("hi", hi, mode)
        assert hi_v is not None
        if hi_v < 1.0:
            raise ValueError(
                f"hi={hi_v!r} for mode={mode!r} must be in [1, inf): a cap below 1 would change the weight of "
                f"perfectly matched samples; use hi ≥ 1 (typical {mode} caps: 1.5–10)."
            )
        return None, hi_v
    # window modes
    d_lo, d_hi = MODE_DEFAULT_BOUNDS[mode]
    lo_v = None if lo is None else _check_positive_finite("lo", lo, mode)
    hi_v = None if hi is None else _check_positive_finite("hi", hi, mode)
    if lo_v is None and hi_v is None:
        lo_v, hi_v = d_lo, d_hi
    elif lo_v is None:
        assert hi_v is not None
        lo_v = 1.0 / hi_v
    elif hi_v is None:
        hi_v = 1.0 / lo_v
    assert lo_v is not None and hi_v is not None
    if lo_v > hi_v:
        raise ValueError(
            f"lo={lo_v!r} > hi={hi_v!r} for mode={mode!r}; the window needs lo ≤ 1 ≤ hi, swap them."
        )
    if not lo_v <= 1.0 <= hi_v:
        raise ValueError(
            f"mode={mode!r} window [lo={lo_v!r}, hi={hi_v!r}] must contain 1 (0 < lo ≤ 1 ≤ hi): otherwise "
            f"perfectly matched samples are masked; e.g. lo={d_lo}, hi={d_hi}."
        )
    return lo_v, hi_v


def _validate_veto(veto: object) -> float | None:
    if veto is None:
        return None
    if not _is_number(veto) or not 0.0 < float(veto) < 1.0:
        raise ValueError(
            f"veto={veto!r} must be in (0, 1) (a token-ratio threshold, default {DEFAULT_VETO}) or None to disable the veto."
        )
    return float(veto)


def _validate_log_clamp(log_clamp: object) -> float:
    if not _is_number(log_clamp) or not math.isfinite(float(log_clamp)) or float(log_clamp) <= 0:
        raise ValueError(
            f"log_clamp={log_clamp!r} must be a finite number > 0 (log-ratios are clamped to ±log_clamp before exp); "
            f"the default is {DEFAULT_LOG_CLAMP} (e^20 ≈ 4.9e8)."
        )
    return float(log_clamp)


def _check_inputs(logp_train: torch.Tensor, logp_infer: torch.Tensor, mask: torch.Tensor) -> None:
    for name, t in (("logp_train", logp_train), ("logp_infer", logp_infer), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape [B, T], got {type(t).__name__}.")
        if t.dim() != 2:
            raise ValueError(
                f"{name} must have shape [B, T] (2-D), got shape {tuple(t.shape)}; reshape it to [B, T]."
            )
    if logp_train.shape != logp_infer.shape or logp_train.shape != mask.shape:
        raise ValueError(
            f"shapes must match: logp_train {tuple(logp_train.shape)}, logp_infer {tuple(logp_infer.shape)}, "
            f"mask {tuple(mask.shape)}; all three are [B, T] over the response tokens."
        )
    for name, t in (("logp_train", logp_train), ("logp_infer", logp_infer)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor of log-probs, got dtype {t.dtype}.")
    if mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor (True = valid response token), got dtype {mask.dtype}; use mask.bool()."
        )


# ------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ISConfig:
    """Which importance-sampling correction to apply (see the module docstring for the estimators).

    ``ISConfig.from_verl`` reads the same settings written with verl's key names.
    """

    mode: str = "none"
    """One of :data:`IS_MODES`; ``"none"`` is the naive estimator (weights 1, no veto, stats still logged)."""
    lo: float | None = None
    """Lower ratio bound (window modes only); None = reciprocal of ``hi`` or the mode default."""
    hi: float | None = None
    """Upper ratio bound / truncation cap; None = reciprocal of ``lo`` or the mode default."""
    veto: float | None = DEFAULT_VETO
    """Drop a sequence if any valid token ratio is below this (in (0, 1)); None disables. Ignored by mode none."""
    log_clamp: float = DEFAULT_LOG_CLAMP
    """Log-ratios are clamped to ±log_clamp before exponentiating."""

    def __post_init__(self) -> None:
        resolve_bounds(self.mode, self.lo, self.hi)
        _validate_veto(self.veto)
        _validate_log_clamp(self.log_clamp)

    @property
    def bounds(self) -> tuple[float | None, float | None]:
        """The effective ``(lo, hi)`` after defaults (``None`` where the mode has no such bound)."""
        return resolve_bounds(self.mode, self.lo, self.hi)

    def apply(self, logp_train: torch.Tensor, logp_infer: torch.Tensor, mask: torch.Tensor) -> ISResult:
        """Compute the weights of this configuration; same as :func:`importance_weights`."""
        return _compute(self, logp_train, logp_infer, mask)

    @classmethod
    def from_verl(cls, config: Mapping[str, Any] | str, *, log_clamp: float = DEFAULT_LOG_CLAMP) -> ISConfig:
        """Build an ISConfig from a verl rollout-correction config (any of verl's three spellings) or preset.

        verl has spelled this feature three ways; all are accepted, flat or nested under ``algorithm`` and/or
        ``rollout_correction``:

        1. ``algorithm.rollout_is_*`` (2025-10): ``rollout_is`` (bool: apply weights; False = metrics only),
           ``rollout_is_threshold`` (upper; null disables), ``rollout_is_threshold_lower`` (null = 1/upper),
           ``rollout_is_level`` ("token" | "sequence" | "geometric"), ``rollout_is_mode`` ("truncate" |
           "mask"; the older name "clip" = "mask"), ``rollout_is_veto_threshold``.
        2. ``algorithm.rollout_correction`` (2025-11): ``rollout_is`` ("token" | "sequence" | null, truncated
           weights), ``rollout_is_threshold``, ``rollout_rs`` ("token" | "sequence" | "geometric" | null,
           rejection), ``rollout_rs_threshold``, ``rollout_rs_threshold_lower`` (null = 1/upper),
           ``rollout_token_veto_threshold``.
        3. newer ``rollout_correction``: ``rollout_is_threshold`` as a float (TIS) or a ``"lo_hi"`` string such as
           ``"0.5_2.0"`` (IcePop: zero weights outside the window); ``rollout_rs`` as ``"token_k1"``,
           ``"seq_sum_k1"`` or ``"seq_mean_k1"`` with a ``"lo_hi"`` ``rollout_rs_threshold``. verl's k1 bounds
           apply to ``log μ/π``, so ``"a_b"`` becomes the π/μ window ``[1/b, 1/a]`` here (identical for verl's
           reciprocal presets such as ``"0.5_2.0"``). A preset name from :data:`VERL_PRESETS`
           (e.g. ``"decoupled_geo_rs"``) may be passed instead of a mapping.

        Mapping to modes: IS only → ``{token,seq}_tis`` (truncate) or ``{token,seq}_mis`` (mask / IcePop);
        geometric mask or geometric RS only → ``geo_mask``; truncated IS plus rejection at the same level with
        ``rs_hi ≤ is_hi`` → ``{token,seq}_mis`` on the RS window; nothing enabled → ``none``.
        Differences from verl, by design: masked tokens leave the loss *and* its normaliser (verl's IcePop keeps
        them in the denominator with weight 0); ``geo_mask`` applies weight 1 inside the window (verl's 2025-10
        geometric mask applied the geometric ratio, which differs from 1 by at most the window width); an
        absent veto key means no veto (verl's default), a veto of 0 means none; ``rollout_is: false`` means
        mode ``none`` with no rejection at all.
        Not representable (ValueError): rejection without IS at token/sequence level, combinations of
        different levels (e.g. verl ``decoupled_geo_rs_seq_tis``), k2/k3 rejection, ``rollout_is_batch_normalize``,
        geometric truncation. Keys that only choose verl's loss (``bypass_mode``, ``loss_type``,
        ``use_policy_gradient``, …) are ignored: pick ``loss_type`` in :func:`workbench.rloo.policy_loss`.

        Args:
            config: verl mapping (or preset name).
            log_clamp: log-ratio clamp for the result (verl's SAFETY_BOUND is also 20).

        Returns:
            The equivalent :class:`ISConfig`.

        Raises:
            ValueError: unknown key, unknown value, or a combination this workbench cannot express.

        >>> ISConfig.from_verl({"rollout_is": True, "rollout_is_threshold": 2.0, "rollout_is_level": "token",
        ...                     "rollout_is_mode": "truncate", "rollout_is_veto_threshold": 1e-4})
        ISConfig(mode='token_tis', lo=None, hi=2.0, veto=0.0001, log_clamp=20.0)
        >>> ISConfig.from_verl({"rollout_correction": {"rollout_is": "sequence", "rollout_is_threshold": "0.5_2.0"}})
        ISConfig(mode='seq_mis', lo=0.5, hi=2.0, veto=None, log_clamp=20.0)
        """
        mode, lo, hi, veto = _parse_verl(config)
        return cls(mode=mode, lo=lo, hi=hi, veto=veto, log_clamp=log_clamp)


@dataclass
class ISResult:
    """Output of :func:`importance_weights`.

    Attributes:
        weights: ``[B, T]`` float32, detached; the IS weight of each token, 0 where ``keep`` is False.
        keep: ``[B, T]`` bool; the token participates in the loss (valid, not masked, not vetoed).
        seq_keep: ``[B]`` bool; the sequence was neither masked nor vetoed (use as ``valid`` for the RLOO
            baseline). A sequence without valid tokens is not rejected (True).
        stats: ``{"is/…": float}``, every key documented in :data:`IS_METRIC_DOCS`.
    """

    weights: torch.Tensor
    keep: torch.Tensor
    seq_keep: torch.Tensor
    stats: dict[str, float]


# ------------------------------------------------------------------------------------------------ compute
def importance_weights(
    logp_train: torch.Tensor,
    logp_infer: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "none",
    *,
    lo: float | None = None,
    hi: float | None = None,
    veto: float | None = DEFAULT_VETO,
    log_clamp: float = DEFAULT_LOG_CLAMP,
) -> ISResult:
    """Importance weights ``π/μ`` of sampled tokens, corrected by ``mode``, plus before/after statistics.

    Args:
        logp_train: ``[B, T]`` trainer log-probs ``log π(y_t|s_t)`` of the sampled tokens (may require grad;
            the weights never do).
        logp_infer: ``[B, T]`` rollout-engine log-probs ``log μ(y_t|s_t)`` of the same tokens.
        mask: ``[B, T]`` bool, True on valid response tokens. Other positions may hold any value (NaN, inf).
        mode: one of :data:`IS_MODES` (table in the module docstring).
        lo: lower ratio bound (window modes); None = reciprocal of ``hi`` or the mode default.
        hi: upper ratio bound / cap; None = reciprocal of ``lo`` or the mode default.
        veto: drop a sequence if any valid token ratio is below this; None disables; ignored by ``none``.
        log_clamp: clamp log-ratios to ``±log_clamp`` before ``exp``.

    Returns:
        :class:`ISResult` with detached float32 ``weights`` (0 where not kept), ``keep``, ``seq_keep`` and
        ``stats`` (keys of :data:`IS_METRIC_DOCS`).

    Raises:
        ValueError: bad shapes/dtypes, a non-bool mask, non-finite log-probs at valid positions, or bad
            mode/bounds/veto/log_clamp.

    >>> lp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    >>> res = importance_weights(lp, lp, torch.ones(2, 2, dtype=torch.bool), mode="seq_mis")
    >>> res.weights.tolist(), res.seq_keep.tolist()
    ([[1.0, 1.0], [1.0, 1.0]], [True, True])
    """
    cfg = ISConfig(mode=mode, lo=lo, hi=hi, veto=veto, log_clamp=log_clamp)
    return _compute(cfg, logp_train, logp_infer, mask)


def _masked_summary(values: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
    """mean, min, max and ESS = (Σv)²/(n·Σv²) of ``values[valid]`` in float64; zeros when nothing is valid."""
    v = values.double()
    n = valid.sum()
    any_valid = n > 0
    zero = torch.zeros((), dtype=torch.float64, device=v.device)
    total = torch.where(valid, v, zero).sum()
    sq = torch.where(valid, v * v, zero).sum()
    mean = total / n.clamp_min(1)
    vmin = torch.where(any_valid, torch.where(valid, v, math.inf).min(), zero)
    vmax = torch.where(any_valid, torch.where(valid, v, -math.inf).max(), zero)
    ess = torch.where(sq > 0, total * total / (n.clamp_min(1) * sq.clamp_min(1e-300)), zero)
    return [mean, vmin, vmax, ess]


def _frac(count: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return count.double() / total.double().clamp_min(1)


def _compute(
    cfg: ISConfig, logp_train: torch.Tensor, logp_infer: torch.Tensor, mask: torch.Tensor
) -> ISResult:
    _check_inputs(logp_train, logp_infer, mask)
    lo, hi = cfg.bounds
    clamp = cfg.log_clamp
    mode = cfg.mode
    with torch.no_grad():
        raw = logp_train.detach().float() - logp_infer.detach().float()  # (B, T)
        bad = (~torch.isfinite(raw)) & mask
        if bool(bad.any()):
            raise ValueError(
                f"logp_train/logp_infer hold {int(bad.sum())} non-finite value(s) at valid (mask=True) positions "
                f"(first at {tuple(bad.nonzero()[0].tolist())}); log-probs of sampled tokens must be finite — "
                "fix them upstream or set mask=False there."
            )
        log_r = torch.where(mask, raw, 0.0)  # (B, T) log π/μ, 0 on padding so NaN/inf there never propagate
        n_tok = mask.sum(-1)  # (B,)
        has_tok = n_tok > 0  # (B,)
        seq_log_r = log_r.sum(-1)  # (B,) log r(y)
        geo_log_r = seq_log_r / n_tok.clamp_min(1)  # (B,) log r(y)^{1/T}

        tok_ratio = log_r.clamp(-clamp, clamp).exp()  # (B, T)
        seq_ratio = seq_log_r.clamp(-clamp, clamp).exp()  # (B,)
        geo_ratio = geo_log_r.clamp(-clamp, clamp).exp()  # (B,)

        # the veto looks at the exact token log-ratio (log τ ≈ -9.2 is far inside the clamp)
        if mode != "none" and cfg.veto is not None:
            vetoed = ((log_r < math.log(cfg.veto)) & mask).any(-1)  # (B,)
        else:
            vetoed = torch.zeros_like(has_tok)

        # ---- the mode's unit: tokens (B, T) or sequences (B,)
        if mode in _TOKEN_LEVEL:
            unit_log_r, unit_ratio, unit_valid = log_r, tok_ratio, mask
        elif mode == "geo_mask":
            unit_log_r, unit_ratio, unit_valid = geo_log_r, geo_ratio, has_tok
        else:
            unit_log_r, unit_ratio, unit_valid = seq_log_r, seq_ratio, has_tok

        no_unit = torch.zeros_like(unit_valid)
        truncated, masked = no_unit, no_unit
        if mode == "none":
            unit_w = torch.ones_like(unit_ratio)
        elif mode == "seq_is":
            unit_w = unit_ratio
        elif mode in _TIS_MODES:
            assert hi is not None
            truncated = unit_valid & (unit_log_r > math.log(hi))
            unit_w = unit_ratio.clamp(max=hi)
        else:  # window modes
            assert lo is not None and hi is not None
            inside = (unit_log_r >= math.log(lo)) & (unit_log_r <= math.log(hi))
            masked = unit_valid & ~inside
            unit_w = torch.where(
                inside, torch.ones_like(unit_ratio) if mode == "geo_mask" else unit_ratio, 0.0
            )
        clamped = unit_valid & (unit_log_r.abs() > clamp)

        # ---- combine masking and veto into token-level keep
        if mode in _TOKEN_LEVEL:
            seq_keep = ~vetoed
            keep = mask & ~masked & seq_keep[:, None]  # (B, T)
            tok_w = unit_w
            kept_units = keep
        else:
            seq_keep = ~masked & ~vetoed  # (B,)
            keep = mask & seq_keep[:, None]  # (B, T)
            tok_w = unit_w[:, None].expand_as(log_r)  # (B, T)
            kept_units = has_tok & seq_keep
        weights = torch.where(keep, tok_w, 0.0).float()  # (B, T)

        n_valid_tok = mask.sum()
        n_seqs = has_tok.sum()
        n_units = unit_valid.sum()
        values = [
            *_masked_summary(tok_ratio, mask),
            *_masked_summary(seq_ratio, has_tok),
            *_masked_summary(geo_ratio, has_tok)[:3],
            *_masked_summary(unit_w, kept_units),
            _frac(truncated.sum(), n_units),
            _frac(masked.sum(), n_units),
            _frac((vetoed & has_tok).sum(), n_seqs),
            _frac(clamped.sum(), n_units),
            _frac(keep.sum(), n_valid_tok),
            _frac((has_tok & seq_keep).sum(), n_seqs),
            n_valid_tok.double(),
            n_seqs.double(),
        ]
        stats = dict(zip(IS_METRIC_DOCS, torch.stack(values).tolist(), strict=True))
    return ISResult(weights=weights, keep=keep, seq_keep=seq_keep, stats=stats)


# -------------------------------------------------------------------------------------------------- verl
#: verl ``RolloutCorrectionConfig`` factory presets that map onto one mode here (preset name → verl keys).
VERL_PRESETS: dict[str, dict[str, Any]] = {
    "disabled": {"rollout_is": None, "rollout_rs": None},
    "bypass_ppo_clip": {
        "rollout_is": None,
        "rollout_rs": None,
    },  # PPO ratio only: policy_loss(loss_type="ppo_clip")
    "decoupled_token_is": {"rollout_is": "token", "rollout_is_threshold": 2.0},
    "decoupled_seq_is": {"rollout_is": "sequence", "rollout_is_threshold": 2.0},
    "bypass_pg_is": {"rollout_is": "sequence", "rollout_is_threshold": 2.0},
    "decoupled_token_icepop": {"rollout_is": "token", "rollout_is_threshold": "0.5_5.0"},
    "bypass_pg_token_icepop": {"rollout_is": "token", "rollout_is_threshold": "0.5_5.0"},
    "decoupled_seq_is_rs": {
        "rollout_is": "sequence",
        "rollout_is_threshold": 2.0,
        "rollout_rs": "seq_sum_k1",
        "rollout_rs_threshold": "0.5_2.0",
    },
    "decoupled_geo_rs": {
        "rollout_is": None,
        "rollout_rs": "seq_mean_k1",
        "rollout_rs_threshold": "0.999_1.001",
    },
    "bypass_pg_geo_rs": {
        "rollout_is": None,
        "rollout_rs": "seq_mean_k1",
        "rollout_rs_threshold": "0.999_1.001",
    },
    "bypass_ppo_clip_geo_rs": {
        "rollout_is": None,
        "rollout_rs": "seq_mean_k1",
        "rollout_rs_threshold": "0.999_1.001",
    },
}

_VERL_KEYS = (
    "rollout_is",
    "rollout_is_threshold",
    "rollout_is_threshold_lower",
    "rollout_is_level",
    "rollout_is_mode",
    "rollout_is_veto_threshold",
    "rollout_token_veto_threshold",
    "rollout_is_batch_normalize",
    "rollout_rs",
    "rollout_rs_threshold",
    "rollout_rs_threshold_lower",
)
# keys that only choose verl's loss / pipeline, not the weights
_VERL_IGNORED = (
    "bypass_mode",
    "loss_type",
    "use_policy_gradient",
    "bypass_old_logprob_for_rollout",
    "use_pure_rollout_correction",
)
_LEVEL_TO_PREFIX = {"token": "token", "sequence": "seq"}


def _parse_threshold(key: str, spec: object) -> tuple[float | None, float]:
    """verl threshold → ``(lower or None, upper)``: a number, a numeric string, or a ``"lo_hi"`` string."""
    if _is_number(spec):
        return None, float(spec)  # type: ignore[arg-type]
    if isinstance(spec, str) and spec.strip():
        parts = spec.strip().split("_")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) == 1:
            return None, nums[0]
        if len(nums) == 2:
            return nums[0], nums[1]
    raise ValueError(f"{key}={spec!r} must be a number or a 'lo_hi' string such as '0.5_2.0'.")


def _unwrap_verl(config: Mapping[str, Any] | str) -> dict[str, Any]:
    """Preset name or (possibly nested) verl mapping → the flat dict of rollout-correction keys."""
    if isinstance(config, str):
        if config not in VERL_PRESETS:
            raise ValueError(
                f"verl preset {config!r} has no single-mode equivalent here; supported presets: "
                f"{sorted(VERL_PRESETS)} (combined presets such as decoupled_geo_rs_seq_tis and k3 rejection "
                "are not expressible as one mode)."
            )
        return dict(VERL_PRESETS[config])
    if not isinstance(config, Mapping):
        raise ValueError(
            f"config must be a mapping of verl keys or a preset name, got {type(config).__name__}."
        )
    cfg: Mapping[str, Any] = config
    in_algorithm = (
        False  # inside verl's `algorithm` section other settings (gamma, adv_estimator, ...) may sit
    )
    if isinstance(cfg.get("algorithm"), Mapping):
        cfg, in_algorithm = cfg["algorithm"], True
    if "rollout_correction" in cfg:
        section = cfg["rollout_correction"]
        outer = sorted(k for k in cfg if k.startswith("rollout_") and k != "rollout_correction")
        if outer:
            raise ValueError(
                f"keys {outer} sit beside the rollout_correction section; move them inside it (verl reads only one)."
            )
        if section is None:  # verl: rollout_correction: null disables the feature
            return {}
        if not isinstance(section, Mapping):
            raise ValueError(f"rollout_correction={section!r} must be a mapping of verl keys or null.")
        cfg, in_algorithm = section, False
    known = (*_VERL_KEYS, *_VERL_IGNORED)
    unknown = sorted(k for k in cfg if k not in known and (k.startswith("rollout_") or not in_algorithm))
    if unknown:
        raise ValueError(
            f"unknown verl rollout-correction key(s) {unknown}; accepted keys: {list(_VERL_KEYS)} "
            f"(ignored, loss-only: {list(_VERL_IGNORED)})."
        )
    return {k: v for k, v in cfg.items() if k in _VERL_KEYS}


def _parse_verl(config: Mapping[str, Any] | str) -> tuple[str, float | None, float | None, float | None]:
    c = _unwrap_verl(config)

    # ---- veto (either spelling); absent = verl's default (disabled); 0 = "no ratio is below 0" = disabled
    vetos = {
        k: c[k] for k in ("rollout_is_veto_threshold", "rollout_token_veto_threshold") if c.get(k) is not None
    }
    if len(set(vetos.values())) > 1:
        raise ValueError(f"conflicting veto thresholds {vetos}; set only one of them.")
    veto = next(iter(vetos.values()), None)
    if veto is not None and _is_number(veto) and float(veto) == 0.0:
        veto = None
    if veto is not None and not _is_number(veto):
        raise ValueError(f"veto threshold {veto!r} must be a number in (0, 1) or null.")

    if c.get("rollout_is_batch_normalize", False):
        raise ValueError(
            "rollout_is_batch_normalize=True (weights rescaled to batch mean 1) is not supported; set it to false."
        )

    # ---- IS part: level, kind ("truncate" | "mask"), bounds
    flag = c.get("rollout_is")
    level_key = c.get("rollout_is_level")
    if isinstance(flag, bool):  # 2025-10 spelling: bool switch + rollout_is_level
        level = (level_key or "token") if flag else None
    elif flag is None:
        level = None
    elif isinstance(flag, str):
        if level_key is not None and level_key != flag:
            raise ValueError(
                f"rollout_is={flag!r} conflicts with rollout_is_level={level_key!r}; set one of them."
            )
        level = flag
    else:
        raise ValueError(f"rollout_is={flag!r} must be a bool, 'token', 'sequence', 'geometric' or null.")
    if level is not None and level not in ("token", "sequence", "geometric"):
        raise ValueError(f"IS level {level!r} must be 'token', 'sequence' or 'geometric'.")

    threshold = c.get("rollout_is_threshold", 2.0)
    is_part: tuple[str, str, float | None, float] | None = None
    if level is not None and threshold is not None:
        t_lo, t_hi = _parse_threshold("rollout_is_threshold", threshold)
        kind = c.get("rollout_is_mode", "truncate")
        if kind == "clip":
            kind = "mask"  # verl's earliest name for zeroing weights outside [lower, upper]
        if kind not in ("truncate", "mask"):
            raise ValueError(f"rollout_is_mode={kind!r} must be 'truncate' or 'mask' ('clip' = 'mask').")
        if t_lo is not None:  # "lo_hi" string: IcePop = mask
            kind = "mask"
        lower = t_lo if t_lo is not None else c.get("rollout_is_threshold_lower")
        if kind == "mask":
            lower = (1.0 / t_hi) if lower is None else float(lower)
        else:
            lower = None  # truncation ignores the lower bound
        is_part = (level, kind, lower, t_hi)

    # ---- rejection part: level and π/μ window
    rs = c.get("rollout_rs")
    rs_part: tuple[str, float, float] | None = None
    if rs is not None:
        spec = c.get("rollout_rs_threshold")
        if spec is None:
            raise ValueError(f"rollout_rs={rs!r} needs rollout_rs_threshold (e.g. '0.999_1.001').")
        if rs in ("token", "sequence", "geometric"):  # 2025-11: bounds on the ratio π/μ itself
            r_lo, r_hi = _parse_threshold("rollout_rs_threshold", spec)
            low = c.get("rollout_rs_threshold_lower")
            r_lo = r_lo if r_lo is not None else (1.0 / r_hi if low is None else float(low))
            rs_part = (rs, r_lo, r_hi)
        elif rs in ("token_k1", "seq_sum_k1", "seq_mean_k1"):  # newer: k1 = log μ/π in [log a, log b]
            a, b = _parse_threshold("rollout_rs_threshold", spec)
            a = 1.0 / b if a is None else a
            rs_level = {"token_k1": "token", "seq_sum_k1": "sequence", "seq_mean_k1": "geometric"}[rs]
            rs_part = (rs_level, 1.0 / b, 1.0 / a)
        else:
            raise ValueError(
                f"rollout_rs={rs!r} cannot be expressed here; supported: 'token', 'sequence', 'geometric', "
                "'token_k1', 'seq_sum_k1', 'seq_mean_k1' (k2/k3 divergence filters and comma lists are not)."
            )

    # ---- resolve to one mode
    if is_part is None and rs_part is None:
        return "none", None, None, veto
    if is_part is not None and rs_part is None:
        lvl, kind, lower, upper = is_part
        if lvl == "geometric":
            if kind != "mask":
                raise ValueError(
                    "rollout_is_level='geometric' with rollout_is_mode='truncate' has no equivalent; "
                    "use rollout_is_mode='mask' (→ geo_mask)."
                )
            return "geo_mask", lower, upper, veto
        prefix = _LEVEL_TO_PREFIX[lvl]
        return (
            (f"{prefix}_tis", None, upper, veto)
            if kind == "truncate"
            else (f"{prefix}_mis", lower, upper, veto)
        )
    assert rs_part is not None
    rs_level, r_lo, r_hi = rs_part
    if is_part is None:
        if rs_level == "geometric":
            return "geo_mask", r_lo, r_hi, veto
        raise ValueError(
            f"rejection at {rs_level} level without IS weights (rollout_is=null) has no equivalent here: "
            f"mode '{_LEVEL_TO_PREFIX[rs_level]}_mis' also applies the ratio as a weight; set "
            f"rollout_is={rs_level!r} to accept that, or use the geometric filter."
        )
    lvl, kind, _, upper = is_part
    if lvl != rs_level or kind != "truncate" or r_hi > upper:
        raise ValueError(
            f"IS at {lvl} level ({kind}, threshold {upper}) combined with rejection at {rs_level} level "
            f"(window [{r_lo:.6g}, {r_hi:.6g}]) is not one mode here; supported combination: truncated IS and "
            "rejection at the same token/sequence level with rs upper ≤ is upper (→ token_mis / seq_mis)."
        )
    return f"{_LEVEL_TO_PREFIX[lvl]}_mis", r_lo, r_hi, veto
