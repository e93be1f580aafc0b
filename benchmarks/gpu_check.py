"""GPU check: the RLOO trainer, ``TorchEngine``, DVP log-probs and the fused LM head on CUDA, in ≈ 8 minutes.

Issues 9 (item 7), 15 (item 4) and 14 (item 4). One script for a GPU machine with torch and transformers
but no vLLM, no TRL and no network. It runs its sections against one time budget (``--budget-s``, default
480 s) and writes ``gpu_check.json`` and ``gpu_check.log`` to ``--out``:

1. ``env``: Python, torch, transformers and workbench versions, git commit, GPU name and memory, CUDA.
2. ``logprobs``: ``benchmarks/bench_logprobs.py``'s ``run_case`` on CUDA at V = 151,936 (fp32 and bf16):
   time and peak CUDA memory of DVP's log-probs (``ρ = e^-13``) against the unmasked reference
   ``log_softmax(z).gather`` and the naive masked version.
3. ``fused_head``: ``benchmarks/bench_fused_head.py``'s ``run_case`` on CUDA at the issue's size (N 4,096
   hidden states, H 1,024, V 151,936; fp32 and bf16): the fused LM head against ``F.linear`` + our masked
   kernel and the unmasked log-softmax, forward and forward+backward, time and extra peak memory.
4. ``rloo``: a Qwen2 policy built from a config (vocab 151,936, hidden 768, 12 layers of 12 heads, SwiGLU
   2,048, tied embeddings: ≈ 202 M parameters, seeded random init, nothing downloaded) trained by
   :class:`workbench.trainer.RLOOTrainer` with ``device="cuda"``, trainer and ``TorchEngine`` both bf16,
   for ``--steps`` RLOO steps per arm of :data:`workbench.experiments.presets.ARMS` (default ``naive``
   and ``dvp_mis``), every arm from the same weights and seeds. Per step: reward, k1, k3, mean |Δ|,
   boundary tokens, step time; per arm: median step time after the first (warm-up) step, tokens/s and
   the peak CUDA memory of the arm (weights, engine copy, AdamW state, activations); then each arm's
   step time and memory relative to the first arm.
5. ``horizon`` (only with ``--horizon``): the horizon study of issue 14 at a larger model size — per
   horizon (six posed additions ≈ 64 tokens, then two ≈ 24), an SFT warm start of a 4.5 M-parameter
   policy trained on the GPU, then the ``floor12`` scenario's ``dvp_mis``, ``naive`` and ``control`` arms
   from it (one seed, ``hz_steps`` steps): clean-eval reward, damage against the control, k1, tail draws
   per sequence, grad-norm spikes; each horizon's runs are also saved as ``horizon/n<problems>/``.

The RLOO section is a systems check, not a learning one: the random-init policy earns ~0 reward on the
addition task (so advantages and gradients are ~0) and its near-uniform logits put the whole vocabulary in
the e^-13 safe set. What it shows: that every piece runs on CUDA, how fast, with how much memory, and the
bf16 mismatch between the engine's KV-cache decode and the trainer's full forward on a real GPU.

Budget: before each unit of work (a log-prob case, the model build, an arm, a step, a warm start) a
section compares the time left with the longest such unit so far (plus what later sections reserve)
and skips the rest with a note in the log and the JSON. Both files are rewritten atomically after every
section, so a run stopped from outside keeps the sections it finished. A section that raises is
recorded with its traceback and the next one still runs; the exit status is then 1.

``--dry-run`` runs the same functions on the CPU at tiny sizes (well under a minute); the tests run it.

Run: ``bash benchmarks/gpu_check.sh`` (GPU; writes ``results/gpu/``) or
``python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check`` (CPU).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import os
import platform
import statistics
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_fused_head
import torch
import transformers
from bench_logprobs import run_case

import workbench
from workbench import models, sft
from workbench.dvp import DEFAULT_RHO
from workbench.experiments.collapse import DEFAULT_CRITERION
from workbench.experiments.presets import ARMS
from workbench.experiments.runner import ArmResults, atomic_write_json, atomic_write_text, judge, run_one
from workbench.memory import peak_bytes
from workbench.trainer import RLOOConfig, RLOOTrainer

REPO = Path(__file__).resolve().parents[1]
#: Per-step metrics kept in the JSON (keys of ``workbench.trainer.all_metric_docs()``).
STEP_KEYS: tuple[str, ...] = (
    "reward/mean",
    "mismatch/k1",
    "mismatch/k3",
    "mismatch/mean_abs_delta",
    "dvp/boundary_tokens",
    "perf/rollout_s",
    "perf/train_s",
    "perf/sync_s",
    "perf/step_s",
    "perf/tokens_per_s",
)


@dataclass(frozen=True)
class Sizes:
    """Everything the GPU run and the dry run differ in, apart from the device."""

    model: models.TinyModelConfig
    """Shape of the policy built from a config."""
    prompts: int
    """Prompts per RLOO step."""
    k: int
    """Samples per prompt."""
    max_new_tokens: int
    """Response length cap (a random-init policy almost never samples eos, so responses run to it)."""
    steps: int
    """RLOO steps per arm, the first one a warm-up."""
    lp_rows: int
    """Logits rows of the log-prob benchmark."""
    lp_seq: int
    """Rows per sequence: the benchmark's logits are ``[lp_rows / lp_seq, lp_seq, V]``."""
    lp_vocab: int
    """Vocabulary of the log-prob benchmark."""
    lp_repeats: int
    """Timed calls per method."""
    lp_case_s: float
    """Seconds one log-prob or fused-head case is expected to take before one has been measured (inputs
    built on the CPU, agreement checks, timing, memory)."""
    fh_rows: int
    """Hidden-state rows N of the fused-LM-head benchmark (issue 15)."""
    fh_hidden: int
    """Hidden size H of the fused-LM-head benchmark."""
    fh_repeats: int
    """Timed runs per method and mode of the fused-LM-head benchmark."""
    hz_model: models.TinyModelConfig
    """The horizon study's policy (issue 14): larger than the shipped 0.4 M-parameter ones."""
    hz_sft_steps: int
    """SFT steps of its warm start (batch 64), one per horizon."""
    hz_lr: float
    """SFT learning rate of the warm start."""
    hz_problems: tuple[int, ...]
    """Horizons as posed additions of the ``multiadd`` task (2 ≈ 24 tokens, 6 ≈ 64), run in this order."""
    hz_steps: int
    """RLOO steps per arm at each horizon (fewer if the budget runs out)."""
    hz_reserve_s: float
    """Seconds the RLOO section leaves for the horizon study when ``--horizon`` is on."""


