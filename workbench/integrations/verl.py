"""DVP + masked importance sampling inside verl: a registered policy loss and the patches verl needs.

verl (Ray + FSDP + vLLM) lets a project plug in a policy loss through
``verl.trainer.ppo.core_algos.register_policy_loss(name)``. The registered function receives
``old_log_prob, log_prob, advantages, response_mask`` (all ``[batch, response_len]``), ``loss_agg_mode``, the
actor ``config`` and — depending on the verl version — ``rollout_is_weights`` (computed centrally from the
``algorithm.rollout_correction`` settings) or ``rollout_log_probs``; it returns ``(loss, metrics)``.

What that API allows, and what it does not:

1. **The loss never sees logits.** verl's actor turns logits into ``log_prob`` with a plain log-softmax
   (``verl.utils.torch_functional.logprobs_from_logits``) before calling the loss, so DVP cannot live in the
   loss alone. :func:`install` therefore *patches* ``logprobs_from_logits`` with
   :func:`dvp_logprobs_from_logits` (``log π^mp``, :func:`workbench.dvp.token_logprobs`), for the old, current
   and reference log-probs alike. It covers the FSDP actor (``dp_actor`` and the engine-based workers, which
   both call that function after dividing the logits by the temperature) with
   ``actor_rollout_ref.model.use_fused_kernels=False``. Not covered: fused kernels (they never materialise
   logits) and the Megatron actor (its vocabulary-parallel log-softmax would need the safe-set maximum
   all-reduced across tensor-parallel ranks). Unlike the workbench trainer and the TRL adapter, this path
   cannot use the fused LM head (:func:`workbench.dvp.lm_head_token_stats`, logits never materialised): the
   patched ``logprobs_from_logits`` receives logits verl's actor has already built, so the memory is spent
   before it is called. Fusing would need a verl actor hook that hands over the final hidden states and the
   output layer instead (verl's own ``use_fused_kernels`` path does that for the unmasked log-softmax, and
   DVP would have to replace its kernel).
2. **The rollout needs the same ρ as min-p.** verl's agent loop builds vLLM ``SamplingParams`` from
   ``temperature/top_p/top_k`` only, so :func:`install` also wraps the vLLM server's ``generate`` to add
   ``min_p = ρ`` (:func:`with_min_p`). Set ``rollout.calculate_log_probs=True`` and
   ``rollout.logprobs_mode=processed_logprobs`` (verl's default ``raw_logprobs`` is taken before temperature
   and min-p): the engine log-probs are then ``log μ^mp``, renormalised over the same support as the
   trainer's ``log π^mp``, so no ``log Z`` bias enters the ratio.
3. **The IS correction is verl's, configured to match ours.** In decoupled mode (``bypass_mode=False``) verl
   compares ``old_log_prob`` (the actor's recompute — ``log π^mp`` once patched) with ``rollout_log_probs``
   (``log μ^mp``) and hands the loss ``rollout_is_weights``; :func:`rollout_correction_for` writes the verl
   settings equivalent to an :class:`workbench.importance.ISConfig` (round-trips through
   ``is_config_from_verl``, which also reads verl configs written by hand). verl's bypass mode replaces the loss mode by its own and cannot be used. When a
   verl version passes ``rollout_log_probs`` instead, :func:`dvp_policy_loss` applies the full ISConfig
   (veto included) itself.
4. **Advantages stay verl's** (``algorithm.adv_estimator=rloo`` or ``grpo``: the same leave-one-out /
   group-normalised formulas as :mod:`workbench.rloo`, grouped by verl's uid); the loss reads one advantage
   per sequence and refuses token-varying ones (GAE).

The patches must run in every Ray worker. verl imports the modules named in the environment variable
``VERL_USE_EXTERNAL_MODULES`` on ``import verl`` in every process; naming
``workbench.integrations.verl_plugin`` there (and the settings, JSON, in ``WORKBENCH_VERL_DVP``) installs
everything lazily: each patch runs right after verl imports the module it patches (:func:`after_import`).
See ``verl_dvp_example.yaml`` next to this file and lessons/11_production.md.

Nothing here imports verl at module level; the loss math is testable without it.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.machinery
import json
import math
import os
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from workbench import dvp, metrics
from workbench.importance import DEFAULT_LOG_CLAMP, IS_MODES, TRUST_REGION_DIVS, ISConfig
from workbench.rloo import corrected_batch

__all__ = [
    "ENV_VAR",
    "LOSS_MODE",
    "PLUGIN_MODULE",
    "VERL_AGG",
    "VERL_PRESETS",
    "VerlDVPConfig",
    "active_config",
    "after_import",
    "check_verl_config",
    "dvp_logprobs_from_logits",
    "dvp_policy_loss",
    "install",
    "is_config_from_verl",
    "rollout_correction_for",
    "sequence_advantages",
    "uninstall",
    "verl_global_scale",
    "with_min_p",
]

LOSS_MODE = "dvp_mis"
"""Name under which :func:`dvp_policy_loss` is registered (``actor.policy_loss.loss_mode``)."""
ENV_VAR = "WORKBENCH_VERL_DVP"
"""Environment variable holding :class:`VerlDVPConfig` as JSON in every Ray worker."""
PLUGIN_MODULE = "workbench.integrations.verl_plugin"
"""Module to list in ``VERL_USE_EXTERNAL_MODULES``; importing it calls :func:`install`."""
VERL_AGG: dict[str, str] = {
    "token-mean": "token_mean",
    "seq-mean-token-mean": "seq_mean",
    "token-sum": "token_sum",
    "seq-mean-token-sum": "seq_mean_token_sum",
}
"""verl ``loss_agg_mode`` → :func:`workbench.rloo.policy_loss` ``agg`` (all but ``seq-mean-token-sum-norm``)."""
OUTCOME_ESTIMATORS = (
    "rloo",
    "rloo_vectorized",
    "grpo",
    "grpo_passk",
    "reinforce_plus_plus_baseline",
    "opo",
    "gpg",
)
"""verl advantage estimators that give one advantage per sequence (the loss needs that)."""
_SERVER_CLASSES = ("vLLMHttpServerBase", "vLLMHttpServer", "AsyncvLLMServer")


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class VerlDVPConfig:
    """The workbench settings verl cannot carry in its own config (its dataclasses reject unknown keys).

    Shipped to every Ray worker as JSON in :data:`ENV_VAR` (see :meth:`env`).

    >>> cfg = VerlDVPConfig(rho=1e-4, is_mode="token_mis", is_lo=0.5, is_hi=2.0, is_veto=None)
    >>> VerlDVPConfig.from_json(cfg.to_json()) == cfg
    True
    """

    rho: float | None = dvp.DEFAULT_RHO  # paper default ρ = e^-13 (THEORY.md, Section 5)
    """Safe-set threshold ρ: the actor computes ``log π^mp`` and vLLM samples with ``min_p = ρ``."""
    chunk_size: int = 1024
    """Rows per chunk of the memory-lean DVP log-prob kernel."""
    is_mode: str = "token_mis"
    """IS mode applied *inside the loss* when verl passes ``rollout_log_probs`` (otherwise verl's weights)."""
    is_lo: float | None = 0.5
    """Lower ratio bound for window modes."""
    is_hi: float | None = 2.0
    """Upper ratio bound / truncation cap."""
    is_veto: float | None = None
    """Sequence veto threshold (in-loss path only; current verl has no veto in ``rollout_correction``)."""
    is_trust_region: float | None = None
    """Trust-region rejection threshold (verl's ``rollout_rs="seq_max_k*"``); None disables it."""
    is_trust_region_div: str = "k3"
    """Per-token divergence of the trust-region rule: ``"k2"`` or ``"k3"``."""
    loss_type: str = "ppo_clip"
    """``"ppo_clip"`` (clip range ``actor.clip_ratio``; verl reuses a batch over mini-batches) or ``"pg"``."""
    patch_logprobs: bool = True
    """Replace verl's ``logprobs_from_logits`` by :func:`dvp_logprobs_from_logits` (needed for DVP)."""
    patch_rollout_min_p: bool = True
    """Add ``min_p = ρ`` to the vLLM server's sampling parameters."""

    def __post_init__(self) -> None:
        dvp.validate_rho(self.rho, "VerlDVPConfig.rho")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(
                f"VerlDVPConfig.chunk_size={self.chunk_size!r} must be an integer >= 1; use 1024"
            )
        if self.loss_type not in ("pg", "ppo_clip"):
            raise ValueError(f"VerlDVPConfig.loss_type={self.loss_type!r} must be 'pg' or 'ppo_clip'")
        self.is_config()  # the importance module validates mode, bounds and veto

    def is_config(self) -> ISConfig:
        """The in-loss importance-sampling settings as an :class:`~workbench.importance.ISConfig`."""
        return ISConfig(
            mode=self.is_mode,
            lo=self.is_lo,
            hi=self.is_hi,
            veto=self.is_veto,
            trust_region=self.is_trust_region,
            trust_region_div=self.is_trust_region_div,
        )

    def to_json(self) -> str:
        """Compact JSON of every field."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VerlDVPConfig:
        """Inverse of :meth:`to_json`; unknown keys or bad JSON raise a ``ValueError`` saying what to fix."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{ENV_VAR} is not valid JSON ({e}); write it with VerlDVPConfig(...).to_json()"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"{ENV_VAR} must hold a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {ENV_VAR} keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> VerlDVPConfig:
        """Read :data:`ENV_VAR` (defaults when unset)."""
        text = (os.environ if environ is None else environ).get(ENV_VAR)
        return cls() if text is None or not text.strip() else cls.from_json(text)

    def env(self) -> dict[str, str]:
        """Environment variables for Ray's ``runtime_env.env_vars``: the plugin module and these settings."""
        return {"VERL_USE_EXTERNAL_MODULES": PLUGIN_MODULE, ENV_VAR: self.to_json()}


_ACTIVE: VerlDVPConfig | None = None


def active_config() -> VerlDVPConfig:
    """The settings :func:`install` was given (or, before any install, those in :data:`ENV_VAR`)."""
    return _ACTIVE if _ACTIVE is not None else VerlDVPConfig.from_env()


# ----------------------------------------------------------------------------------------- pure helpers
def sequence_advantages(advantages: torch.Tensor, mask: torch.Tensor, *, rtol: float = 1e-4) -> torch.Tensor:
    """One advantage per sequence from verl's token-broadcast ``[B, T]`` advantages.

    Outcome estimators (GRPO, RLOO, …) write the same value on every response token; the mean over valid
    tokens recovers it. A row without valid tokens gets 0.

    Args:
        advantages: ``[B, T]`` float.
        mask: ``[B, T]`` bool (or 0/1), True on response tokens.
        rtol: allowed spread within a row, relative to ``1 + max |A|``.

    Returns:
        ``[B]`` float32.

    Raises:
        ValueError: shapes differ, or a row's advantages vary over its tokens (e.g. GAE).

    >>> a = torch.tensor([[0.5, 0.5, 0.0], [-1.0, 0.0, 0.0]])
    >>> m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    >>> sequence_advantages(a, m).tolist()
    [0.5, -1.0]
    """
    if advantages.shape != mask.shape or advantages.dim() != 2:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} and response_mask {tuple(mask.shape)} must both be [B, T]"
        )
    m = mask.bool()
    a = advantages.detach().float()
    n = m.sum(-1)  # (B,)
    seq = torch.where(m, a, 0.0).sum(-1) / n.clamp_min(1)  # (B,)
    spread = torch.where(m, (a - seq[:, None]).abs(), 0.0).amax(-1) if a.numel() else a.new_zeros(a.shape[0])
    tol = rtol * (1.0 + (torch.where(m, a.abs(), 0.0).amax() if a.numel() else torch.tensor(0.0)))
    if bool((spread > tol).any()):
        row = int(spread.argmax())
        raise ValueError(
            f"advantages vary over the tokens of sequence {row} (spread {float(spread[row]):.3g}); the DVP loss "
            f"needs one advantage per sequence: set algorithm.adv_estimator to one of {list(OUTCOME_ESTIMATORS)}"
        )
    return torch.where(n > 0, seq, 0.0)


