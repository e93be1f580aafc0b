"""A short supervised warm start, so RL begins from a competent (and realistically peaked) policy.

Why it is fast (MEASUREMENTS.md: a plain SFT of a 5 M-parameter model took ~9 min here):

1. A small model (hidden 64–96, 2 layers; the 4k-id vocabulary is the bulk of the parameters).
2. Loss on the completion tokens only, where the information is; prompts are free context.
3. A high peak learning rate with linear warm-up and cosine decay, which tiny models tolerate.
4. Results are cached by a hash of the config, and the recipes in :data:`PRESETS` are shipped as
   small pretrained policies under ``workbench/assets/policies`` (remake them with
   ``workbench sft --preset NAME --out workbench/assets/policies``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench import models, tasks


@dataclass(frozen=True)
class SFTConfig:
    """A warm-start recipe. Its hash names the cache entry, so every field matters."""

    task: str = "addition"
    """Task name from ``workbench.tasks.TASKS``."""
    task_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments for the task constructor."""
    model: models.TinyModelConfig = field(default_factory=models.TinyModelConfig)
    """Architecture of the tiny model to train from scratch."""
    steps: int = 600
    """Optimizer steps."""
    batch_size: int = 64
    """Sequences per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 30
    """Linear warm-up steps before the cosine decay."""
    min_lr_frac: float = 0.05
    """Final learning rate as a fraction of ``lr``."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing; > 0 leaves a heavier tail on the unused ids."""
    seed: int = 0
    """Seeds data order and initialisation."""

    def __post_init__(self) -> None:
        for name, value, ok, allowed in [
            ("steps", self.steps, self.steps >= 1, ">= 1"),
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("lr", self.lr, 0 < self.lr < 1, "0 < lr < 1"),
            (
                "warmup_steps",
                self.warmup_steps,
                0 <= self.warmup_steps < self.steps,
                "0 <= warmup_steps < steps",
            ),
            ("min_lr_frac", self.min_lr_frac, 0 <= self.min_lr_frac <= 1, "[0, 1]"),
            ("label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1, "[0, 1)"),
        ]:
            if not ok:
                raise ValueError(f"SFTConfig.{name}={value!r} is invalid: allowed {allowed}")
        if self.task not in tasks.TASKS:
            raise ValueError(f"SFTConfig.task={self.task!r} is unknown: allowed {sorted(tasks.TASKS)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (nested model config included)."""
        d = dataclasses.asdict(self)
        d["task_kwargs"] = dict(self.task_kwargs)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SFTConfig:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["model"] = models.TinyModelConfig(**data.get("model", {}))
        return cls(**data)

    def digest(self) -> str:
        """Short stable hash of the recipe (the cache key)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


#: Recipes of the shipped policies (``workbench/assets/policies/<name>``).
PRESETS: dict[str, SFTConfig] = {
    # 2-digit additions, answer then eos: the default policy of the trainer and the notebooks.
    "add2": SFTConfig(task="addition", task_kwargs={"digits": 2}),
    # Pose-and-solve further additions: long (~24-token) open-ended responses for the collapse experiments.
    "multiadd": SFTConfig(task="multiadd", steps=800),
}


def _batch(task: tasks.Task, tokenizer: Any, n: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, labels)``; labels are −100 on prompt and padding positions."""
    seqs, labels = [], []
    for problem in task.sample(n, rng):
        prompt = models.encode_prompt(tokenizer, problem.prompt)
        full = models.encode_prompt(tokenizer, task.sft_text(problem)) + [tokenizer.eos_token_id]
        seqs.append(full)
        labels.append([-100] * len(prompt) + full[len(prompt) :])
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])  # (B, L)
    lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])  # (B, L)
    return ids, lab


def train_sft(
    cfg: SFTConfig,
    *,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[torch.nn.Module, Any, list[float]]:
    """Train a tiny policy from scratch on ``cfg.task``'s ideal completions.

    Returns ``(model, tokenizer, losses)``; ``callback(step, loss)`` is called after every step.
    """
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    task = tasks.make_task(cfg.task, **dict(cfg.task_kwargs))
    tokenizer = models.build_tokenizer(cfg.model.vocab_size)
    model = models.build_tiny_model(cfg.model, tokenizer)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress_ = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress_))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses: list[float] = []
    for step in tqdm(range(cfg.steps), desc=f"sft {cfg.task}", disable=not progress, leave=False):
        ids, labels = _batch(task, tokenizer, cfg.batch_size, rng)
        logits = model(
            input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()
        ).logits  # (B, L, V)
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            labels[:, 1:].flatten(),
            ignore_index=-100,
            label_smoothing=cfg.label_smoothing,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if callback is not None:
            callback(step, float(loss))
    model.eval()
    return model, tokenizer, losses


@torch.no_grad()
def sampled_accuracy(
    model: torch.nn.Module, tokenizer: Any, task: tasks.Task, n: int = 256, seed: int = 0
) -> float:
    """Mean reward of ``n`` responses sampled at temperature 1 (what RL starts from)."""
    from workbench.engines import TorchEngine

    problems = task.sample(n, random.Random(seed))
    engine = TorchEngine(
        model, dtype="fp32", eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    rollout = engine.generate(
        [models.encode_prompt(tokenizer, p.prompt) for p in problems],
        n=1,
        max_tokens=task.max_new_tokens,
        rho=None,
        temperature=1.0,
        seed=seed,
    )
    total = 0.0
    for p, row, length in zip(problems, rollout.tokens.tolist(), rollout.lengths.tolist()):
        text = tokenizer.decode([t for t in row[:length] if t != tokenizer.eos_token_id])
        total += task.reward(p, text)
    return total / n


def default_cache_dir() -> Path:
    """``$WORKBENCH_CACHE`` or ``~/.cache/dvp-workbench``."""
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "dvp-workbench"))


def sft_policy(
    cfg: SFTConfig, *, out_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> Path:
    """Return a directory holding the policy trained by ``cfg``, training it only when not cached.

    The directory (``<cache>/sft/<digest>`` unless ``out_dir`` is given) is a normal HF model dir
    whose metadata (:func:`workbench.models.policy_metadata`) holds the recipe, the final loss,
    the sampled accuracy and the wall time.
    """
    target = Path(out_dir) if out_dir is not None else default_cache_dir() / "sft" / cfg.digest()
    if (target / "config.json").exists() and models.policy_metadata(target).get("digest") == cfg.digest():
        return target
    t0 = time.perf_counter()
    model, tokenizer, losses = train_sft(cfg, progress=progress)
    task = tasks.make_task(cfg.task, **dict(cfg.task_kwargs))
    meta = {
        "digest": cfg.digest(),
        "config": cfg.to_dict(),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "sampled_accuracy": sampled_accuracy(model, tokenizer, task),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "remake": "workbench sft --preset NAME --out workbench/assets/policies (or workbench sft --config FILE)",
    }
    models.save_policy(model, tokenizer, target, metadata=meta)
    return target