GPU = Sizes(
    model=models.TinyModelConfig(
        vocab_size=151_936,  # Qwen2's vocabulary
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=2048,
        max_position_embeddings=512,
    ),
    prompts=16,
    k=4,
    max_new_tokens=64,
    steps=8,
    lp_rows=8192,
    lp_seq=512,
    lp_vocab=151_936,
    lp_repeats=10,
    lp_case_s=60.0,
    fh_rows=4096,
    fh_hidden=1024,
    fh_repeats=5,
    hz_model=models.TinyModelConfig(
        hidden_size=256, num_layers=4, num_heads=4, intermediate_size=768, max_position_embeddings=512
    ),
    hz_sft_steps=1500,
    hz_lr=1e-3,
    hz_problems=(6, 2),
    hz_steps=100,
    hz_reserve_s=240.0,
)
DRY_RUN = Sizes(
    model=models.TinyModelConfig(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128
    ),
    prompts=4,
    k=2,
    max_new_tokens=6,
    steps=3,
    lp_rows=64,
    lp_seq=32,
    lp_vocab=2048,
    lp_repeats=2,
    lp_case_s=2.0,
    fh_rows=64,
    fh_hidden=32,
    fh_repeats=1,
    hz_model=models.TinyModelConfig(
        vocab_size=512, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128
    ),
    hz_sft_steps=5,
    hz_lr=1e-3,
    hz_problems=(2,),
    hz_steps=3,
    hz_reserve_s=10.0,
)
#: The horizon study's scenario and arms: the headline floor; the reference (DVP + MIS) first, so each
#: later run is judged against it, and the control, the ceiling that damage is measured from.
HZ_SCENARIO = "floor12"
HZ_ARMS: tuple[str, ...] = ("dvp_mis", "naive", "control")
LP_DTYPES: tuple[str, ...] = ("fp32", "bf16")