def verl_global_scale(
    agg: str, kept_tokens: float, kept_seqs: float, global_batch_info: Mapping[str, Any]
) -> float:
    """Factor turning :func:`~workbench.rloo.policy_loss`'s local mean into verl's global-batch normalisation.

    verl ≥ 0.6 divides a micro-batch's summed loss by the *global* token (or sequence) count and multiplies
    by the data-parallel size, so micro-batches and ranks add up to the batch mean (``agg_loss`` with
    ``config.global_batch_info``). ``policy_loss`` divides by the local kept count; multiply by this.
    Without global info (older verl, which rescales micro-batches itself) the factor is 1.

    Args:
        agg: a :data:`VERL_AGG` value (``"token_mean"``, ``"seq_mean"``, ``"token_sum"``, ``"seq_mean_token_sum"``).
        kept_tokens: tokens in the local loss (``stats["loss/kept_tokens"]``).
        kept_seqs: sequences in the local loss (``stats["loss/kept_seqs"]``).
        global_batch_info: verl's ``dp_size``, ``batch_num_tokens``, ``global_batch_size`` (any may be absent).

    Returns:
        The scale factor.

    >>> verl_global_scale("token_mean", 30, 4, {"dp_size": 2, "batch_num_tokens": 120})
    0.5
    >>> verl_global_scale("seq_mean", 30, 4, {})
    1.0
    """
    if not global_batch_info:
        return 1.0
    dp = float(global_batch_info.get("dp_size") or 1)
    if agg == "token_sum":
        return dp  # verl: the local token sum times dp_size
    key, local = (
        ("batch_num_tokens", kept_tokens)
        if agg == "token_mean"
        else ("global_batch_size", kept_seqs)  # seq_mean, seq_mean_token_sum
    )
    total = global_batch_info.get(key)
    if total is None:
        return dp  # verl: local count as the denominator, times dp_size
    return float(local) / max(float(total), 1.0) * dp


