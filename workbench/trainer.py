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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from workbench import dvp, metrics, models
from workbench.config import DTYPES, RLOOConfig  # RLOOConfig lives in config.py; re-exported here
from workbench.importance import IS_METRIC_DOCS
from workbench.rloo import BATCH_METRIC_DOCS, LOSS_METRIC_DOCS, corrected_batch

TRAINER_METRIC_DOCS: dict[str, str] = {
    "step": "optimizer step index (1-based) after which the metrics were taken",
    "reward/mean": "mean task reward of the sampled responses (in [0, 1])",
    "reward/std": "standard deviation of the sampled rewards",
    "reward/accuracy": "fraction of sampled responses with reward 1",
    "response/length_mean": "mean response length in tokens (eos included)",
    **metrics.TAIL_METRIC_DOCS,  # computed by metrics.tail_draw_metrics
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
        self.model = model.to(device=config.device, dtype=DTYPES[config.train_dtype])
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
        full-vocabulary kernel runs on :meth:`_entropy_scaled_logits` (which gives exactly ``log π^mp``), and
        a second, gradient-free pass over the unpruned logits places each token in its *unpruned* row (gap,
        full log π) for the tail-draw metrics.
        """
        cfg = self.config
        if cfg.rho_entropy_scale == 0:
            stats = dvp.token_stats(
                logits, tokens, cfg.rho, chunk_size=cfg.chunk_size, temperature=cfg.temperature
            )
            log_rho = (
                None if cfg.rho is None else torch.full(tokens.shape, math.log(cfg.rho), device=tokens.device)
            )
            return stats, log_rho
        masked, keep, log_rho = self._entropy_scaled_logits(logits)
        inner = dvp.token_stats(masked, tokens, None, chunk_size=cfg.chunk_size)
        full = dvp.token_stats(
            logits.detach(), tokens, None, chunk_size=cfg.chunk_size, temperature=cfg.temperature
        )
        with torch.no_grad():
            z = logits.detach().float() / cfg.temperature  # (N, T, V)
            logz = torch.logsumexp(z.masked_fill(~keep, float("-inf")), -1) - torch.logsumexp(z, -1)  # (N, T)
        stats = dvp.TokenStats(
            logp=inner.logp,
            logz=logz,
            entropy=inner.entropy,
            safe_size=keep.sum(-1),
            gap=full.gap,
            full_logp=full.full_logp,
        )
        return stats, log_rho

    def _entropy_scaled_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The logits of ``π^mp`` under the entropy-scaled ρ: ``(masked (N, T, V), keep (N, T, V), log ρ(s) (N, T))``.

        The safe set of each state uses ``log ρ(s) = log ρ · (1 + κ H(s))`` (:func:`workbench.dvp.entropy_scaled_safe_mask`);
        ``masked`` is ``z / T`` on it and the constant ``max − MASK_MARGIN`` (no gradient, as in
        :func:`workbench.dvp.masked_logits`) outside it, so the plain log-softmax of ``masked`` is ``log π^mp``.
        """
        cfg = self.config
        assert cfg.rho is not None  # checked in RLOOConfig
        with torch.no_grad():
            z = logits.detach().float() / cfg.temperature  # (N, T, V)
            keep, log_rho = dvp.entropy_scaled_safe_mask(z, math.log(cfg.rho), cfg.rho_entropy_scale)
            top = z.amax(-1, keepdim=True)  # (N, T, 1)
        masked = torch.where(keep, logits.float() / cfg.temperature, top - dvp.MASK_MARGIN)  # (N, T, V)
        return masked, keep, log_rho

    def _policy_stats(self, rollout: Any) -> tuple[dvp.TokenStats, torch.Tensor | None]:
        """The trainer's forward: DVP statistics of the sampled tokens (``logp`` differentiable) and the
        ``log ρ`` pruned with at each position (``None``: no pruning).

        The fused LM head (:meth:`_fused_stats`) when it applies, so the ``(N, T, V)`` logits never exist;
        else the logits path (:meth:`_token_stats`). Same numbers either way up to float rounding.
        """
        head = self._head()
        if head is None:
            return self._token_stats(self._forward(rollout), rollout.tokens)
        rho = self.config.rho
        mask = rollout.mask  # (N, T)
        log_rho = None if rho is None else torch.full(mask.shape, math.log(rho), device=mask.device)
        return self._fused_stats(rollout, head), log_rho

    def _policy_logp(self, rollout: Any) -> torch.Tensor:
        """``log π^mp`` of the sampled tokens under the current weights, ``(N, T)`` differentiable: the input of
        the PPO epochs after the first.

        Equal to ``_policy_stats(rollout)[0].logp``. Under the entropy-scaled ρ it skips what only the metrics
        read (the unpruned pass, ``log Z``, the safe-set sizes) and asks the kernel for log-probs alone.
        """
        head = self._head()
        if head is not None:
            return self._fused_stats(rollout, head).logp
        logits = self._forward(rollout)  # (N, T, V)
        if self.config.rho_entropy_scale == 0:
            return self._token_stats(logits, rollout.tokens)[0].logp
        masked, _, _ = self._entropy_scaled_logits(logits)
        return dvp.token_logprobs(masked, rollout.tokens, None, chunk_size=self.config.chunk_size)

    def _rollout(self) -> tuple[list[Any], Any]:
        """Sample ``k`` responses to each of this step's prompts with the engine: ``(problems, rollout)``."""
        cfg = self.config
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
        return problems, rollout

    def _rewards(self, problems: list[Any], rollout: Any) -> torch.Tensor:
        """The task's reward of every sampled response, ``(N,)`` fp32 on the rollout's device."""
        texts = self._decode(rollout)
        return torch.tensor(
            [self.task.reward(problems[int(i)], t) for i, t in zip(rollout.prompt_index, texts)],
            dtype=torch.float32,
            device=rollout.tokens.device,
        )  # (N,)

    def _update(self, rollout: Any, batch: Any, logp: torch.Tensor) -> tuple[dict[str, float], float, float]:
        """``ppo_epochs`` optimiser passes over one corrected batch: loss → backward → clip → AdamW step.

        The first pass uses ``logp`` from this step's forward; later ones (``ppo_clip`` only) recompute it under
        the updated weights (:meth:`_policy_logp`) against the batch's fixed ``logp_old``, weights and advantages.
        The schedule then advances one step.

        Returns:
            The last pass's loss statistics, its gradient norm before clipping and the learning rate it used.
        """
        cfg = self.config
        for epoch in range(cfg.ppo_epochs):
            if epoch > 0:
                logp = self._policy_logp(rollout)
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
        return loss_stats, float(grad_norm), float(lr)

    def _eval_reward(self) -> float:
        """:meth:`evaluate` at step 1 and every ``eval_every`` steps; ``nan`` on the others (and with eval off)."""
        every = self.config.eval_every
        due = every and (self.step_count == 1 or self.step_count % every == 0)
        return self.evaluate() if due else math.nan

    def _record(self, out: dict[str, float]) -> None:
        """Append a step's metrics row to :attr:`history` and, with a run directory, to ``metrics.jsonl``."""
        self.history.append(out)
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(out) + "\n")

    def step(self) -> dict[str, float]:
        """Run one RLOO step, as the module docstring draws it; returns its metrics row.

        rollout → rewards → DVP log-probs → corrected batch (IS weights, boundary tokens, advantages) →
        loss → update → weight sync → metrics (history, ``metrics.jsonl``).
        """
        cfg = self.config
        t0 = time.perf_counter()
        problems, rollout = self._rollout()
        t_rollout = time.perf_counter() - t0
        rewards = self._rewards(problems, rollout)  # (N,)

        t1 = time.perf_counter()
        mask = rollout.mask  # (N, T)
        stats, log_rho = self._policy_stats(rollout)  # stats.logp: (N, T), differentiable
        # Boundary tokens: sampled outside the trainer's own safe set (per state under the entropy-scaled ρ).
        if cfg.rho_entropy_scale > 0:
            boundary = metrics.boundary_from_logprobs(stats.logp, mask)
        else:
            boundary = stats.outside(cfg.rho, mask)  # all False when ρ is None
        batch = corrected_batch(
            stats.logp,
            rollout.logprobs,
            mask,
            is_config=self._is,
            boundary=boundary,
            drop_boundary=cfg.drop_boundary_tokens,
            drop_boundary_suffix=cfg.drop_boundary_suffix,
            rewards=rewards,
            k=cfg.k,
            advantage=cfg.advantage,
            rejected_in_baseline=cfg.rejected_in_baseline,
            verl_metrics=cfg.verl_metrics,
        )
        loss_stats, grad_norm, lr = self._update(rollout, batch, stats.logp)
        t_train = time.perf_counter() - t1

        t2 = time.perf_counter()
        self.engine.sync_weights(self.model)
        t_sync = time.perf_counter() - t2
        self.step_count += 1
        eval_reward = self._eval_reward()

        n_tok = int(mask.sum())
        step_s = time.perf_counter() - t0
        out: dict[str, float] = {
            "step": float(self.step_count),
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "reward/accuracy": float((rewards >= 1.0).float().mean()),
            "response/length_mean": float(rollout.lengths.float().mean()),
            **metrics.tail_draw_metrics(stats, rollout.logprobs, mask, batch.advantages),
            "dvp/log_rho_mean": float(log_rho[mask].double().mean())
            if log_rho is not None and bool(mask.any())
            else math.nan,
            "eval/reward": eval_reward,
            "optim/grad_norm": grad_norm,
            "optim/lr": lr,
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
        self._record(out)
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
        model, _ = models.load_policy(ckpt, dtype=DTYPES[self.config.train_dtype])
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