@dataclass
class Budget:
    """Seconds the whole check may take, counted from construction; sections ask before each unit of work."""

    total_s: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Seconds since the check started."""
        return time.perf_counter() - self.start

    def allows(self, need_s: float) -> bool:
        """Whether ``need_s`` more seconds still fit in the budget."""
        return self.elapsed() + need_s <= self.total_s


class Report:
    """The run's JSON document and its log; :meth:`save` rewrites both atomically."""

    def __init__(self, out: Path, budget: Budget) -> None:
        self.out, self.budget = out, budget
        self.data: dict[str, Any] = {"budget_s": budget.total_s, "sections": {}, "notes": []}
        self.lines: list[str] = []

    def say(self, line: str = "") -> None:
        """Print ``line`` and keep it for the log."""
        print(line, flush=True)
        self.lines.append(line)

    def skip(self, section: str, what: str, need_s: float) -> None:
        """Record that ``what`` was skipped because ``need_s`` more seconds would overrun the budget."""
        note = (
            f"{section}: skipped {what} at {self.budget.elapsed():.0f} s: it needs ≈ {need_s:.0f} s more "
            f"and the budget is {self.budget.total_s:.0f} s"
        )
        self.data["notes"].append(note)
        self.say(f"NOTE {note}")

    def save(self) -> None:
        """Write ``gpu_check.json`` and ``gpu_check.log`` (temp file + rename: never half-written)."""
        self.data["elapsed_s"] = self.budget.elapsed()
        atomic_write_json(self.out / "gpu_check.json", self.data)
        atomic_write_text(self.out / "gpu_check.log", "\n".join(self.lines) + "\n")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, commit and hardware the numbers were measured with."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    env: dict[str, Any] = {
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "workbench": workbench.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda": torch.version.cuda,
        "gpu": None,
        "gpu_memory_gib": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30)
    return env


def arm_config(arm: str, sizes: Sizes, device: torch.device, train_dtype: str, seed: int) -> RLOOConfig:
    """The RLOO settings of one arm: the shared batch, dtypes and device, then the arm's own fields."""
    shared: dict[str, Any] = {
        "model": None,  # the policy is passed to the trainer, built from sizes.model
        "vocab_size": sizes.model.vocab_size,
        "task": "addition",
        "k": sizes.k,
        "prompts_per_step": sizes.prompts,
        "max_new_tokens": sizes.max_new_tokens,
        "lr": 1e-5,
        "train_dtype": train_dtype,
        "engine_dtype": "bf16",
        "device": str(device),
        "seed": seed,
    }
    return RLOOConfig(**{**shared, **ARMS[arm]})


def run_arm(
    cfg: RLOOConfig,
    base: torch.nn.Module,
    tokenizer: Any,
    steps: int,
    need: Callable[[list[dict[str, float]]], float],
    report: Report,
    label: str,
) -> dict[str, Any]:
    """``steps`` RLOO steps from a copy of ``base``, asking the budget before each for ``need(rows so far)``.

    Returns the per-step rows (:data:`STEP_KEYS`), a summary (median step time after the warm-up step,
    tokens/s, mean k1 / k3 / |Δ|) and the peak memory of the arm on its device (bytes allocated beyond
    what was live before: the trainer's and engine's weights, optimizer state and activations).
    """
    rows: list[dict[str, float]] = []

    def train() -> None:
        trainer = RLOOTrainer(cfg, model=copy.deepcopy(base), tokenizer=tokenizer)
        for i in range(1, steps + 1):
            if not report.budget.allows(need(rows)):
                report.skip("rloo", f"{label} steps {i}-{steps}", need(rows))
                return
            m = trainer.step()
            rows.append({key: m[key] for key in STEP_KEYS})
            report.say(
                f"{label:>10} step {i}: reward {m['reward/mean']:.3f}  k1 {m['mismatch/k1']:+.2e}  "
                f"k3 {m['mismatch/k3']:.2e}  mean|Δ| {m['mismatch/mean_abs_delta']:.2e}  "
                f"boundary {m['dvp/boundary_tokens']:.0f}  step {m['perf/step_s']:.2f} s "
                f"(rollout {m['perf/rollout_s']:.2f}, train {m['perf/train_s']:.2f}, "
                f"sync {m['perf/sync_s']:.3f})"
            )

    peak = peak_bytes(train, cfg.device)
    timed = rows[1:] or rows  # the first step pays for kernel selection and allocator warm-up
    summary = {
        "steps": len(rows),
        "warmup_step_s": rows[0]["perf/step_s"] if rows else None,
        "median_step_s": statistics.median(r["perf/step_s"] for r in timed) if rows else None,
        "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in timed) if rows else None,
        "peak_mib": peak / 2**20,
    }
    for key in ("mismatch/k1", "mismatch/k3", "mismatch/mean_abs_delta", "reward/mean"):
        summary[key] = statistics.fmean(r[key] for r in rows) if rows else None
    return {"config": cfg.to_dict(), "steps": rows, "summary": summary}