def with_min_p(sampling_params: Mapping[str, Any], rho: float | None) -> dict[str, Any]:
    """Copy of vLLM sampling parameters with ``min_p = ρ`` (the engine side of DVP).

    Args:
        sampling_params: the dict verl's agent loop passes to its vLLM server.
        rho: the trainer's ρ; ``None`` returns the parameters unchanged.

    Returns:
        A new dict.

    Raises:
        ValueError: the parameters already carry a different, non-zero ``min_p``.

    >>> with_min_p({"temperature": 1.0, "top_p": 1.0}, 1e-4)
    {'temperature': 1.0, 'top_p': 1.0, 'min_p': 0.0001}
    """
    out = dict(sampling_params)
    if rho is None:
        return out
    current = out.get("min_p")
    if current in (None, 0, 0.0):
        out["min_p"] = rho
    elif not math.isclose(float(current), rho, rel_tol=1e-9):
        raise ValueError(
            f"sampling min_p={current!r} differs from the trainer's rho={rho!r}; the engine must prune with the "
            f"trainer's ρ. Remove min_p from the sampling parameters or set rho={current!r} in {ENV_VAR}."
        )
    return out


def dvp_logprobs_from_logits(rho: float | None, chunk_size: int = 1024) -> Callable[..., torch.Tensor]:
    """A drop-in for ``verl.utils.torch_functional.logprobs_from_logits`` returning ``log π^mp``.

    verl calls ``logprobs_from_logits(logits, labels, inplace_backward=True)`` on temperature-scaled logits of
    shape ``[B, T, V]`` (padded path) or ``[nnz, V]`` (remove-padding path); the replacement is
    :func:`workbench.dvp.token_logprobs` with ``ρ`` (``inplace_backward`` is irrelevant to it).

    Args:
        rho: safe-set threshold (``None``: plain log-softmax).
        chunk_size: rows per chunk.

    Returns:
        ``logprobs_from_logits(logits, labels, inplace_backward=True) -> Tensor[...]`` (float32).
    """
    dvp.validate_rho(rho)

    def logprobs_from_logits(
        logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True
    ) -> torch.Tensor:
        del inplace_backward  # flash-attn's in-place backward trick; not needed here
        return dvp.token_logprobs(logits, labels, rho, chunk_size=chunk_size)

    logprobs_from_logits._workbench_dvp = True  # type: ignore[attr-defined]
    return logprobs_from_logits


