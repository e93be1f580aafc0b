"""A short supervised warm start, so RL begins from a competent (and realistically peaked) policy.

``preset_policy("add2")`` gives the directory of a shipped policy (or, when the recipe has changed
since it was shipped, a cached or freshly trained one); ``sft_policy(cfg)`` does the same for any
:class:`SFTConfig`, cached by its digest. Load the result with ``workbench.models.load_policy`` or
name it as the trainer's ``model``. Remake a shipped policy with
``workbench sft --preset NAME --out workbench/assets/policies`` (``make policies`` remakes all).

The shipped recipes (:data:`PRESETS`; measured 2026-11-22 on this 2-core machine, CPU seconds of
one thread — the shared machine's wall time was 4–5× longer; accuracy of 256 responses at
temperature 1 without min-p, i.e. what RL starts from; "tail" = teacher-forced completion positions):

| preset | steps × 64 | CPU s | loss | sampled | greedy | ids with p < e⁻¹³·p_max | unused gap | unused mass |
|---|---|---|---|---|---|---|---|---|
| ``add2`` | 2000 | 95 | 0.18 | 0.59 | 0.77 | 99.0 % | 21.8 nats | 3e-4 |
| ``multiadd`` | 1500 | 203 | 0.85 | 0.90 | 0.95 | 99.4 % | 19.9 nats | 1e-4 |
| ``multiadd_smooth`` | 1500 | 248 | 1.02 | 0.69 | 0.79 | 32 % | 12.7 nats | 1e-2 |
| ``multiadd6`` (2026-12-04) | 1500 | 539 | 0.97 | 0.80 | 0.54 | 99.5 % | 23.7 nats | 1e-4 |
| ``multiadd12`` (2026-12-04) | 1500 | 881 | 1.07 | 0.47 | 0.42 | 99.3 % | 26.0 nats | 2e-4 |
| ``multiadd24`` (2026-12-05) | 1500 | 1830 | 1.09 | 0.38 | 0.57 | 97.6 % | 22.5 nats | 3e-4 |

("unused gap": median over positions and ``<unused_i>`` ids of ``max logit − logit``; "unused
mass": their total probability per position; :func:`tail_stats`.) Each policy was trained with 0.37 M
parameters (four 16-wide heads) and is saved with its heads widened to 32 (:attr:`SFTConfig.serve_head_dim`,
:func:`workbench.models.widen_heads`: the same function to float rounding — max |Δ log p| 1.9e-5 — so the
table holds) so that vLLM's CPU attention can serve it: 0.40 M parameters, 1.7 MB on disk in fp32.
``multiadd``'s loss floor is high because the posed operands are random. ``multiadd6`` (six posed
additions, responses up to 64 tokens), ``multiadd12`` (twelve, up to 124 tokens) and ``multiadd24``
(twenty-four, up to 244: the 256 positions are nearly full) are the long-horizon starts of issue 14;
``multiadd6``'s greedy decode scores below its samples (0.54 vs 0.80): greedy decoding poses the same
addition again (22 of 24 prompts checked), which the task does not reward. ``multiadd12`` gets half
of its twelve additions right (0.47): the same 0.4 M model and 1,500 steps, twice the length — room
for RL to improve, which the horizon study's control arm does (0.45 → 0.59 in 150 steps).
``multiadd24`` samples 0.38 and greedy-decodes 0.57, with a fatter safe set (98 ids on average against
28): its SFT ran 61 min of wall time for 1,830 CPU s, shared with benchmarks.

How it departs from a plain SFT loop (MEASUREMENTS.md: a 5 M-parameter model took ~9 min here):

1. **A small model, one thread.** A step is compute-bound: about ``6 × (body parameters +
   hidden × vocab)`` FLOPs per trained token, and the tied 4,096-id embedding holds most of the
   parameters. The default :class:`~workbench.models.TinyModelConfig` (hidden 64, 2 layers) learned
   2-digit addition as fast per example as hidden 128 with 2 or 3 layers, at 40 vs 70–95 ms a step.
   Training runs on one intra-op thread (:data:`DEFAULT_THREADS`): two spin-wait on a shared machine.
2. **Logits only where the loss is.** The decoder runs on the whole sequence but the lm_head (the
   ``hidden × vocab`` matmul and the 4,096-way softmax) runs only on the completion positions
   (:func:`sft_loss`; :func:`sft_loss_reference` is the plain version it is tested against). The
   prompt is random digits: nothing to learn there.
3. **No padding work.** Sequences are right-padded with no attention mask: a causal model's real
   tokens never attend to the later pads, and their positions ``0, 1, …`` are the ones the engines
   give left-padded prompts (``cumsum(attention_mask) − 1``). Packing would need block-diagonal
   masks to save < 30 % padding, so there is none.
4. **A schedule tuned for the toy**: AdamW (β₂ = 0.98) at a peak rate of 3e-3 after 50 warm-up
   steps, cosine decay to 5 %. Learning is a sudden drop of the loss (``multiadd``: sampled accuracy
   0.17 at step 500, 0.80 at step 1000), and a schedule must still be at a high rate when it comes.
5. **Caching by recipe hash** (:meth:`SFTConfig.digest`, which also covers :data:`SFT_CODE_VERSION`)
   and shipped policies, so notebooks and tests start in seconds.

What did not help (kept so nobody tries again; same machine, sampled accuracy at T = 1):

- Peak rate 1e-2 (hidden 128): stalled at loss 1.47 after 600 steps. 6e-3 helped ``add2`` with a
  cosine (0.43 at step 1000 vs 0.15) but not with a held rate ("wsd", 1200 steps: 0.23).
- Shorter ``multiadd`` runs: a cosine over 800 or 1100 steps ends before the drop (0.13, 0.10);
  "wsd" at 6e-3 over 800 steps: 0.09. Starting ``multiadd`` from the ``add2`` policy at 3e-3
  unlearned the addition (0.07 after 400 steps).
- bf16 autocast (the CPU has AMX): no faster, the tiny ops are overhead-bound. Larger batches cost
  proportionally more per step beyond 64 sequences.
- Label smoothing 0.1 (the textbook value): every id inside the e⁻¹³ safe set, 10 % of each
  position's mass on unused ids, sampled accuracy 0.08. Hence ε = 0.01 for ``multiadd_smooth``: the
  unused ids sit ≈ 13 nats down, straddling the min-p threshold, 1 % tail mass per token.

The vocabulary stays at 4,096 ids: the never-trained ``<unused_i>`` ids are the *tail* the research
is about (THEORY.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench import models, tasks
from workbench.dvp import DEFAULT_RHO

SFT_CODE_VERSION: int = 2
"""Bumped whenever :func:`train_sft` changes what a given config produces; part of every digest, so
stale cache entries and shipped policies are recognised as such."""
EVAL_SAMPLES: int = 256
"""Responses :func:`sft_policy` samples (temperature 1, seed :data:`EVAL_SEED`) to record accuracy."""
EVAL_SEED: int = 0
"""Seed of the recorded accuracy evaluation (problems and sampling)."""
REMAKE_COMMAND: str = "workbench sft --preset {name} --out workbench/assets/policies"
"""How a shipped policy is remade (recorded in its metadata)."""
SCHEDULES: tuple[str, ...] = ("wsd", "cosine")
"""Learning-rate shapes after the warm-up (:func:`lr_factor`)."""
IGNORE_INDEX: int = -100
"""Label of positions that carry no loss (prompt and padding), as in ``F.cross_entropy``."""
DEFAULT_THREADS: int | None = 1
"""Intra-op threads while training and evaluating (restored afterwards; ``None`` leaves torch's
setting). One thread: the ops of a tiny model are too small to split, and on a shared 2-core machine
two OpenMP threads spin-wait for each other — measured here under load: 1.6 s vs 0.12 s per ``add2``
step. Fixing the count also fixes the float reduction order, so a recipe reproduces bit for bit."""


def _check(name: str, value: Any, ok: bool, allowed: str, fix: str) -> None:
    if not ok:
        raise ValueError(f"SFTConfig.{name}={value!r} is invalid: allowed {allowed}; {fix}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SFTConfig:
    """A warm-start recipe. Its :meth:`digest` names the cache entry, so every field matters.

    >>> cfg = SFTConfig(task="addition", task_kwargs={"digits": 1}, steps=10, warmup_steps=2)
    >>> SFTConfig.from_dict(cfg.to_dict()) == cfg, len(cfg.digest())
    (True, 16)
    """

    task: str = "addition"
    """Task name from ``workbench.tasks.TASKS``."""
    task_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments for the task constructor (JSON-serialisable: they are hashed)."""
    model: models.TinyModelConfig = field(default_factory=models.TinyModelConfig)
    """Architecture (and init seed) of the tiny model trained from scratch. Keep ``vocab_size`` at
    4,096: the never-trained ids are the tail the research studies."""
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 64
    """Sequences per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (tiny models tolerate a high one; 1e-2 stalls them)."""
    warmup_steps: int = 50
    """Linear warm-up steps before the decay (a warm-up of ``steps`` or more only ramps up, so
    ``dataclasses.replace(preset, steps=3)`` stays a valid smoke test)."""
    schedule: str = "cosine"
    """After the warm-up: ``"cosine"`` decay, or ``"wsd"`` (warmup-stable-decay: hold the peak rate,
    then decay linearly over the last ``decay_frac`` of the run)."""
    decay_frac: float = 0.2
    """Fraction of the post-warm-up steps spent decaying (``"wsd"`` only)."""
    min_lr_frac: float = 0.05
    """Final learning rate as a fraction of ``lr``."""
    weight_decay: float = 0.0
    """AdamW weight decay on the matrices (embedding included); norms are never decayed."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing ε: the target puts ε/V on every id, so the unused ids settle
    about ``log((1 − ε)·V/ε)`` nats below the top (10.5 nats for ε = 0.1, V = 4,096) — a heavier,
    more realistic tail than plain SFT leaves."""
    seed: int = 0
    """Seeds the data order (the model's init has its own ``model.seed``)."""
    serve_head_dim: int | None = 32
    """After training, heads narrower than this are widened to it with
    :func:`workbench.models.widen_heads` — an exact, function-preserving change — so vLLM's CPU
    attention (head widths 32, 64, ...) can serve the saved policy. ``None`` saves the trained shape.
    Must be a multiple of ``model.head_dim`` when larger."""

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or self.task not in tasks.TASKS:
            raise ValueError(
                f"SFTConfig.task={self.task!r} is unknown: allowed {sorted(tasks.TASKS)}; "
                "pick a registered task name"
            )
        if not isinstance(self.task_kwargs, Mapping):
            raise ValueError(
                f"SFTConfig.task_kwargs={self.task_kwargs!r} must be a mapping such as {{'digits': 2}}"
            )
        try:
            json.dumps(dict(self.task_kwargs), sort_keys=True)
        except TypeError as e:
            raise ValueError(
                f"SFTConfig.task_kwargs={self.task_kwargs!r} must be JSON-serialisable (it is hashed): {e}"
            ) from e
        tasks.make_task(self.task, **dict(self.task_kwargs))  # raises a ValueError naming a bad knob
        if not isinstance(self.model, models.TinyModelConfig):
            raise ValueError(
                f"SFTConfig.model={self.model!r} must be a workbench.models.TinyModelConfig "
                "(SFTConfig.from_dict turns a dict into one)"
            )
        _check("steps", self.steps, _is_int(self.steps) and self.steps >= 1, "an integer >= 1", "e.g. 2000")
        _check(
            "batch_size",
            self.batch_size,
            _is_int(self.batch_size) and self.batch_size >= 1,
            "an integer >= 1",
            "e.g. 64",
        )
        _check("lr", self.lr, _is_real(self.lr) and 0 < self.lr < 1, "0 < lr < 1", "e.g. 3e-3")
        _check(
            "warmup_steps",
            self.warmup_steps,
            _is_int(self.warmup_steps) and self.warmup_steps >= 0,
            "an integer >= 0",
            "e.g. 50 (a warm-up longer than the run just never reaches the peak rate)",
        )
        _check("schedule", self.schedule, self.schedule in SCHEDULES, f"one of {SCHEDULES}", "e.g. 'wsd'")
        for name in ("decay_frac", "min_lr_frac", "weight_decay"):
            value = getattr(self, name)
            _check(name, value, _is_real(value) and 0 <= value <= 1, "a number in [0, 1]", "e.g. 0.05")
        _check(
            "label_smoothing",
            self.label_smoothing,
            _is_real(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            "a number in [0, 1)",
            "0 for plain cross-entropy, e.g. 0.1 for a heavier tail",
        )
        _check("seed", self.seed, _is_int(self.seed) and self.seed >= 0, "an integer >= 0", "e.g. 0")
        head = self.model.head_dim
        if self.serve_head_dim is not None:
            _check(
                "serve_head_dim",
                self.serve_head_dim,
                _is_int(self.serve_head_dim)
                and self.serve_head_dim >= 1
                and (self.serve_head_dim <= head or self.serve_head_dim % head == 0),
                f"None or an integer that is at most model.head_dim={head} or a multiple of it",
                f"e.g. {2 * head}, or None to keep the trained shape",
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (nested model config included)."""
        d = dataclasses.asdict(self)
        d["task_kwargs"] = dict(self.task_kwargs)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SFTConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ``ValueError`` listing the known ones."""
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SFTConfig field(s) {unknown}; known fields: {sorted(known)}")
        model = data.get("model", {})
        if isinstance(model, Mapping):
            data["model"] = models.TinyModelConfig(**model)
        return cls(**data)

    def digest(self) -> str:
        """Short stable hash of the recipe and :data:`SFT_CODE_VERSION` (the cache key)."""
        payload = {"code_version": SFT_CODE_VERSION, **self.to_dict()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def make_task(self) -> tasks.Task:
        """The task this recipe trains on."""
        return tasks.make_task(self.task, **dict(self.task_kwargs))


#: The shape the shipped policies were trained in: four 16-wide heads (saved widened to 32).
PRESET_MODEL = models.TinyModelConfig(num_heads=4)

#: Recipes of the shipped policies (``workbench/assets/policies/<name>``).
PRESETS: dict[str, SFTConfig] = {
    # 2-digit additions, answer then eos: the default policy of the trainer and the notebooks.
    "add2": SFTConfig(task="addition", task_kwargs={"digits": 2}, model=PRESET_MODEL),
    # Answer, then pose and solve two more additions (~24-token responses): the collapse experiments.
    "multiadd": SFTConfig(
        task="multiadd", task_kwargs={"n_problems": 2, "digits": 2}, steps=1500, model=PRESET_MODEL
    ),
    # The same with label smoothing: a heavier tail of unused ids, closer to a real LLM's.
    "multiadd_smooth": SFTConfig(
        task="multiadd",
        task_kwargs={"n_problems": 2, "digits": 2},
        steps=1500,
        label_smoothing=0.01,
        model=PRESET_MODEL,
    ),
    # Answer, then pose and solve six more additions (responses up to 64 tokens): the horizon study
    # (issue 14, the T ≈ 64 point; lessons/LOG.md 2026-12-04).
    "multiadd6": SFTConfig(
        task="multiadd", task_kwargs={"n_problems": 6, "digits": 2}, steps=1500, model=PRESET_MODEL
    ),
    # Twelve posed additions (responses up to 124 tokens): the horizon study's T ≈ 128 point.
    "multiadd12": SFTConfig(
        task="multiadd", task_kwargs={"n_problems": 12, "digits": 2}, steps=1500, model=PRESET_MODEL
    ),
    # Twenty-four posed additions (responses up to 244 tokens, the 256 positions' limit): the T ≈ 256 point.
    "multiadd24": SFTConfig(
        task="multiadd", task_kwargs={"n_problems": 24, "digits": 2}, steps=1500, model=PRESET_MODEL
    ),
}


def sft_batch(
    task: tasks.Task, tokenizer: Any, problems: list[tasks.Problem]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, labels)`` of the problems' ideal completions, eos appended.

    Labels equal the ids on the completion (eos included) and :data:`IGNORE_INDEX` on the prompt and
    the padding, so only the completion is learned.

    Args:
        task: supplies ``sft_text(problem)`` = prompt + ideal completion.
        tokenizer: a tokenizer whose prompt ids are a prefix of its prompt + completion ids (true of
            the char-level :func:`workbench.models.build_tokenizer`).
        problems: the batch.

    Returns:
        ``input_ids`` and ``labels``, both ``LongTensor[B, L]``.

    >>> tok = models.build_tokenizer(64)
    >>> ids, labels = sft_batch(tasks.AdditionTask(1), tok, [tasks.Problem("3+4=", "7")])
    >>> tok.decode(ids[0]), labels[0].tolist()
    ('3+4=7<eos>', [-100, -100, -100, -100, 11, 2])
    """
    if not problems:
        raise ValueError("problems=[] is empty; pass at least one problem")
    fulls = tokenizer([task.sft_text(p) for p in problems], add_special_tokens=False)["input_ids"]
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    width = max(len(f) for f in fulls) + 1  # + eos
    ids = torch.full((len(problems), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(problems), width), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    for i, (full, prompt) in enumerate(zip(fulls, prompts)):
        if full[: len(prompt)] != prompt:
            raise ValueError(
                f"the tokenizer does not encode the prompt {problems[i].prompt!r} as a prefix of the "
                "prompt + completion; SFT label masking needs a char-level tokenizer "
                "(workbench.models.build_tokenizer)"
            )
        seq = torch.tensor([*full, tokenizer.eos_token_id])
        ids[i, : len(seq)] = seq
        labels[i, len(prompt) : len(seq)] = seq[len(prompt) :]
    return ids, labels


def sft_loss(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, computing logits only there.

    Equivalent to :func:`sft_loss_reference` (full logits, ``ignore_index``) but runs the lm_head —
    ``hidden × vocab`` per position plus a ``vocab``-way softmax, most of a tiny model's cost — only
    on positions whose next token is labelled. No attention mask: pass right-padded ``input_ids``.

    Args:
        model: a Hugging Face causal LM (``get_decoder()`` + ``get_output_embeddings()``).
        input_ids: ``LongTensor[B, L]``, right-padded.
        labels: ``LongTensor[B, L]``, :data:`IGNORE_INDEX` where there is no loss.
        label_smoothing: as in ``F.cross_entropy``.

    Returns:
        A scalar fp32 tensor.
    """
    targets = labels[:, 1:]  # (B, L-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX  # (B, L-1)
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state  # (B, L, H)
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
    return F.cross_entropy(logits.float(), targets[keep], label_smoothing=label_smoothing)


def sft_loss_reference(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Plain version of :func:`sft_loss`: full ``(B, L, V)`` logits, ``ignore_index`` on the rest."""
    logits = model(input_ids=input_ids).logits  # (B, L, V)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),  # (B*(L-1), V)
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


def lr_factor(step: int, cfg: SFTConfig) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up to 1, then ``cfg.schedule`` down to
    ``min_lr_frac`` at ``cfg.steps``.

    ``"wsd"`` holds 1 until the last ``decay_frac`` of the post-warm-up steps, then decays linearly;
    ``"cosine"`` decays along a half cosine from the end of the warm-up.

    >>> cfg = SFTConfig(steps=110, warmup_steps=10, min_lr_frac=0.1, schedule="wsd", decay_frac=0.5)
    >>> [round(lr_factor(s, cfg), 3) for s in (0, 9, 10, 60, 85, 110)]
    [0.1, 1.0, 1.0, 1.0, 0.55, 0.1]
    >>> cosine = dataclasses.replace(cfg, schedule="cosine")
    >>> [round(lr_factor(s, cosine), 3) for s in (10, 60, 110)]
    [1.0, 0.55, 0.1]
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))
    start = 1.0 - cfg.decay_frac  # progress at which the decay begins
    if progress <= start:
        return 1.0
    return 1.0 - (1.0 - cfg.min_lr_frac) * (progress - start) / cfg.decay_frac


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, then restore the previous count.

    Args:
        n: intra-op threads (>= 1), or ``None`` to leave the setting alone.

    >>> before = torch.get_num_threads()
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    if n is not None and (not _is_int(n) or n < 1):
        raise ValueError(f"threads={n!r} must be an integer >= 1, or None to keep torch's setting")
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_sft(
    cfg: SFTConfig,
    *,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    threads: int | None = DEFAULT_THREADS,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Any, list[float]]:
    """Train a tiny policy from scratch on ``cfg.task``'s ideal completions.

    Deterministic given ``cfg`` (and the machine's float arithmetic): the data come from
    ``random.Random(cfg.seed)``, the init from ``cfg.model.seed``; the global torch RNG is untouched.

    Args:
        cfg: the recipe.
        progress: show a tqdm bar.
        callback: called as ``callback(step, loss)`` after every step.
        threads: intra-op threads while training (:data:`DEFAULT_THREADS`; ``None``: unchanged).
        device: where to train (``"cuda"`` for the GPU check's larger policies); the init is made on
            the CPU, so the same ``cfg`` starts from the same weights on every device.

    Returns:
        ``(model, tokenizer, losses)``: the model in eval mode (fp32, on the CPU), its tokenizer, the
        loss of every step.
    """
    with torch_threads(threads):
        return _train(cfg, progress, callback, torch.device(device))


def _train(
    cfg: SFTConfig,
    progress: bool,
    callback: Callable[[int, float], None] | None,
    device: torch.device,
) -> tuple[torch.nn.Module, Any, list[float]]:
    rng = random.Random(cfg.seed)
    task = cfg.make_task()
    tokenizer = models.build_tokenizer(cfg.model.vocab_size)
    model = models.build_tiny_model(cfg.model, tokenizer).to(device).train()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": matrices, "weight_decay": cfg.weight_decay},
            {"params": vectors, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=f"sft {cfg.task}", disable=not progress, leave=False)
    for step in bar:
        ids, labels = sft_batch(task, tokenizer, task.sample(cfg.batch_size, rng))  # (B, L) each
        if ids.shape[1] > cfg.model.max_position_embeddings:
            raise ValueError(
                f"a training sequence has {ids.shape[1]} tokens but "
                f"SFTConfig.model.max_position_embeddings={cfg.model.max_position_embeddings}; raise it"
            )
        loss = sft_loss(model, ids.to(device), labels.to(device), label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if callback is not None:
            callback(step, losses[-1])
        if progress and step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.cpu().eval()
    return model, tokenizer, losses


@torch.no_grad()
def sampled_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    task: tasks.Task,
    n: int = EVAL_SAMPLES,
    seed: int = EVAL_SEED,
    *,
    temperature: float = 1.0,
) -> float:
    """Mean reward of ``n`` responses sampled at ``temperature`` (1: what RL starts from).

    One response per problem, from :class:`workbench.engines.TorchEngine` in fp32 with no min-p
    (``rho=None``); the problems are ``task.sample(n, random.Random(seed))`` and sampling is seeded
    with ``seed``, so the result is reproducible.
    """
    from workbench.engines import TorchEngine

    if not _is_int(n) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1 (responses to sample)")
    problems = task.sample(n, random.Random(seed))
    engine = TorchEngine(
        model, dtype="fp32", eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    rollout = engine.generate(
        [models.encode_prompt(tokenizer, p.prompt) for p in problems],
        n=1,
        max_tokens=task.max_new_tokens,
        rho=None,
        temperature=temperature,
        seed=seed,
    )
    total = 0.0
    for problem, row, length in zip(problems, rollout.tokens.tolist(), rollout.lengths.tolist()):
        text = tokenizer.decode([t for t in row[:length] if t != tokenizer.eos_token_id])
        total += task.reward(problem, text)
    return total / n


@torch.no_grad()
def greedy_accuracy(
    model: torch.nn.Module, tokenizer: Any, task: tasks.Task, n: int = EVAL_SAMPLES, seed: int = EVAL_SEED
) -> float:
    """Mean reward of greedy (argmax) responses to ``task.sample(n, random.Random(seed))``.

    Prompts are grouped by length and decoded with ``model.generate(do_sample=False)`` without
    padding, so no position or mask convention is involved.
    """
    if not _is_int(n) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1 (problems to answer)")
    problems = task.sample(n, random.Random(seed))
    by_length: dict[int, list[tuple[tasks.Problem, list[int]]]] = {}
    for p in problems:
        ids = models.encode_prompt(tokenizer, p.prompt)
        by_length.setdefault(len(ids), []).append((p, ids))
    total = 0.0
    for length, group in by_length.items():
        prompt = torch.tensor([ids for _, ids in group])  # (G, P)
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=task.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # (G, P + T)
        for (p, _), row in zip(group, out[:, length:].tolist()):
            cut = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
            total += task.reward(p, tokenizer.decode(row[:cut]))
    return total / n


@torch.no_grad()
def tail_stats(
    model: torch.nn.Module,
    tokenizer: Any,
    task: tasks.Task,
    *,
    n: int = 64,
    seed: int = EVAL_SEED,
    log_rho: float = math.log(DEFAULT_RHO),
) -> dict[str, float]:
    """How far below the top the vocabulary's tail sits, on the completions of ``n`` problems.

    Teacher-forced on ``task.sft_text`` (every completion position, eos included). "Unused" ids are
    those at or above :data:`workbench.models.MIN_VOCAB_SIZE`: the ``<unused_i>`` ids of the
    char-level tokenizer, which no task ever produces.

    Returns:
        ``tail/frac_below_rho``: mean fraction of the vocabulary with ``p < e^log_rho · p_max`` (outside
        the min-p safe set); ``tail/safe_size_mean``: mean safe-set size; ``tail/unused_gap_median``,
        ``tail/unused_gap_p01``, ``tail/unused_gap_min``: median, 1 % quantile and minimum over
        positions × unused ids of ``max logit − logit`` in nats; ``tail/unused_mass_mean``: mean total
        probability of the unused ids.
    """
    ids, labels = sft_batch(task, tokenizer, task.sample(n, random.Random(seed)))  # (B, L)
    keep = labels[:, 1:] != IGNORE_INDEX  # (B, L-1)
    logits = model(input_ids=ids).logits[:, :-1][keep].float()  # (N, V)
    gap = logits.max(dim=-1, keepdim=True).values - logits  # (N, V), >= 0
    below = gap > -log_rho  # (N, V)
    unused_gap = gap[:, models.MIN_VOCAB_SIZE :]  # (N, V - MIN_VOCAB_SIZE)
    unused_mass = torch.log_softmax(logits, -1)[:, models.MIN_VOCAB_SIZE :].logsumexp(-1).exp()  # (N,)
    flat = unused_gap.flatten()
    return {
        "tail/frac_below_rho": below.float().mean().item(),
        "tail/safe_size_mean": (~below).sum(-1).float().mean().item(),
        "tail/unused_gap_median": flat.median().item(),
        "tail/unused_gap_p01": flat.kthvalue(max(1, flat.numel() // 100)).values.item(),
        "tail/unused_gap_min": flat.min().item(),
        "tail/unused_mass_mean": unused_mass.mean().item(),
    }


def default_cache_dir() -> Path:
    """``$WORKBENCH_CACHE`` or ``~/.cache/dvp-workbench``."""
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "dvp-workbench"))


def preset_name(cfg: SFTConfig) -> str | None:
    """The :data:`PRESETS` name whose recipe is ``cfg`` (same digest), or ``None``."""
    return next((name for name, c in PRESETS.items() if c.digest() == cfg.digest()), None)


def preset_policy(name: str, *, progress: bool = True) -> Path:
    """Directory of the policy of preset ``name``: the shipped copy if it was made by the current
    recipe (same digest), else :func:`sft_policy` (the cache, training on a miss)."""
    if name not in PRESETS:
        raise ValueError(f"name={name!r} is not a preset: allowed {sorted(PRESETS)}")
    cfg = PRESETS[name]
    shipped = models.PRETRAINED_DIR / name
    if (shipped / "config.json").is_file() and models.policy_metadata(shipped).get("digest") == cfg.digest():
        return shipped
    return sft_policy(cfg, progress=progress)


def sft_policy(
    cfg: SFTConfig,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    force: bool = False,
    threads: int | None = DEFAULT_THREADS,
    device: str | torch.device = "cpu",
) -> Path:
    """Return a directory holding the policy trained by ``cfg``, training it only when not cached.

    The directory (``<default_cache_dir()>/sft/<digest>`` unless ``out_dir`` is given) is a normal
    HF model directory, written atomically; its metadata (:func:`workbench.models.policy_metadata`)
    holds the digest, the recipe, the loss curve, the sampled and greedy accuracy, the tail
    statistics, the time taken and the command that remakes it. A directory whose metadata has the
    same digest is returned as is.

    Args:
        cfg: the recipe.
        out_dir: where to put the policy instead of the cache.
        progress: show a progress bar while training.
        force: retrain even when a matching directory exists.
        threads: intra-op threads while training and evaluating (:data:`DEFAULT_THREADS`).
        device: where to train (:func:`train_sft`); the accuracy and tail checks run on the CPU.

    Returns:
        The policy directory.
    """
    digest = cfg.digest()
    target = Path(out_dir) if out_dir is not None else default_cache_dir() / "sft" / digest
    if not force and (target / "config.json").is_file():
        if models.policy_metadata(target).get("digest") == digest:
            return target
    with torch_threads(threads):  # training and evaluation alike
        wall0, cpu0 = time.perf_counter(), time.process_time()
        model, tokenizer, losses = train_sft(cfg, progress=progress, threads=None, device=device)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if cfg.serve_head_dim is not None and cfg.serve_head_dim > cfg.model.head_dim:
            model = models.widen_heads(model, cfg.serve_head_dim)
        task = cfg.make_task()
        name = preset_name(cfg)
        tail = 20 if len(losses) >= 20 else len(losses)
        meta = {
            "digest": digest,
            "preset": name,
            "config": cfg.to_dict(),
            "code_version": SFT_CODE_VERSION,
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": sum(losses[-tail:]) / tail,
            "loss_curve": [round(x, 4) for x in losses[:: max(1, len(losses) // 100)]],
            "sampled_accuracy": sampled_accuracy(model, tokenizer, task),
            "greedy_accuracy": greedy_accuracy(model, tokenizer, task),
            "eval": {"n": EVAL_SAMPLES, "seed": EVAL_SEED, "temperature": 1.0, "rho": None},
            "tail": tail_stats(model, tokenizer, task),
            "train_seconds": round(wall, 1),
            "train_cpu_seconds": round(cpu, 1),
            "torch_threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
            "remake": REMAKE_COMMAND.format(name=name)
            if name
            else "workbench sft --config FILE (FILE = this metadata's 'config' as JSON)",
        }
    models.save_policy(model, tokenizer, target, metadata=meta)
    return target


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)