def rloo_section(
    report: Report,
    sizes: Sizes,
    device: torch.device,
    arms: Sequence[str],
    train_dtype: str,
    seed: int,
    reserve: float,
) -> dict[str, Any]:
    """The policy built from ``sizes.model``, then each arm's RLOO steps and a comparison; ``reserve``
    seconds are left for the sections after it."""
    longest = 0.0  # longest step so far, any arm: what the next step is expected to need

    def need(rows: list[dict[str, float]]) -> float:
        return reserve + max([longest, *(r["perf/step_s"] for r in rows)])

    out: dict[str, Any] = {"model": dataclasses.asdict(sizes.model), "arms": {}}
    if not report.budget.allows(reserve):
        report.skip("rloo", "the whole section", reserve)
        return out
    tokenizer = models.build_tokenizer(sizes.model.vocab_size)
    base = models.build_tiny_model(sizes.model, tokenizer)
    out["parameters"] = sum(p.numel() for p in base.parameters())
    report.say(
        f"rloo: Qwen2 {out['parameters'] / 1e6:.1f} M parameters (vocab {sizes.model.vocab_size}, hidden "
        f"{sizes.model.hidden_size}, {sizes.model.num_layers} layers), trainer {train_dtype}, engine bf16, "
        f"{device}; {sizes.prompts} prompts × {sizes.k} samples × ≤ {sizes.max_new_tokens} tokens per step"
    )
    for arm in arms:
        if not report.budget.allows(need([])):
            report.skip("rloo", f"arm {arm}", need([]))
            continue
        cfg = arm_config(arm, sizes, device, train_dtype, seed)
        out["arms"][arm] = result = run_arm(cfg, base, tokenizer, sizes.steps, need, report, arm)
        longest = max([longest, *(r["perf/step_s"] for r in result["steps"])])
        gc.collect()  # free this arm's trainer before the next arm's peak is measured
        if device.type == "cuda":
            torch.cuda.empty_cache()
    done = {arm: r["summary"] for arm, r in out["arms"].items() if r["steps"]}
    report.say(
        f"{'arm':>10} {'steps':>5} {'median s':>9} {'tokens/s':>9} {'peak MiB':>9} {'k1':>10} {'k3':>9} "
        f"{'mean|Δ|':>9} {'reward':>7}"
    )
    for arm, s in done.items():
        report.say(
            f"{arm:>10} {s['steps']:>5} {s['median_step_s']:>9.3f} {s['tokens_per_s']:>9.0f} "
            f"{s['peak_mib']:>9.0f} {s['mismatch/k1']:>+10.2e} {s['mismatch/k3']:>9.2e} "
            f"{s['mismatch/mean_abs_delta']:>9.2e} {s['reward/mean']:>7.3f}"
        )
    if len(done) > 1:
        first, *others = done
        out["relative_to"] = first
        out["relative"] = {
            arm: {
                "step_time": done[arm]["median_step_s"] / done[first]["median_step_s"],
                "peak_memory": done[arm]["peak_mib"] / done[first]["peak_mib"],
            }
            for arm in others
        }
        for arm, rel in out["relative"].items():
            report.say(
                f"{arm} vs {first}: step time {rel['step_time']:.2f}×, peak memory {rel['peak_memory']:.2f}×"
            )
    return out