# ------------------------------------------------------------------ verl rollout_correction → ISConfig
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
    "_target_",  # Hydra's class path in verl's config objects
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
                f"{sorted(VERL_PRESETS)} (combined presets such as decoupled_geo_rs_seq_tis are not "
                "expressible as one mode)."
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


def _parse_verl(c: Mapping[str, Any]) -> tuple[str, float | None, float | None, float | None]:
    """Flat verl keys (trust-region options already taken out) → ``(mode, lo, hi, veto)``."""

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
                "'token_k1', 'seq_sum_k1', 'seq_mean_k1' (other k2/k3 filters and other comma lists are not)."
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


def _split_trust_region(c: Mapping[str, Any]) -> tuple[dict[str, Any], float | None, str]:
    """Take verl's ``seq_max_k2``/``seq_max_k3`` out of ``rollout_rs`` (a comma list): the trust-region rule.

    Returns the flat keys left for :func:`_parse_verl`, the threshold (None: no such option) and the divergence.
    """
    out = dict(c)
    rs = out.get("rollout_rs")
    if not isinstance(rs, str) or "seq_max_" not in rs:
        return out, None, "k3"
    options = [o.strip() for o in rs.split(",") if o.strip()]
    spec = out.get("rollout_rs_threshold")
    if spec is None:
        raise ValueError(f"rollout_rs={rs!r} needs rollout_rs_threshold (e.g. 0.5 for seq_max_k3).")
    specs = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [spec]
    specs = specs * len(options) if len(specs) == 1 else specs
    if len(specs) != len(options):
        raise ValueError(
            f"rollout_rs_threshold={spec!r} gives {len(specs)} thresholds for the {len(options)} options of "
            f"rollout_rs={rs!r}; give one shared threshold or one per option."
        )
    trust = [(o, t) for o, t in zip(options, specs) if o.startswith("seq_max_")]
    rest = [(o, t) for o, t in zip(options, specs) if not o.startswith("seq_max_")]
    (option, threshold), *more = trust
    div = option.removeprefix("seq_max_")
    if more or div not in TRUST_REGION_DIVS:
        raise ValueError(
            f"rollout_rs={rs!r}: one trust-region option is supported, seq_max_k2 or seq_max_k3 "
            f"(→ ISConfig.trust_region_div in {TRUST_REGION_DIVS})."
        )
    lower, upper = _parse_threshold("rollout_rs_threshold", threshold)
    if lower is not None:
        raise ValueError(f"{option} takes one upper bound, not the window {threshold!r} (e.g. 0.5).")
    out["rollout_rs"] = ",".join(o for o, _ in rest) or None
    out["rollout_rs_threshold"] = ",".join(str(t) for _, t in rest) or None
    return out, upper, div


