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
   all-reduced across tensor-parallel ranks).
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
   ``ISConfig.from_verl``). verl's bypass mode replaces the loss mode by its own and cannot be used. When a
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
from workbench.importance import IS_MODES, ISConfig
from workbench.rloo import policy_loss

__all__ = [
    "ENV_VAR",
    "LOSS_MODE",
    "PLUGIN_MODULE",
    "VERL_AGG",
    "VerlDVPConfig",
    "active_config",
    "after_import",
    "check_verl_config",
    "dvp_logprobs_from_logits",
    "dvp_policy_loss",
    "install",
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
VERL_AGG: dict[str, str] = {"token-mean": "token_mean", "seq-mean-token-mean": "seq_mean"}
"""verl ``loss_agg_mode`` → :func:`workbench.rloo.policy_loss` ``agg`` (the two modes with a counterpart)."""
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

    rho: float | None = math.exp(-13)  # paper default ρ = e^-13 (THEORY.md, Section 5)
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
        return ISConfig(mode=self.is_mode, lo=self.is_lo, hi=self.is_hi, veto=self.is_veto)

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
        agg: ``"token_mean"`` or ``"seq_mean"``.
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
    key, local = (
        ("batch_num_tokens", kept_tokens) if agg == "token_mean" else ("global_batch_size", kept_seqs)
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


def rollout_correction_for(is_config: ISConfig) -> dict[str, Any]:
    """verl ``algorithm.rollout_correction`` settings equivalent to ``is_config`` (current verl spelling).

    ``ISConfig.from_verl`` of the result gives back ``is_config``. Windows are written as verl's ``"lo_hi"``
    strings (IcePop for ``rollout_is``; for the geometric mask a ``seq_mean_k1`` rejection, whose bounds apply
    to ``log μ/π``, hence the reciprocal window).

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
    if is_config.veto is not None and mode != "none":
        raise ValueError(
            f"ISConfig.veto={is_config.veto!r} has no verl rollout_correction key; set veto=None (DVP keeps the "
            "tail out of the rollout) or use a verl that passes rollout_log_probs to the loss."
        )
    out: dict[str, Any] = {"rollout_is": None, "rollout_rs": None, "bypass_mode": False}
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
        out.update(rollout_rs="seq_mean_k1", rollout_rs_threshold=f"{1.0 / hi!r}_{1.0 / lo!r}")
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
    """verl policy loss: :func:`workbench.rloo.policy_loss` on DVP log-probs with verl's or our IS weights.

    Registered as :data:`LOSS_MODE`. With :func:`install`'s patch, ``log_prob`` and ``old_log_prob`` are
    already ``log π^mp``; this function never needs the logits.

    Args:
        old_log_prob: ``[B, T]`` log-probs at rollout time (decoupled mode: the actor's recompute).
        log_prob: ``[B, T]`` current log-probs (differentiable).
        advantages: ``[B, T]`` token-broadcast outcome advantages.
        response_mask: ``[B, T]`` valid response tokens (verl's rejection sampling already applied).
        loss_agg_mode: ``"token-mean"`` or ``"seq-mean-token-mean"``.
        config: verl's actor config (``clip_ratio``, ``clip_ratio_low/high``, ``global_batch_info``).
        rollout_is_weights: ``[B, T]`` verl's rollout-correction weights (used as given when present).
        rollout_log_probs: ``[B, T]`` engine log-probs; when given without weights, the IS of ``settings``
            is applied here (old vs rollout), veto included.
        settings: defaults to :func:`active_config`.
        **unused: keyword arguments newer verl versions may add; ignored.

    Returns:
        ``(loss, metrics)``; metric keys are the workbench's (``loss/…``, and ``is/…``, ``mismatch/…`` when the
        IS is computed here).

    Raises:
        ValueError: unsupported ``loss_agg_mode``, token-varying advantages, asymmetric PPO clip.
    """
    del unused
    s = settings if settings is not None else active_config()
    if loss_agg_mode not in VERL_AGG:
        raise ValueError(
            f"actor.loss_agg_mode={loss_agg_mode!r} is not supported by the {LOSS_MODE} loss; use one of "
            f"{list(VERL_AGG)} (workbench agg token_mean / seq_mean)."
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

    logged: dict[str, float] = {}
    keep, weights = mask, rollout_is_weights
    if rollout_is_weights is None and rollout_log_probs is not None:
        old = old_log_prob.detach().float()
        res = s.is_config().apply(old, rollout_log_probs.float(), mask)
        keep, weights = res.keep, res.weights
        logged.update(res.stats)
        logged.update(metrics.mismatch_metrics(old, rollout_log_probs.float(), mask))

    loss, stats = policy_loss(
        log_prob.float(),
        seq_adv,
        keep,
        weights,
        agg=agg,
        loss_type=s.loss_type,
        logp_old=old_log_prob,
        clip_eps=float(high),
    )
    info = _cfg_get(config, "global_batch_info") or {}
    loss = loss * verl_global_scale(agg, stats["loss/kept_tokens"], stats["loss/kept_seqs"], info)
    logged.update(stats)
    return loss, logged


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
    # Modules that bound the original with `from ... import logprobs_from_logits` before the patch.
    for module in list(sys.modules.values()):
        if module is not None and module is not torch_functional:
            if getattr(module, "logprobs_from_logits", None) is original:
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
            verl_is = ISConfig.from_verl({"rollout_correction": dict(rc)})
        except ValueError as e:
            problems.append(f"algorithm.rollout_correction: {e}")
        else:
            ours = settings.is_config()
            if (verl_is.mode, verl_is.bounds) != (ours.mode, ours.bounds):
                problems.append(
                    f"algorithm.rollout_correction means IS {verl_is.mode} {verl_is.bounds} but {ENV_VAR} says "
                    f"{ours.mode} {ours.bounds}; write it with rollout_correction_for(VerlDVPConfig(...).is_config())"
                )
    if problems:
        raise ValueError("verl config is not ready for DVP:\n  " + "\n  ".join(problems))
    return settings