def logprob_section(report: Report, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """``bench_logprobs.run_case`` per dtype on ``device``: DVP vs the unmasked reference."""
    out: dict[str, Any] = {
        "rows": sizes.lp_rows,
        "seq": sizes.lp_seq,
        "vocab": sizes.lp_vocab,
        "rho": DEFAULT_RHO,
        "repeats": sizes.lp_repeats,
        "cases": {},
    }
    longest = sizes.lp_case_s
    for dtype_name in LP_DTYPES:
        if not report.budget.allows(longest):
            report.skip("logprobs", f"V={sizes.lp_vocab} {dtype_name}", longest)
            continue
        t0 = time.perf_counter()
        rows = run_case(
            sizes.lp_rows,
            sizes.lp_seq,
            sizes.lp_vocab,
            dtype_name,
            DEFAULT_RHO,
            sizes.lp_repeats,
            str(device),
        )
        by = {r["method"]: r for r in rows}
        dvp, ref = by["dvp"], by["unmasked"]
        case = {
            "methods": by,
            "dvp_time_vs_unmasked": dvp["median_s"] / ref["median_s"],
            "dvp_memory_vs_unmasked": dvp["peak_mib"] / ref["peak_mib"],
            "dvp_memory_vs_naive": dvp["peak_mib"] / by["naive"]["peak_mib"],
            "case_s": time.perf_counter() - t0,
        }
        out["cases"][dtype_name] = case
        longest = max(longest, case["case_s"])
        for r in rows:
            report.say(
                f"logprobs V={sizes.lp_vocab} {dtype_name} {r['method']:>8}: median {1e3 * r['median_s']:8.2f} ms"
                f"  best {1e3 * r['best_s']:8.2f} ms  peak {r['peak_mib']:9.1f} MiB"
            )
        report.say(
            f"logprobs V={sizes.lp_vocab} {dtype_name}: dvp/unmasked time {case['dvp_time_vs_unmasked']:.2f}×, "
            f"memory {case['dvp_memory_vs_unmasked']:.2f}×; dvp/naive memory {case['dvp_memory_vs_naive']:.2f}×; "
            f"max|dvp − naive| {dvp['diff_naive']:.1e}, max|dvp(ρ=None) − unmasked| {dvp['diff_unmasked']:.1e}"
        )
    return out


def fused_head_section(report: Report, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """``bench_fused_head.run_case`` per dtype on ``device`` at V = ``sizes.lp_vocab`` (issue 15, item 4):
    the fused LM head vs ``F.linear`` + our masked kernel vs TRL's ``selective_log_softmax`` (or our
    reference when TRL is absent), forward and forward+backward, time and peak memory."""
    out: dict[str, Any] = {
        "rows": sizes.fh_rows,
        "hidden": sizes.fh_hidden,
        "vocab": sizes.lp_vocab,
        "rho": DEFAULT_RHO,
        "repeats": sizes.fh_repeats,
        "unmasked": "trl" if bench_fused_head.selective_log_softmax is not None else "reference",
        "targets": {
            "extra_memory": bench_fused_head.TARGET_MEMORY,
            "fwd+bwd_time": bench_fused_head.TARGET_TIME,
        },
        "cases": {},
    }
    longest = sizes.lp_case_s
    for dtype_name in LP_DTYPES:
        if not report.budget.allows(longest):
            report.skip("fused_head", f"{dtype_name}", longest)
            continue
        t0 = time.perf_counter()
        rows = bench_fused_head.run_case(
            sizes.fh_rows,
            sizes.fh_hidden,
            sizes.lp_vocab,
            dtype_name,
            DEFAULT_RHO,
            sizes.fh_repeats,
            device=str(device),
        )
        case: dict[str, Any] = {"rows": rows, "case_s": time.perf_counter() - t0}
        for mode in ("fwd", "fwd+bwd"):
            t_u, _, x_u = bench_fused_head.ratios(rows, dtype_name, mode, "unfused")
            t_m, _, x_m = bench_fused_head.ratios(rows, dtype_name, mode, "unmasked")
            case[mode] = {
                "time_vs_unfused": t_u,
                "extra_memory_vs_unfused": x_u,
                "time_vs_unmasked": t_m,
                "extra_memory_vs_unmasked": x_m,
            }
            report.say(
                f"fused_head N={sizes.fh_rows} H={sizes.fh_hidden} V={sizes.lp_vocab} {dtype_name} {mode}: "
                f"fused/unfused time {t_u:.2f}×, extra memory {x_u:.3f}×; fused/unmasked time {t_m:.2f}×, "
                f"extra memory {x_m:.3f}× (max|fused − unfused| {rows[0]['diff_unfused']:.1e})"
            )
        out["cases"][dtype_name] = case
        longest = max(longest, case["case_s"])
    return out


def horizon_section(report: Report, sizes: Sizes, device: torch.device, seed: int) -> dict[str, Any]:
    """The horizon study at a larger model size (issue 14, item 4): per horizon, an SFT warm start of
    ``sizes.hz_model`` trained on ``device``, then :data:`HZ_ARMS` of :data:`HZ_SCENARIO` from it.

    Per arm: the run's summary row (clean-eval reward first/final, k1, tail draws, grad-norm maximum,
    verdicts — as in ``results/*/summary.csv``) and its sequences' mean length; per horizon the damage
    (control's final clean eval minus each arm's). Each step asks the budget for the longest step so
    far; an arm cut short says so. ``ArmResults`` of each horizon go to ``out/horizon/n<problems>/``.
    """
    out: dict[str, Any] = {
        "scenario": HZ_SCENARIO,
        "arms": list(HZ_ARMS),
        "model": dataclasses.asdict(sizes.hz_model),
        "seed": seed,
        "points": {},
    }
    longest = {"step": 1.0, "sft": 30.0}

    def in_budget(trainer: Any, m: dict[str, float]) -> bool:
        longest["step"] = max(longest["step"], m["perf/step_s"])
        return report.budget.allows(longest["step"])

    # policies go to a temporary directory, not under --out: only results travel back
    with tempfile.TemporaryDirectory(prefix="gpu_check_policies_") as workdir:
        for n in sizes.hz_problems:
            if not report.budget.allows(longest["sft"] + 10 * longest["step"]):
                report.skip("horizon", f"n_problems={n}", longest["sft"] + 10 * longest["step"])
                continue
            task_kwargs = {"n_problems": n, "digits": 2}
            recipe = sft.SFTConfig(
                task="multiadd",
                task_kwargs=task_kwargs,
                steps=sizes.hz_sft_steps,
                lr=sizes.hz_lr,
                model=sizes.hz_model,
                serve_head_dim=None,
                seed=seed,
            )
            t0 = time.perf_counter()
            path = sft.sft_policy(
                recipe,
                out_dir=Path(workdir) / f"policy_n{n}",
                progress=False,
                threads=None,
                device=device,
            )
            longest["sft"] = max(longest["sft"], time.perf_counter() - t0)
            meta = models.policy_metadata(path)
            point: dict[str, Any] = {
                "task_kwargs": task_kwargs,
                "parameters": meta["parameters"],
                "sft_s": time.perf_counter() - t0,
                "sft_final_loss": meta["final_loss"],
                "sft_sampled_accuracy": meta["sampled_accuracy"],
            }
            report.say(
                f"horizon n_problems={n}: SFT {point['parameters'] / 1e6:.2f} M parameters in {point['sft_s']:.0f} s, "
                f"loss {point['sft_final_loss']:.3f}, sampled accuracy {point['sft_sampled_accuracy']:.2f}"
            )
            results = ArmResults(
                scenario=HZ_SCENARIO,
                arms=list(HZ_ARMS),
                seeds=[seed],
                steps=sizes.hz_steps,
                quick=False,
                reference=HZ_ARMS[0],
                command="bash benchmarks/gpu_check.sh --horizon",
                overrides={"model": str(path), "task_kwargs": task_kwargs, "device": str(device)},
            )
            for arm in HZ_ARMS:
                if not report.budget.allows(10 * longest["step"]):
                    report.skip("horizon", f"n_problems={n} arm {arm}", 10 * longest["step"])
                    continue
                run = run_one(
                    HZ_SCENARIO,
                    arm,
                    seed,
                    sizes.hz_steps,
                    overrides=results.overrides,
                    progress=False,
                    callbacks=[in_budget],
                )
                reference = results.run(HZ_ARMS[0], seed).history if arm != HZ_ARMS[0] else None
                judge(run, reference, DEFAULT_CRITERION)
                results.runs.append(run)
                if len(run.history) < sizes.hz_steps:
                    report.skip(
                        "horizon",
                        f"n_problems={n} {arm} steps {len(run.history) + 1}-{sizes.hz_steps}",
                        longest["step"],
                    )
            results.save(report.out / "horizon" / f"n{n}")
            rows = {r["arm"]: r for r in results.summary_rows()}
            for run in results.runs:
                sequences = len(run.history) * run.config["prompts_per_step"] * run.config["k"]
                rows[run.arm]["response_tokens"] = statistics.fmean(run.series("response/length_mean"))
                rows[run.arm]["tail_draws_per_sequence"] = rows[run.arm]["tail_draws"] / sequences
            point["arms"] = rows
            if "control" in rows:
                point["damage_vs_control"] = {
                    arm: rows["control"]["eval_final"] - r["eval_final"]
                    for arm, r in rows.items()
                    if arm != "control"
                }
            for arm, r in rows.items():
                report.say(
                    f"horizon n_problems={n} {arm:>8}: {r['steps']} steps, clean eval {r['eval_first']:.3f} → "
                    f"{r['eval_final']:.3f}, k1 {r['k1_final']:+.2e}, {r['response_tokens']:.0f} tokens, tail draws "
                    f"{r['tail_draws_per_sequence']:.2f} per sequence, "
                    f"grad-norm max {r['grad_norm_max']:.2f}, verdict {r['verdict_eval'] or r['verdict']}, "
                    f"{r['seconds']:.0f} s"
                )
            out["points"][f"n{n}"] = point
    return out


def run_section(report: Report, name: str, fn: Callable[[], dict[str, Any]]) -> bool:
    """Run one section into ``report.data["sections"][name]``, keeping a traceback if it raises; save."""
    t0 = time.perf_counter()
    report.say(f"== {name} (at {report.budget.elapsed():.0f} s)")
    try:
        result, ok = {"status": "ok", **fn()}, True
    except Exception:
        tb = traceback.format_exc()
        result, ok = {"status": "error", "traceback": tb}, False
        report.say(tb)
    result["section_s"] = time.perf_counter() - t0
    report.data["sections"][name] = result
    report.save()
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "results" / "gpu", help="output directory")
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes")
    ap.add_argument("--budget-s", type=float, default=480.0, help="time budget of the whole check")
    ap.add_argument("--arms", nargs="+", default=["naive", "dvp_mis"], choices=sorted(ARMS))
    ap.add_argument("--steps", type=int, default=None, help="RLOO steps per arm (default 8; 3 dry)")
    ap.add_argument("--train-dtype", default="bf16", choices=["bf16", "fp32"], help="trainer precision")
    ap.add_argument("--seed", type=int, default=0, help="seeds the model init and every RLOO arm")
    ap.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=["logprobs", "fused_head", "rloo"],
        help="sections to leave out",
    )
    ap.add_argument(
        "--horizon",
        action="store_true",
        help="also the horizon study (issue 14) at a larger model size, after the RLOO section",
    )
    args = ap.parse_args(argv)
    budget = Budget(args.budget_s)
    sizes = DRY_RUN if args.dry_run else GPU
    if args.steps is not None:
        sizes = dataclasses.replace(sizes, steps=args.steps)
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device is visible to torch; run with --dry-run for the CPU version")
    device = torch.device("cpu" if args.dry_run else "cuda")

    report = Report(args.out, budget)
    report.data.update(
        args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        sizes=dataclasses.asdict(sizes),
    )
    report.say(
        f"gpu_check: {'dry run on the CPU' if args.dry_run else 'CUDA'}, budget {budget.total_s:.0f} s"
    )
    ok = run_section(report, "env", lambda: environment(device))
    for key in ("gpu", "torch", "transformers", "git_commit"):
        report.say(f"  {key}: {report.data['sections']['env'].get(key)}")
    if "logprobs" not in args.skip:
        ok &= run_section(report, "logprobs", lambda: logprob_section(report, sizes, device))
    if "fused_head" not in args.skip:
        ok &= run_section(report, "fused_head", lambda: fused_head_section(report, sizes, device))
    if "rloo" not in args.skip:
        reserve = sizes.hz_reserve_s if args.horizon else 0.0
        ok &= run_section(
            report,
            "rloo",
            lambda: rloo_section(report, sizes, device, args.arms, args.train_dtype, args.seed, reserve),
        )
    if args.horizon:
        ok &= run_section(report, "horizon", lambda: horizon_section(report, sizes, device, args.seed))
    report.say(f"done in {budget.elapsed():.0f} s; wrote {args.out / 'gpu_check.json'} and gpu_check.log")
    report.save()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