def is_config_from_verl(config: Mapping[str, Any] | str, *, log_clamp: float = DEFAULT_LOG_CLAMP) -> ISConfig:
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
       ``"seq_sum_k1"`` or ``"seq_mean_k1"`` with a ``"lo_hi"`` ``rollout_rs_threshold``, and
       ``"seq_max_k2"`` / ``"seq_max_k3"`` (Trust Region Masking, verl 0.9.1) with one upper bound, alone or
       comma-joined with one other option (``"seq_mean_k1,seq_max_k3"`` with ``"0.999_1.001,0.5"``), which
       becomes ``ISConfig.trust_region`` / ``trust_region_div``. verl's k1 bounds
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
    different levels (e.g. verl ``decoupled_geo_rs_seq_tis``), k2/k3 rejection other than ``seq_max``, ``rollout_is_batch_normalize``,
    geometric truncation. Keys that only choose verl's loss (``bypass_mode``, ``loss_type``,
    ``use_policy_gradient``, …) are ignored: pick ``loss_type`` in :func:`workbench.rloo.policy_loss`.

    Args:
        config: verl mapping (or preset name).
        log_clamp: log-ratio clamp for the result (verl's SAFETY_BOUND is also 20).

    Returns:
        The equivalent :class:`ISConfig`.

    Raises:
        ValueError: unknown key, unknown value, or a combination this workbench cannot express.

    >>> is_config_from_verl({"rollout_is": True, "rollout_is_threshold": 2.0, "rollout_is_level": "token",
    ...                     "rollout_is_mode": "truncate", "rollout_is_veto_threshold": 1e-4})
    ISConfig(mode='token_tis', lo=None, hi=2.0, veto=0.0001, log_clamp=20.0, trust_region=None, trust_region_div='k3')
    >>> is_config_from_verl({"rollout_correction": {"rollout_is": "sequence", "rollout_is_threshold": "0.5_2.0"}})
    ISConfig(mode='seq_mis', lo=0.5, hi=2.0, veto=None, log_clamp=20.0, trust_region=None, trust_region_div='k3')
    """
    flat, trust_region, div = _split_trust_region(_unwrap_verl(config))
    mode, lo, hi, veto = _parse_verl(flat)
    return ISConfig(
        mode=mode,
        lo=lo,
        hi=hi,
        veto=veto,
        log_clamp=log_clamp,
        trust_region=trust_region,
        trust_region_div=div,
    )


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def rollout_correction_for(is_config: ISConfig) -> dict[str, Any]:
    """verl ``algorithm.rollout_correction`` settings equivalent to ``is_config`` (current verl spelling).

    :func:`is_config_from_verl` of the result gives back ``is_config``. Windows are written as verl's
    ``"lo_hi"`` strings (IcePop for ``rollout_is``; for the geometric mask a ``seq_mean_k1`` rejection, whose
    bounds apply to ``log μ/π``, hence the reciprocal window); the trust region is a ``seq_max_k2``/``seq_max_k3``
    rejection (comma-joined after the geometric one).

    Args:
        is_config: the workbench's IS settings.

    Returns:
        ``{"rollout_is": ..., "rollout_is_threshold": ..., "rollout_rs": ..., "rollout_rs_threshold": ...,
        "bypass_mode": False}``.

    Raises:
        ValueError: ``seq_is`` (verl always truncates) or a veto (current verl's ``rollout_correction`` has no
            veto; use ``veto=None`` — with DVP on both sides the tail that triggers it cannot be sampled — or
            the in-loss path, which applies it).

    >>> rollout_correction_for(ISConfig(mode="token_mis", lo=0.5, hi=2.0, veto=None))["rollout_is_threshold"]
    '0.5_2.0'
    """
    mode = is_config.mode
    lo, hi = is_config.bounds
    if (mode in ("token_tis", "seq_tis") and lo is not None) or (
        mode in ("token_mis", "seq_mis") and lo == 0
    ):
        raise ValueError(
            f"{mode} with lo={lo!r} (TRL's lower clip / open lower side) has no verl rollout_correction key; "
            "verl truncates from above only and its IcePop window needs 0 < lo."
        )
    if is_config.veto is not None and mode != "none":
        raise ValueError(
            f"ISConfig.veto={is_config.veto!r} has no verl rollout_correction key; set veto=None (DVP keeps the "
            "tail out of the rollout) or use a verl that passes rollout_log_probs to the loss."
        )
    out: dict[str, Any] = {"rollout_is": None, "rollout_rs": None, "bypass_mode": False}
    if is_config.trust_region is not None:  # verl: one more comma-joined rejection option
        out.update(
            rollout_rs=f"seq_max_{is_config.trust_region_div}", rollout_rs_threshold=is_config.trust_region
        )
    if mode == "none":
        return out
    if mode == "seq_is":
        raise ValueError(
            "mode='seq_is' (untruncated sequence IS) has no verl counterpart; use seq_tis or seq_mis."
        )
    level = "token" if mode.startswith("token") else "sequence"
    if mode in ("token_tis", "seq_tis"):
        out.update(rollout_is=level, rollout_is_threshold=hi)
    elif mode in ("token_mis", "seq_mis"):
        out.update(rollout_is=level, rollout_is_threshold=f"{lo}_{hi}")
    elif mode == "geo_mask":
        assert lo is not None and hi is not None
        geo = ("seq_mean_k1", f"{1.0 / hi!r}_{1.0 / lo!r}")
        if out["rollout_rs"] is None:
            out.update(rollout_rs=geo[0], rollout_rs_threshold=geo[1])
        else:
            out.update(
                rollout_rs=f"{geo[0]},{out['rollout_rs']}",
                rollout_rs_threshold=f"{geo[1]},{out['rollout_rs_threshold']!r}",
            )
    else:  # pragma: no cover - IS_MODES is closed
        raise ValueError(f"unknown IS mode {mode!r}; one of {IS_MODES}")
    return out


def _cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """``config.key`` for verl's dataclass configs, ``config[key]`` for mappings / DictConfig."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


# ------------------------------------------------------------------------------------------- the loss
def dvp_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    rollout_log_probs: torch.Tensor | None = None,
    *,
    settings: VerlDVPConfig | None = None,
    **unused: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl policy loss: the workbench's corrected batch and loss on DVP log-probs, verl's or our IS weights.

    Registered as :data:`LOSS_MODE`. With :func:`install`'s patch, ``log_prob`` and ``old_log_prob`` are
    already ``log π^mp``; this function never needs the logits. The batch goes through
    :func:`workbench.rloo.corrected_batch`, the step the workbench trainer and the TRL trainer run: boundary
    tokens are read from the log-probs (:func:`workbench.metrics.boundary_from_logprobs`), dropped from the
    loss and kept out of the mismatch metrics; advantages are verl's (rejected samples stay in its baseline).

    Args:
        old_log_prob: ``[B, T]`` log-probs at rollout time (decoupled mode: the actor's recompute).
        log_prob: ``[B, T]`` current log-probs (differentiable).
        advantages: ``[B, T]`` token-broadcast outcome advantages.
        response_mask: ``[B, T]`` valid response tokens (verl's rejection sampling already applied).
        loss_agg_mode: one of :data:`VERL_AGG`.
        config: verl's actor config (``clip_ratio``, ``clip_ratio_low/high``, ``clip_ratio_c`` — verl's dual
            clip, applied with ``ppo_clip`` as verl's vanilla loss does — and ``global_batch_info``).
        rollout_is_weights: ``[B, T]`` verl's rollout-correction weights (used as given when present).
        rollout_log_probs: ``[B, T]`` engine log-probs; when given without weights, the IS of ``settings``
            is applied here (old vs rollout), veto included.
        settings: defaults to :func:`active_config`.
        **unused: keyword arguments newer verl versions may add; ignored.

    Returns:
        ``(loss, metrics)``; metric keys are the workbench's (``loss/…``, ``dvp/boundary_tokens``, and ``is/…``,
        ``mismatch/…`` when the IS is computed here).

    Raises:
        ValueError: unsupported ``loss_agg_mode``, token-varying advantages, asymmetric PPO clip.
    """
    del unused
    s = settings if settings is not None else active_config()
    if loss_agg_mode not in VERL_AGG:
        raise ValueError(
            f"actor.loss_agg_mode={loss_agg_mode!r} is not supported by the {LOSS_MODE} loss; use one of "
            f"{list(VERL_AGG)} (workbench agg {list(VERL_AGG.values())})."
        )
    agg = VERL_AGG[loss_agg_mode]
    mask = response_mask.bool()  # (B, T)
    seq_adv = sequence_advantages(advantages, mask)  # (B,)

    clip = _cfg_get(config, "clip_ratio", 0.2)
    low, high = _cfg_get(config, "clip_ratio_low"), _cfg_get(config, "clip_ratio_high")
    low = clip if low is None else low
    high = clip if high is None else high
    if s.loss_type == "ppo_clip" and not math.isclose(float(low), float(high)):
        raise ValueError(
            f"actor.clip_ratio_low={low} != clip_ratio_high={high}; the workbench's PPO clip is symmetric: "
            "set both to actor.clip_ratio."
        )

    old = old_log_prob.detach().float()  # (B, T) log π^mp at rollout time
    in_loss_is = rollout_is_weights is None and rollout_log_probs is not None
    batch = corrected_batch(
        old,
        rollout_log_probs.float() if in_loss_is else None,  # type: ignore[union-attr]
        mask,
        is_config=s.is_config(),
        boundary=metrics.boundary_from_logprobs(old, mask) if s.rho is not None else None,
        advantages=seq_adv,
        is_weights=None if in_loss_is else rollout_is_weights,
    )
    dual = _cfg_get(config, "clip_ratio_c") if s.loss_type == "ppo_clip" else None
    loss, stats = batch.loss(
        log_prob.float(),
        agg=agg,
        loss_type=s.loss_type,
        clip_eps=float(high),
        dual_clip=None if dual is None else float(dual),
    )
    info = _cfg_get(config, "global_batch_info") or {}
    loss = loss * verl_global_scale(agg, stats["loss/kept_tokens"], stats["loss/kept_seqs"], info)
    return loss, {**batch.metrics, **stats}


# ------------------------------------------------------------------------------------ import hooks
class _CallbackLoader:
    """Wraps a module's loader: executes the module, then runs the callbacks registered for it."""

    def __init__(self, loader: Any, name: str, finder: _PostImportFinder) -> None:
        self._loader = loader
        self._name = name
        self._finder = finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        for callback in self._finder.callbacks.pop(self._name, []):
            callback(module)

    def __getattr__(self, name: str) -> Any:  # resources, get_source, ... of the real loader
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` entry that defers to the other finders and wraps the loader of watched modules."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[types.ModuleType], None]]] = {}

    def find_spec(
        self, fullname: str, path: Any, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _CallbackLoader(spec.loader, fullname, self)  # type: ignore[assignment]
        return spec


_FINDER = _PostImportFinder()


def after_import(name: str, callback: Callable[[types.ModuleType], None]) -> None:
    """Run ``callback(module)`` once the module ``name`` is imported — now, if it already is.

    A post-import hook: the callback runs after the module body, before any other module can
    ``from name import ...`` from it, so patched attributes are what importers bind.

    Args:
        name: absolute module name, e.g. ``"verl.utils.torch_functional"``.
        callback: called with the module object.
    """
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    _FINDER.callbacks.setdefault(name, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


# ------------------------------------------------------------------------------------------- install
_PATCHES: list[tuple[Any, str, Any]] = []  # (owner, attribute, original) for uninstall()


def _set(owner: Any, attr: str, value: Any) -> None:
    _PATCHES.append((owner, attr, getattr(owner, attr)))
    setattr(owner, attr, value)


def _register_loss(core_algos: types.ModuleType) -> None:
    core_algos.register_policy_loss(LOSS_MODE)(dvp_policy_loss)


def _patch_logprobs(torch_functional: types.ModuleType, cfg: VerlDVPConfig) -> None:
    original = torch_functional.logprobs_from_logits
    if getattr(original, "_workbench_dvp", False):
        return
    patched = dvp_logprobs_from_logits(cfg.rho, cfg.chunk_size)
    _set(torch_functional, "logprobs_from_logits", patched)
    # Modules that bound the original with `from ... import logprobs_from_logits` before the patch. Read each
    # module's __dict__, never getattr: lazy modules (transformers) import submodules from __getattr__.
    for module in list(sys.modules.values()):
        if module is not None and module is not torch_functional:
            if getattr(module, "__dict__", {}).get("logprobs_from_logits") is original:
                _set(module, "logprobs_from_logits", patched)


def _patch_vllm_server(server_module: types.ModuleType, cfg: VerlDVPConfig) -> None:
    targets = [getattr(server_module, n) for n in _SERVER_CLASSES if hasattr(server_module, n)]
    targets = [c for c in targets if "generate" in vars(c)]
    if not targets:
        raise RuntimeError(
            f"{server_module.__name__} defines none of {_SERVER_CLASSES} with a generate method: this verl "
            f"version is not supported by the min-p patch. Set patch_rollout_min_p=false in {ENV_VAR} and "
            "pass min_p to vLLM yourself, or pin the verl version lessons/11_production.md names."
        )
    for cls in targets:
        original = vars(cls)["generate"]
        if getattr(original, "_workbench_dvp", False):
            continue

        async def generate(
            self: Any, prompt_ids: Any, sampling_params: Any, *args: Any, _orig: Any = original, **kw: Any
        ) -> Any:
            return await _orig(self, prompt_ids, with_min_p(sampling_params, cfg.rho), *args, **kw)

        generate._workbench_dvp = True  # type: ignore[attr-defined]
        _set(cls, "generate", generate)


def install(cfg: VerlDVPConfig | None = None) -> VerlDVPConfig:
    """Register the loss and arrange the patches; safe to call in any process, with or without verl.

    Every step is deferred with :func:`after_import` until verl imports the module concerned (immediate if it
    already has): the loss registration (``verl.trainer.ppo.core_algos``), the ``logprobs_from_logits`` patch
    (``verl.utils.torch_functional``) and the min-p patch (``verl.workers.rollout.vllm_rollout.vllm_async_server``).

    Args:
        cfg: settings; default :meth:`VerlDVPConfig.from_env`.

    Returns:
        The active settings.
    """
    global _ACTIVE
    cfg = cfg if cfg is not None else VerlDVPConfig.from_env()
    _ACTIVE = cfg
    after_import("verl.trainer.ppo.core_algos", _register_loss)
    if cfg.patch_logprobs:
        after_import("verl.utils.torch_functional", lambda m: _patch_logprobs(m, cfg))
    if cfg.patch_rollout_min_p and cfg.rho is not None:
        after_import(
            "verl.workers.rollout.vllm_rollout.vllm_async_server", lambda m: _patch_vllm_server(m, cfg)
        )
    return cfg


def uninstall() -> None:
    """Undo :func:`install`: restore patched attributes and drop pending hooks (the loss stays registered)."""
    global _ACTIVE
    while _PATCHES:
        owner, attr, original = _PATCHES.pop()
        setattr(owner, attr, original)
    _FINDER.callbacks.clear()
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    _ACTIVE = None


# ------------------------------------------------------------------------------------ config check
def _dig(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _is_interp(value: Any) -> bool:
    return isinstance(value, str) and value.strip().startswith("${")


def check_verl_config(cfg: Mapping[str, Any]) -> VerlDVPConfig:
    """Check a verl PPO config (a nested dict, e.g. ``OmegaConf.to_container(cfg)``) for a DVP run.

    Keys that are absent or Hydra interpolations (``${...}``) are left to verl's defaults; explicit values
    must agree with DVP. All problems are reported at once.

    Args:
        cfg: the config mapping.

    Returns:
        The :class:`VerlDVPConfig` found in ``ray_kwargs.ray_init.runtime_env.env_vars`` (defaults if absent).

    Raises:
        ValueError: one line per problem, each with its fix.
    """
    problems: list[str] = []

    def want(key: str, ok: Callable[[Any], bool], fix: str) -> None:
        value = _dig(cfg, key)
        if value is not None and not _is_interp(value) and not ok(value):
            problems.append(f"{key}={value!r}: {fix}")

    want(
        "actor_rollout_ref.actor.policy_loss.loss_mode", lambda v: v == LOSS_MODE, f"set it to {LOSS_MODE!r}"
    )
    if _dig(cfg, "actor_rollout_ref.actor.policy_loss.loss_mode") is None:
        problems.append(f"actor_rollout_ref.actor.policy_loss.loss_mode is unset: set it to {LOSS_MODE!r}")
    want("actor_rollout_ref.actor.loss_agg_mode", lambda v: v in VERL_AGG, f"use one of {list(VERL_AGG)}")
    want(
        "actor_rollout_ref.actor.strategy",
        lambda v: v in ("fsdp", "fsdp2"),
        "the patch covers the FSDP actor only",
    )
    want(
        "actor_rollout_ref.model.use_fused_kernels",
        lambda v: v is False,
        "fused kernels skip the DVP log-probs: false",
    )
    want("actor_rollout_ref.rollout.name", lambda v: v == "vllm", "the min-p patch targets vLLM")
    want(
        "actor_rollout_ref.rollout.calculate_log_probs",
        lambda v: v is True,
        "the rollout log-probs feed IS: true",
    )
    if _dig(cfg, "actor_rollout_ref.rollout.logprobs_mode") is None:
        problems.append(
            "actor_rollout_ref.rollout.logprobs_mode is unset: verl's default raw_logprobs is taken before "
            "temperature and min-p, so the IS ratio of a DVP trainer would carry -log Z; set processed_logprobs"
        )
    want(
        "actor_rollout_ref.rollout.logprobs_mode",
        lambda v: v == "processed_logprobs",
        "use processed_logprobs",
    )
    want(
        "actor_rollout_ref.rollout.top_p",
        lambda v: float(v) == 1.0,
        "top-p truncates beyond the safe set: 1.0",
    )
    want(
        "actor_rollout_ref.rollout.top_k",
        lambda v: int(v) in (-1, 0),
        "top-k truncates beyond the safe set: -1",
    )
    want(
        "algorithm.adv_estimator", lambda v: v in OUTCOME_ESTIMATORS, f"use one of {list(OUTCOME_ESTIMATORS)}"
    )
    want(
        "algorithm.rollout_correction.bypass_mode",
        lambda v: v is False,
        f"bypass mode replaces the loss mode by verl's own; use decoupled mode (false) with {LOSS_MODE}",
    )
    low = _dig(cfg, "actor_rollout_ref.actor.clip_ratio_low")
    high = _dig(cfg, "actor_rollout_ref.actor.clip_ratio_high")
    if (
        low is not None
        and high is not None
        and not (_is_interp(low) or _is_interp(high))
        and float(low) != float(high)
    ):
        problems.append(
            f"actor clip_ratio_low={low} != clip_ratio_high={high}: the workbench clip is symmetric"
        )

    env = _dig(cfg, "ray_kwargs.ray_init.runtime_env.env_vars") or {}
    modules = str(env.get("VERL_USE_EXTERNAL_MODULES", ""))
    if PLUGIN_MODULE not in [m.strip() for m in modules.split(",")]:
        problems.append(
            f"ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES={modules!r}: add {PLUGIN_MODULE!r} "
            "so every worker installs the loss and the patches"
        )
    settings = VerlDVPConfig()
    if env.get(ENV_VAR) is not None:
        try:
            settings = VerlDVPConfig.from_json(str(env[ENV_VAR]))
        except ValueError as e:
            problems.append(str(e))
    rc = _dig(cfg, "algorithm.rollout_correction")
    if isinstance(rc, Mapping):
        try:
            verl_is = is_config_from_verl({"rollout_correction": dict(rc)})
        except ValueError as e:
            problems.append(f"algorithm.rollout_correction: {e}")
        else:
            ours = settings.is_config()
            theirs_tr = (verl_is.trust_region, verl_is.trust_region_div if verl_is.trust_region else None)
            ours_tr = (ours.trust_region, ours.trust_region_div if ours.trust_region else None)
            if (verl_is.mode, verl_is.bounds, theirs_tr) != (ours.mode, ours.bounds, ours_tr):
                problems.append(
                    f"algorithm.rollout_correction means IS {verl_is.mode} {verl_is.bounds} trust region {theirs_tr} "
                    f"but {ENV_VAR} says {ours.mode} {ours.bounds} trust region {ours_tr}; write it with "
                    "rollout_correction_for(VerlDVPConfig(...).is_config())"
                )
    if problems:
        raise ValueError("verl config is not ready for DVP:\n  " + "\n  ".join(problems))
    return settings
