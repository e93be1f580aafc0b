"""Importance-sampling (IS) corrections for training–inference mismatch.

The rollout engine samples from ``μ`` (low precision, other kernels, min-p renormalised) while the trainer
differentiates ``π``. With the per-token ratio ``r_t = π(y_t|s_t) / μ(y_t|s_t)`` this module turns the two
log-prob tensors into stop-gradient weights and a keep mask, one estimator per ``mode`` (THEORY.md,
"Importance-sampling corrections"):

==============  ======================================================  ====================  ===============
mode            weight on the sequence's tokens                         level                 default bounds
==============  ======================================================  ====================  ===============
``none``        1 (naive estimator: no correction, no veto)             token                 —
``token_tis``   ``clip(r_t, lo, hi)`` (no lower clip unless ``lo``)     token                 hi = 2.0
``token_mis``   ``r_t · 1[lo ≤ r_t ≤ hi]`` (masked tokens dropped)      token                 [0.5, 2.0]
``seq_is``      ``r(y) = Π_t r_t`` (unbiased, variance exp. in T)       sequence              —
``seq_tis``     ``clip(r(y), lo, hi)`` (no lower clip unless ``lo``)    sequence              hi = 2.0
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

Two relaxations reproduce TRL 1.16's vLLM correction (``vllm_importance_sampling_mode``; :data:`PEER_PRESETS`):
``token_mis`` / ``seq_mis`` accept ``lo=0`` — no lower side, only ratios above ``hi`` are masked (TRL's
``*_mask`` modes with ``clip_min=None``, its default); ``token_tis`` / ``seq_tis`` accept a lower clip
``0 < lo ≤ 1`` that raises small ratios to ``lo`` (TRL's ``*_truncate`` with ``clip_min``). The defaults stay
as they were: a two-sided window (THEORY's MIS, verl's IcePop) and no lower clip (verl's TIS).

Veto (all modes but ``none``): drop the whole sequence if any valid token has ``r_t < veto`` (default 1e-4,
``None`` disables).

Trust-region rejection (every mode, off by default; verl 0.9.1's ``rollout_rs="seq_max_k2"/"seq_max_k3"``, the
rule of Trust Region Masking that replaced verl's veto): drop the whole sequence if its *worst* token leaves the
trust region, ``max_t D_t > trust_region`` with ``D_t = ½ u_t²`` (k2) or ``e^{u_t} − 1 − u_t`` (k3, the
default), ``u_t = log r_t`` clamped to ``±log_clamp``. Unlike the veto it is two-sided: a token the engine
under-estimates (``r_t ≫ 1``) counts as much as one it over-estimates. k3 at ``u`` and ``−u``: ``e^{−u}``
against ``e^{u}`` — k3 punishes large ratios harder, k2 is symmetric in ``u``. All ratios are computed in log space; log-ratios are clamped to ``±log_clamp``
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
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_LOG_CLAMP",
    "DEFAULT_VETO",
    "IS_METRIC_DOCS",
    "IS_MODES",
    "MODE_DEFAULT_BOUNDS",
    "PEER_PRESETS",
    "TRUST_REGION_DIVS",
    "ISConfig",
    "ISResult",
    "importance_weights",
    "resolve_bounds",
]

TRUST_REGION_DIVS: tuple[str, ...] = ("k2", "k3")
"""Per-token divergences trust-region rejection can bound (verl's ``seq_max_k2`` / ``seq_max_k3``)."""
IS_MODES: tuple[str, ...] = ("none", "token_tis", "token_mis", "seq_is", "seq_tis", "seq_mis", "geo_mask")
_TOKEN_LEVEL = ("none", "token_tis", "token_mis")
_TIS_MODES = ("token_tis", "seq_tis")
_WINDOW_MODES = ("token_mis", "seq_mis", "geo_mask")
_UNBOUNDED_MODES = ("none", "seq_is")
_OPEN_BELOW_MODES = ("token_mis", "seq_mis")  # lo=0: no lower side (TRL's *_mask modes with clip_min=None)

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
    "is/frac_truncated": "fraction of valid units whose ratio was clipped: above hi, or below lo when a TIS lower "
    "clip is set (TIS modes; 0 otherwise)",
    "is/frac_masked": "fraction of valid units outside [lo, hi] and dropped (MIS / geo_mask modes; 0 otherwise)",
    "is/frac_vetoed": "fraction of sequences with valid tokens dropped by the veto (some valid r_t < veto)",
    "is/frac_trust_region": "fraction of sequences with valid tokens dropped by trust-region rejection "
    "(max over valid tokens of the k2/k3 divergence of log r_t > trust_region); 0 when it is off",
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

    Rules: ``none``/``seq_is`` take no bounds; TIS modes take ``hi`` and optionally a lower clip ``lo``
    (None: no lower clip, verl's TIS; TRL's ``*_truncate`` with ``clip_min``); window modes (``token_mis``,
    ``seq_mis``, ``geo_mask``) take both, a missing one being the reciprocal of the other and both missing
    meaning the mode default. Every bound satisfies ``0 < lo ≤ 1 ≤ hi < ∞``, except that ``token_mis`` and
    ``seq_mis`` accept ``lo=0``: no lower side (TRL's ``*_mask`` modes with ``clip_min=None``), ``hi``
    then defaulting to the mode's.

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
    >>> resolve_bounds("seq_mis", lo=0.0, hi=3.0)   # TRL's sequence_mask default: no lower side
    (0.0, 3.0)
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
        lo_v = None if lo is None else _check_positive_finite("lo", lo, mode)
        if lo_v is not None and lo_v > 1.0:
            raise ValueError(
                f"lo={lo_v!r} for mode={mode!r} is a lower clip and must be in (0, 1]: a clip above 1 would change "
                f"the weight of perfectly matched samples; use e.g. lo=0.5, or lo=None for no lower clip."
            )
        hi_v = MODE_DEFAULT_BOUNDS[mode][1] if hi is None else _check_positive_finite("hi", hi, mode)
        assert hi_v is not None
        if hi_v < 1.0:
            raise ValueError(
                f"hi={hi_v!r} for mode={mode!r} must be in [1, inf): a cap below 1 would change the weight of "
                f"perfectly matched samples; use hi ≥ 1 (typical {mode} caps: 1.5–10)."
            )
        return lo_v, hi_v
    # window modes
    d_lo, d_hi = MODE_DEFAULT_BOUNDS[mode]
    if mode in _OPEN_BELOW_MODES and _is_number(lo) and float(lo) == 0.0:  # type: ignore[arg-type]
        hi_v = d_hi if hi is None else _check_positive_finite("hi", hi, mode)
        assert hi_v is not None
        if hi_v < 1.0:
            raise ValueError(f"hi={hi_v!r} for mode={mode!r} must be ≥ 1 (the window must contain 1).")
        return 0.0, hi_v
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


def _validate_trust_region(threshold: object, div: object) -> None:
    if div not in TRUST_REGION_DIVS:
        raise ValueError(
            f"trust_region_div={div!r} must be one of {TRUST_REGION_DIVS} (k3 is verl's usual choice)."
        )
    if threshold is None:
        return
    if not _is_number(threshold) or not math.isfinite(float(threshold)) or float(threshold) <= 0:  # type: ignore[arg-type]
        raise ValueError(
            f"trust_region={threshold!r} must be a finite divergence bound > 0 (e.g. 0.5: rejects a sequence whose "
            "worst token has |log r_t| ≳ 1) or None to disable trust-region rejection."
        )


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

    :func:`workbench.integrations.verl.is_config_from_verl` reads the same settings written with verl's keys.
    """

    mode: str = "none"
    """One of :data:`IS_MODES`; ``"none"`` is the naive estimator (weights 1, no veto, stats still logged)."""
    lo: float | None = None
    """Lower ratio bound: window modes — None = reciprocal of ``hi`` or the mode default, ``0`` (token_mis /
    seq_mis) = no lower side, TRL's default; TIS modes — a lower clip in (0, 1], None (default, verl's TIS) =
    none."""
    hi: float | None = None
    """Upper ratio bound / truncation cap; None = reciprocal of ``lo`` or the mode default."""
    veto: float | None = DEFAULT_VETO
    """Drop a sequence if any valid token ratio is below this (in (0, 1)); None disables. Ignored by mode none.
    On by default (THEORY: τ = 1e-4, "When Speed Kills Stability"); TRL has no veto and verl 0.9.1 removed
    it — ``veto=None`` matches both (:data:`PEER_PRESETS`)."""
    log_clamp: float = DEFAULT_LOG_CLAMP
    """Log-ratios are clamped to ±log_clamp before exponentiating."""
    trust_region: float | None = None
    """Drop a sequence whose worst token has divergence ``trust_region_div`` above this (> 0); None disables.
    Applies in every mode, ``none`` included (verl's rejection works without IS weights)."""
    trust_region_div: str = "k3"
    """Per-token divergence of the trust-region rule: ``"k2"`` (½ log² r) or ``"k3"`` (r − 1 − log r)."""

    def __post_init__(self) -> None:
        resolve_bounds(self.mode, self.lo, self.hi)
        _validate_veto(self.veto)
        _validate_log_clamp(self.log_clamp)
        _validate_trust_region(self.trust_region, self.trust_region_div)

    @property
    def bounds(self) -> tuple[float | None, float | None]:
        """The effective ``(lo, hi)`` after defaults (``None`` where the mode has no such bound)."""
        return resolve_bounds(self.mode, self.lo, self.hi)

    def apply(self, logp_train: torch.Tensor, logp_infer: torch.Tensor, mask: torch.Tensor) -> ISResult:
        """Compute the weights of this configuration; same as :func:`importance_weights`."""
        return _compute(self, logp_train, logp_infer, mask)

    @classmethod
    def from_trl(
        cls, mode: str = "sequence_mask", clip_max: float | None = 3.0, clip_min: float | None = None
    ) -> ISConfig:
        """The weights of TRL 1.16's vLLM correction (``GRPOConfig.vllm_importance_sampling_*``).

        ``token_truncate`` / ``sequence_truncate`` → ``token_tis`` / ``seq_tis`` with ``lo=clip_min`` (a lower
        clip); ``token_mask`` / ``sequence_mask`` → ``token_mis`` / ``seq_mis`` with ``lo=clip_min`` or 0 (no
        lower side). No veto (TRL has none). TRL's defaults are ``sequence_mask``, ``clip_max=3``,
        ``clip_min=None``. TRL exponentiates without a clamp; here log-ratios are clamped at ±20, which moves a
        weight below e^-20 ≈ 2e-9 by less than that.

        Args:
            mode: TRL's ``vllm_importance_sampling_mode``.
            clip_max: ``vllm_importance_sampling_clip_max`` (None — no upper side — has no counterpart here).
            clip_min: ``vllm_importance_sampling_clip_min``.

        Raises:
            ValueError: an unknown mode, ``clip_max=None``, or bounds outside the ranges of :func:`resolve_bounds`.

        >>> ISConfig.from_trl()
        ISConfig(mode='seq_mis', lo=0.0, hi=3.0, veto=None, log_clamp=20.0, trust_region=None, trust_region_div='k3')
        """
        modes = {"token_truncate": "token_tis", "token_mask": "token_mis"}
        modes |= {"sequence_truncate": "seq_tis", "sequence_mask": "seq_mis"}
        if mode not in modes:
            raise ValueError(f"vllm_importance_sampling_mode={mode!r} must be one of {list(modes)}.")
        if clip_max is None:
            raise ValueError(
                "vllm_importance_sampling_clip_max=None (no upper bound) has no counterpart here: every mode needs "
                "a finite hi; pass a large clip_max (e.g. 1e6) to approximate it."
            )
        ours = modes[mode]
        lo = clip_min if clip_min is not None or ours.endswith("tis") else 0.0
        return cls(mode=ours, lo=lo, hi=clip_max, veto=None)


PEER_PRESETS: dict[str, ISConfig] = {
    # verl 0.9.1's trainer config (ppo_trainer.yaml): rollout_is null, rollout_rs null — metrics only
    "verl-0.9.1-default": ISConfig("none", veto=None),
    # verl 0.9.1's RolloutCorrectionConfig() dataclass defaults: rollout_is="sequence", threshold 2.0 (seq-TIS)
    "verl-0.9.1-RolloutCorrectionConfig": ISConfig("seq_tis", hi=2.0, veto=None),
    # TRL 1.16 GRPOConfig(vllm_importance_sampling_mode=…) with its defaults clip_max=3.0, clip_min=None
    "trl-1.16-token_truncate": ISConfig.from_trl("token_truncate"),
    "trl-1.16-token_mask": ISConfig.from_trl("token_mask"),
    "trl-1.16-sequence_truncate": ISConfig.from_trl("sequence_truncate"),
    "trl-1.16-sequence_mask": ISConfig.from_trl("sequence_mask"),  # TRL's default mode
}
"""IS settings that reproduce a peer's weights, named after what they reproduce (lessons/switching.md).
verl presets by name (``decoupled_token_is`` …) are read by
:func:`workbench.integrations.verl.is_config_from_verl`; the loss settings that go with these are
:data:`workbench.rloo.PEER_LOSS`, both together :meth:`workbench.trainer.RLOOConfig.reproducing`."""


@dataclass
class ISResult:
    """Output of :func:`importance_weights`.

    Attributes:
        weights: ``[B, T]`` float32, detached; the IS weight of each token, 0 where ``keep`` is False.
        keep: ``[B, T]`` bool; the token participates in the loss (valid, not masked, not vetoed).
        seq_keep: ``[B]`` bool; the sequence was neither masked nor vetoed (use as ``valid`` for the RLOO
            baseline). A sequence without valid tokens is not rejected (True).
        stats: ``{"is/…": float}``, every key documented in :data:`IS_METRIC_DOCS`.
        zeroed: ``[B, T]`` bool; valid tokens whose weight the ``token_mis`` / ``seq_mis`` window set to 0 and
            that no rejection rule (veto, trust region) dropped. verl's IcePop and TRL's ``*_mask`` modes keep
            exactly these in the loss normaliser (``policy_loss(norm_mask=…)``); all False in other modes.
    """

    weights: torch.Tensor
    keep: torch.Tensor
    seq_keep: torch.Tensor
    stats: dict[str, float]
    zeroed: torch.Tensor | None = None


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
    trust_region: float | None = None,
    trust_region_div: str = "k3",
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
        trust_region: drop a sequence whose worst token's divergence exceeds this; None disables.
        trust_region_div: ``"k2"`` or ``"k3"``, the per-token divergence of that rule.

    Returns:
        :class:`ISResult` with detached float32 ``weights`` (0 where not kept), ``keep``, ``seq_keep`` and
        ``stats`` (keys of :data:`IS_METRIC_DOCS`).

    Raises:
        ValueError: bad shapes/dtypes, a non-bool mask, non-finite log-probs at valid positions, or bad
            mode/bounds/veto/log_clamp/trust region.

    >>> lp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    >>> res = importance_weights(lp, lp, torch.ones(2, 2, dtype=torch.bool), mode="seq_mis")
    >>> res.weights.tolist(), res.seq_keep.tolist()
    ([[1.0, 1.0], [1.0, 1.0]], [True, True])
    """
    cfg = ISConfig(
        mode=mode,
        lo=lo,
        hi=hi,
        veto=veto,
        log_clamp=log_clamp,
        trust_region=trust_region,
        trust_region_div=trust_region_div,
    )
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

        # trust region: the worst token's divergence, on the clamped log-ratio as verl computes it
        if cfg.trust_region is not None:
            u = log_r.clamp(-clamp, clamp)  # (B, T)
            div = 0.5 * u * u if cfg.trust_region_div == "k2" else torch.exp(u) - 1.0 - u  # (B, T)
            outside = ((div > cfg.trust_region) & mask).any(-1)  # (B,)
        else:
            outside = torch.zeros_like(has_tok)
        rejected = vetoed | outside  # (B,) whole sequences out, whatever the mode

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
            if lo is not None:  # TRL's clip_min: small ratios raised to lo
                truncated = truncated | (unit_valid & (unit_log_r < math.log(lo)))
            unit_w = unit_ratio.clamp(min=lo, max=hi)
        else:  # window modes
            assert lo is not None and hi is not None
            log_lo = math.log(lo) if lo > 0 else -math.inf  # lo = 0: no lower side
            inside = (unit_log_r >= log_lo) & (unit_log_r <= math.log(hi))
            masked = unit_valid & ~inside
            unit_w = torch.where(
                inside, torch.ones_like(unit_ratio) if mode == "geo_mask" else unit_ratio, 0.0
            )
        clamped = unit_valid & (unit_log_r.abs() > clamp)

        # ---- combine masking and veto into token-level keep
        if mode in _TOKEN_LEVEL:
            seq_keep = ~rejected
            keep = mask & ~masked & seq_keep[:, None]  # (B, T)
            tok_w = unit_w
            kept_units = keep
            zeroed = mask & masked & seq_keep[:, None]  # (B, T)
        else:
            seq_keep = ~masked & ~rejected  # (B,)
            keep = mask & seq_keep[:, None]  # (B, T)
            tok_w = unit_w[:, None].expand_as(log_r)  # (B, T)
            kept_units = has_tok & seq_keep
            zeroed = mask & (masked & ~rejected)[:, None]  # (B, T)
        if mode == "geo_mask":  # verl's geometric filter is a rejection (rollout_rs), never IcePop zeros
            zeroed = torch.zeros_like(mask)
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
            _frac((outside & has_tok).sum(), n_seqs),
            _frac(clamped.sum(), n_units),
            _frac(keep.sum(), n_valid_tok),
            _frac((has_tok & seq_keep).sum(), n_seqs),
            n_valid_tok.double(),
            n_seqs.double(),
        ]
        stats = dict(zip(IS_METRIC_DOCS, torch.stack(values).tolist(), strict=True))
    return ISResult(weights=weights, keep=keep, seq_keep=seq_keep, stats=stats, zeroed=zeroed)
