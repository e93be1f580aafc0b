"""Run several arms of a scenario over several seeds, judge each run, and save everything as data.

>>> from workbench.experiments.runner import run_arms            # doctest: +SKIP
>>> res = run_arms("floor", ["naive", "dvp_mis"], seeds=[0, 1, 2], quick=True)  # doctest: +SKIP
>>> res.save("results/floor_quick")                               # doctest: +SKIP

Each run is one :class:`~workbench.trainer.RLOOTrainer` (same policy, same seed ⇒ same prompts
across arms). The verdict of every run comes from :mod:`workbench.experiments.collapse`, against the
``reference`` arm on the same seed. :meth:`ArmResults.save` writes, atomically,

- ``results.json``: scenario, arms, seeds, steps, the command that produced it, every run's full
  config, wall time, verdict and per-step metrics (:data:`KEPT_KEYS`);
- ``summary.csv``: one row per (arm, seed) with the headline numbers.

:func:`load_results` reads ``results.json`` back into an :class:`ArmResults`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.experiments.collapse import DEFAULT_CRITERION, LABELS, CollapseCriterion, Verdict
from workbench.experiments.presets import ARMS, SCENARIOS, make_config, run_length

if TYPE_CHECKING:
    from workbench.trainer import Callback

__all__ = [
    "KEPT_KEYS",
    "ArmResults",
    "RunResult",
    "atomic_write_json",
    "atomic_write_text",
    "json_clean",
    "judge",
    "load_results",
    "merge_results",
    "rejudge",
    "resolve_model",
    "run_arms",
    "run_one",
]

#: Per-step metrics kept in ``results.json`` (the rest stay in memory / a run directory).
KEPT_KEYS: tuple[str, ...] = (
    "step",
    "reward/mean",
    "reward/accuracy",
    "eval/reward",
    "response/length_mean",
    "mismatch/k1",
    "mismatch/k3",
    "mismatch/max_abs_delta",
    "mismatch/tail_tokens",
    "mismatch/tail_delta_mean",
    "mismatch/tail_logp_mean",
    "mismatch/tail_seqs",
    "mismatch/tail_pos_adv",
    "mismatch/lowp_count",
    "mismatch/lowp_delta_mean",
    "mismatch/chi2_seq",
    "dvp/boundary_tokens",
    "dvp/one_minus_z_mean",
    "dvp/log_rho_mean",
    "dvp/one_minus_z_max",
    "dvp/entropy_mean",
    "dvp/logp_mean",
    "is/ess",
    # What the correction drops (seq-MIS: 1 − the kept fraction of sequences; lessons/LOG.md, horizon study).
    "is/frac_masked",
    "is/frac_vetoed",
    "is/frac_trust_region",
    "optim/grad_norm",
    "loss/all_rejected",
    "perf/step_s",
)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def json_clean(x: Any) -> Any:
    """``x`` with every non-finite float replaced by ``None``, through nested mappings, lists and tuples.

    ``json.dumps`` would write NaN and inf as bare ``NaN``/``Infinity``, which strict JSON readers
    (browsers, ``jq``) reject; ``None`` becomes ``null``. Mappings become dicts and tuples lists.

    >>> json_clean({"a": math.nan, "b": [1.0, (math.inf, "x")], "c": 2})
    {'a': None, 'b': [1.0, [None, 'x']], 'c': 2}
    """
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {k: json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_clean(v) for v in x]
    return x


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``json.dumps(json_clean(data), indent=1)`` and a newline to ``path`` atomically.

    The file is strict JSON (non-finite floats as ``null``) and never half-written.
    """
    return atomic_write_text(path, json.dumps(json_clean(data), indent=1) + "\n")


def resolve_model(name: str | None) -> str | None:
    """The model spec to train from: a shipped policy name as is, else a cached SFT policy directory.

    Scenarios name policies (``"multiadd"``, ``"multiadd_smooth"``) that the SFT recipes ship under
    ``workbench/assets/policies``. Until one is shipped, the same recipe (``workbench.sft.PRESETS``) is
    trained once and cached (``~/.cache/dvp-workbench``), so an experiment runs either way (slowly the
    first time). Paths and ``None`` pass through.
    """
    from workbench import models, sft

    if name is None or name in models.available_policies() or Path(name).exists():
        return name
    if name in sft.PRESETS:
        return str(sft.sft_policy(sft.PRESETS[name], progress=False))
    return name  # let the trainer raise its "unknown policy" error


@dataclass
class RunResult:
    """One training run: which arm and seed, its config, metrics, wall time and verdict."""

    scenario: str
    arm: str
    seed: int
    config: dict[str, Any]
    """``RLOOConfig.to_dict()`` of the run."""
    history: list[dict[str, float]]
    """Per-step metrics (:data:`KEPT_KEYS` when loaded from disk)."""
    seconds: float
    """Wall-clock seconds of the run (load average dependent: see ``ArmResults.load_avg``)."""
    verdict: dict[str, Any] | None = None
    """:meth:`Verdict.to_dict` of the sampled reward (``reward/mean``) against the same-seed reference."""
    verdict_eval: dict[str, Any] | None = None
    """The same verdict on the clean-engine reward (``eval/reward``), when the run measured it."""

    @property
    def name(self) -> str:
        """``arm/s<seed>``, the run's label in figures and tables."""
        return f"{self.arm}/s{self.seed}"

    def series(self, key: str) -> list[float]:
        """One metric over steps (``nan`` where missing)."""
        return [float(r.get(key, math.nan)) for r in self.history]

    def to_dict(self, keys: Sequence[str] | None = KEPT_KEYS) -> dict[str, Any]:
        """JSON-ready dict; ``keys`` selects the per-step metrics kept (``None``: all)."""
        hist = self.history if keys is None else [{k: r[k] for k in keys if k in r} for r in self.history]
        return {
            "scenario": self.scenario,
            "arm": self.arm,
            "seed": self.seed,
            "config": self.config,
            "seconds": self.seconds,
            "verdict": self.verdict,
            "verdict_eval": self.verdict_eval,
            "history": [{k: _json_float(v) for k, v in r.items()} for r in hist],
        }


def _json_float(v: float) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def _from_json_float(v: float | None) -> float:
    return math.nan if v is None else float(v)


@dataclass
class ArmResults:
    """All runs of one experiment (scenario × arms × seeds) plus how they were produced."""

    scenario: str
    arms: list[str]
    seeds: list[int]
    steps: int
    quick: bool
    runs: list[RunResult] = field(default_factory=list)
    reference: str | None = "dvp_mis"
    """Arm whose run on the same seed is the reference of the degradation rule."""
    command: str = ""
    """The command line (or call) that produced the results."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config overrides applied on top of the preset."""
    load_avg: float = math.nan
    """1-minute load average when the runs finished (timings on a shared machine depend on it)."""

    def run(self, arm: str, seed: int) -> RunResult:
        """The run of ``arm`` on ``seed``."""
        for r in self.runs:
            if r.arm == arm and r.seed == seed:
                return r
        raise KeyError(f"no run for arm={arm!r}, seed={seed}; have {[r.name for r in self.runs]}")

    def histories(self, arms: Iterable[str] | None = None) -> dict[str, list[dict[str, float]]]:
        """``{"arm/s<seed>": metric rows}`` — the input of :func:`workbench.viz.training_figure`."""
        wanted = set(arms) if arms is not None else None
        return {r.name: r.history for r in self.runs if wanted is None or r.arm in wanted}

    def counts(self, which: str = "verdict") -> dict[str, dict[str, int]]:
        """Per arm, how many seeds ended in each verdict label (``which``: ``verdict`` or ``verdict_eval``)."""
        out: dict[str, dict[str, int]] = {a: dict.fromkeys(LABELS, 0) for a in self.arms}
        for r in self.runs:
            v = getattr(r, which)
            if v is not None:
                out[r.arm][v["label"]] += 1
        return out

    def summary_rows(self) -> list[dict[str, Any]]:
        """One flat row per run: the headline numbers of ``summary.csv``."""
        rows = []
        order = {a: i for i, a in enumerate(self.arms)}
        for r in sorted(self.runs, key=lambda r: (order.get(r.arm, len(order)), r.seed)):
            v = r.verdict or {}
            rows.append(
                {
                    "scenario": self.scenario,
                    "arm": r.arm,
                    "seed": r.seed,
                    "steps": len(r.history),
                    "reward_start": v.get("start", math.nan),
                    "reward_peak": v.get("peak", math.nan),
                    "reward_final": v.get("final", math.nan),
                    "eval_first": _first_finite(r.series("eval/reward")),
                    "eval_final": _tail_mean(r.series("eval/reward")),
                    "k1_first": _tail_mean(r.series("mismatch/k1")[::-1]),  # mean of the first quarter
                    "k1_final": _tail_mean(r.series("mismatch/k1")),
                    "k3_max": _nanmax(r.series("mismatch/k3")),
                    "grad_norm_max": _nanmax(r.series("optim/grad_norm")),
                    "tail_draws": _nansum(r.series("mismatch/tail_tokens")),
                    "boundary_tokens": _nansum(r.series("dvp/boundary_tokens")),
                    "verdict": v.get("label", ""),
                    "verdict_eval": (r.verdict_eval or {}).get("label", ""),
                    "seconds": round(r.seconds, 1),
                }
            )
        return rows

    def arm_summary(self) -> dict[str, dict[str, float]]:
        """Per arm: mean ± std over seeds of the final reward, and the verdict counts."""
        out: dict[str, dict[str, float]] = {}
        for arm in self.arms:
            finals = [row["reward_final"] for row in self.summary_rows() if row["arm"] == arm]
            finals = [f for f in finals if math.isfinite(f)]
            out[arm] = {
                "final_mean": statistics.fmean(finals) if finals else math.nan,
                "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                **{k: float(v) for k, v in self.counts()[arm].items()},
                **{f"eval_{k}": float(v) for k, v in self.counts("verdict_eval")[arm].items()},
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of everything (see the module docstring)."""
        return {
            "scenario": self.scenario,
            "arms": self.arms,
            "seeds": self.seeds,
            "steps": self.steps,
            "quick": self.quick,
            "reference": self.reference,
            "command": self.command,
            "overrides": self.overrides,
            "load_avg": _json_float(self.load_avg),
            "criterion": DEFAULT_CRITERION.__dict__,
            "arm_summary": {
                a: {k: _json_float(v) for k, v in s.items()} for a, s in self.arm_summary().items()
            },
            "runs": [r.to_dict() for r in self.runs],
        }

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``results.json`` and ``summary.csv`` into ``out_dir`` atomically; returns the JSON path."""
        out = Path(out_dir)
        path = atomic_write_text(out / "results.json", json.dumps(self.to_dict(), indent=1) + "\n")
        rows = self.summary_rows()
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        atomic_write_text(out / "summary.csv", buf.getvalue())
        return path


def _nanmax(xs: Sequence[float]) -> float:
    vals = [x for x in xs if math.isfinite(x)]
    return max(vals) if vals else math.nan


def _nansum(xs: Sequence[float]) -> float:
    return float(sum(x for x in xs if math.isfinite(x)))


def _first_finite(xs: Sequence[float]) -> float:
    return next((x for x in xs if math.isfinite(x)), math.nan)


def _last_finite(xs: Sequence[float]) -> float:
    """The last measured value of a sparse metric (``eval/reward`` is logged every few steps); nan if none."""
    return _first_finite(xs[::-1])


def _tail_mean(xs: Sequence[float], frac: float = 0.25) -> float:
    vals = [x for x in xs[-max(1, int(len(xs) * frac)) :] if math.isfinite(x)]
    return statistics.fmean(vals) if vals else math.nan


def read_json(path: str | os.PathLike[str], default_name: str) -> dict[str, Any]:
    """An experiment's JSON file (``path`` or ``path/default_name``), with errors that say how to get it."""
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{p} does not exist; run the experiment first (see results/README.md)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); re-run the experiment that wrote it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p} holds a JSON {type(data).__name__}, not an experiment's object; re-run it")
    return data


#: Old veto threshold of the ``dvp_mis`` arm, by which :func:`current_arm` recognises its pre-2026-12-05 runs.
_OLD_DVP_MIS_VETO = 1e-4


def current_arm(arm: str, config: Mapping[str, Any]) -> str:
    """Today's name of an arm a results file recorded as ``arm`` with run config ``config``.

    On 2026-12-05 the recipe arm ``dvp_mis`` dropped its sequence veto (:data:`~workbench.experiments.ARMS`):
    a run written before then as ``dvp_mis`` with ``veto=1e-4`` is today's ``dvp_mis_veto``, and one written
    as ``dvp_mis_noveto`` is today's ``dvp_mis``. The files keep the names they were written with; reading
    them goes through this map, decided by the stored config, so old and new runs of one arm pool together.

    >>> current_arm("dvp_mis", {"veto": 1e-4}), current_arm("dvp_mis_noveto", {"veto": None})
    ('dvp_mis_veto', 'dvp_mis')
    >>> current_arm("dvp_mis", {"veto": None}), current_arm("naive", {"veto": None})
    ('dvp_mis', 'naive')
    """
    if arm == "dvp_mis" and config.get("veto") == _OLD_DVP_MIS_VETO:
        return "dvp_mis_veto"
    if arm == "dvp_mis_noveto":
        return "dvp_mis"
    return arm


def run_from_dict(r: Mapping[str, Any]) -> RunResult:
    """Inverse of :meth:`RunResult.to_dict` (JSON nulls back to nan), arm names as today's
    (:func:`current_arm`)."""
    return RunResult(
        scenario=r["scenario"],
        arm=current_arm(r["arm"], r["config"]),
        seed=int(r["seed"]),
        config=r["config"],
        history=[{k: _from_json_float(v) for k, v in row.items()} for row in r["history"]],
        seconds=float(r["seconds"]),
        verdict=r.get("verdict"),
        verdict_eval=r.get("verdict_eval"),
    )


def load_results(path: str | os.PathLike[str]) -> ArmResults:
    """Read a ``results.json`` (or the directory holding it) written by :meth:`ArmResults.save`."""
    data = read_json(path, "results.json")
    runs = [run_from_dict(r) for r in data["runs"]]
    renamed = {r["arm"]: run.arm for r, run in zip(data["runs"], runs, strict=True)}  # written name → today's
    reference = data.get("reference")
    return ArmResults(
        scenario=data["scenario"],
        arms=[renamed.get(a, a) for a in data["arms"]],
        seeds=[int(s) for s in data["seeds"]],
        steps=int(data["steps"]),
        quick=bool(data["quick"]),
        runs=runs,
        reference=renamed.get(reference, reference),
        command=data.get("command", ""),
        overrides=data.get("overrides", {}),
        load_avg=_from_json_float(data.get("load_avg")),
    )


def merge_results(parts: Sequence[ArmResults]) -> ArmResults:
    """One :class:`ArmResults` from runs of the *same* scenario made in several processes (more seeds, more arms).

    Scenario, steps, QUICK and overrides must match; arms and seeds are joined in order; a part run without a
    reference (``reference=None``, e.g. extra arms added later) takes the others'. Verdicts are recomputed
    against the reference when it has a run on every seed. Commands are joined with ``" && "``; the load
    average is the largest seen.
    """
    if not parts:
        raise ValueError("parts is empty; pass at least one ArmResults")
    first = parts[0]
    refs = {p.reference for p in parts if p.reference is not None}
    for p in parts[1:]:
        if (p.scenario, p.steps, p.quick, p.overrides) != (
            first.scenario,
            first.steps,
            first.quick,
            first.overrides,
        ):
            raise ValueError(
                f"cannot merge results of {p.scenario}/{p.steps} steps/overrides {p.overrides} into "
                f"{first.scenario}/{first.steps} steps/overrides {first.overrides}: scenario, steps, QUICK and "
                "overrides must match"
            )
    if len(refs) > 1:
        raise ValueError(f"cannot merge results judged against different references {sorted(refs)}")
    names = [r.name for p in parts for r in p.runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"cannot merge: runs {dupes} appear in more than one part (one run per arm and seed)"
        )
    merged = ArmResults(
        scenario=first.scenario,
        arms=list(dict.fromkeys(a for p in parts for a in p.arms)),
        seeds=list(dict.fromkeys(s for p in parts for s in p.seeds)),
        steps=first.steps,
        quick=first.quick,
        runs=[r for p in parts for r in p.runs],
        reference=next(iter(refs), None),
        command=" && ".join(p.command for p in parts),
        overrides=dict(first.overrides),
        load_avg=max((p.load_avg for p in parts if math.isfinite(p.load_avg)), default=math.nan),
    )
    have_ref = {r.seed for r in merged.runs if r.arm == merged.reference}
    if merged.reference is not None and have_ref >= {r.seed for r in merged.runs}:
        rejudge(merged)
    return merged


def run_one(
    scenario: str,
    arm: str,
    seed: int,
    steps: int | None = None,
    *,
    quick: bool = False,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    run_dir: str | os.PathLike[str] | None = None,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Train one arm of ``scenario`` on ``seed`` for ``steps`` (default: the scenario's run length).

    Args:
        scenario: a key of :data:`~workbench.experiments.presets.SCENARIOS`.
        arm: a key of :data:`~workbench.experiments.presets.ARMS`.
        seed: the run's seed (prompts and rollout sampling; the policy is the same for every seed).
        steps: optimizer steps; ``None`` uses :func:`~workbench.experiments.presets.run_length`.
        quick: use the QUICK run length when ``steps`` is ``None``.
        overrides: extra :class:`~workbench.trainer.RLOOConfig` fields on top of the preset.
        progress: show a tqdm bar.
        run_dir: optional run directory (config, metrics.jsonl, checkpoint).
        callbacks: passed to :meth:`~workbench.trainer.RLOOTrainer.train` (one returning ``False``
            ends the run early, e.g. at a time budget).

    Returns:
        The :class:`RunResult` (no verdict yet: :func:`run_arms` judges runs against the reference).
    """
    from workbench.trainer import RLOOTrainer

    if arm not in ARMS:
        raise ValueError(f"arm={arm!r} is unknown: choose from {sorted(ARMS)}")
    n = run_length(scenario, quick) if steps is None else steps
    if n < 2:
        raise ValueError(f"steps={n} must be >= 2 (the verdict compares the start with the end)")
    fields = {**SCENARIOS[scenario], **ARMS[arm], **dict(overrides or {})}
    model = resolve_model(fields.get("model"))
    cfg = make_config(f"{scenario}/{arm}", **{**dict(overrides or {}), "model": model, "seed": seed})
    t0 = time.perf_counter()
    trainer = RLOOTrainer(cfg, run_dir)
    trainer.train(n, callbacks, progress=progress)
    return RunResult(scenario, arm, seed, cfg.to_dict(), trainer.history, time.perf_counter() - t0)


def run_arms(
    scenario: str,
    arms: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int | None = None,
    quick: bool = False,
    *,
    reference: str | None = "dvp_mis",
    overrides: Mapping[str, Any] | None = None,
    criterion: CollapseCriterion = DEFAULT_CRITERION,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    command: str | None = None,
) -> ArmResults:
    """Run every (arm, seed) of ``scenario``, judge each run, optionally save the results.

    Args:
        scenario: a key of :data:`~workbench.experiments.presets.SCENARIOS`.
        arms: arm names (default: ``naive``, ``dvp_mis``).
        seeds: one run per arm per seed.
        steps: steps per run (``None``: the scenario's full or QUICK length).
        quick: QUICK run length.
        reference: arm whose same-seed run is the degradation reference (run even if not in ``arms``
            would be surprising, so it must be one of ``arms``; ``None`` disables the degradation rule).
        overrides: config fields applied to every arm.
        criterion: the collapse / degradation thresholds.
        out_dir: when given, :meth:`ArmResults.save` writes there after every run (a cut-off
            experiment keeps what it finished).
        progress: tqdm bars (one per run, plus one over runs).
        command: recorded in the results (default: this process's command line).

    Returns:
        The :class:`ArmResults`, with a verdict for every run.
    """
    from tqdm.auto import tqdm

    arms = list(arms) if arms is not None else ["naive", "dvp_mis"]
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario={scenario!r} is unknown: choose one of {sorted(SCENARIOS)}")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"arms {unknown} are unknown: choose from {sorted(ARMS)}")
    if reference is not None and reference not in arms:
        raise ValueError(f"reference={reference!r} must be one of arms={arms} (or None)")
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed, e.g. seeds=(0, 1, 2)")
    n = run_length(scenario, quick) if steps is None else steps
    res = ArmResults(
        scenario=scenario,
        arms=arms,
        seeds=list(seeds),
        steps=n,
        quick=quick,
        reference=reference,
        command=command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        overrides=dict(overrides or {}),
    )
    # The reference runs first on each seed, so every later run can be judged as soon as it ends.
    order = [(a, s) for s in seeds for a in sorted(arms, key=lambda a: a != reference)]
    for arm, seed in tqdm(order, desc=f"{scenario}: arms × seeds", disable=not progress):
        run = run_one(scenario, arm, seed, n, overrides=overrides, progress=progress)
        res.runs.append(run)
        ref_rows = res.run(reference, seed).history if reference is not None and arm != reference else None
        judge(run, ref_rows, criterion)
        res.load_avg = os.getloadavg()[0]
        if out_dir is not None:
            res.save(out_dir)
    return res


def judge(
    run: RunResult, reference: Sequence[Mapping[str, float]] | None, criterion: CollapseCriterion
) -> None:
    """Set ``run.verdict`` (sampled reward) and, when the run has clean-eval rewards, ``run.verdict_eval``."""
    run.verdict = criterion.classify(run.history, reference).to_dict()
    if any(math.isfinite(x) for x in run.series("eval/reward")):
        on_eval = dataclasses.replace(criterion, reward_key="eval/reward")
        run.verdict_eval = on_eval.classify(run.history, reference).to_dict()


def rejudge(results: ArmResults, criterion: CollapseCriterion = DEFAULT_CRITERION) -> ArmResults:
    """Recompute every verdict of ``results`` in place (e.g. after loading older files); returns it."""
    for run in results.runs:
        ref = (
            results.run(results.reference, run.seed).history
            if results.reference is not None and run.arm != results.reference
            else None
        )
        judge(run, ref, criterion)
    return results


def verdict_of(run: RunResult) -> Verdict | None:
    """The run's verdict as a :class:`Verdict` (``None`` when not judged)."""
    if run.verdict is None:
        return None
    v = dict(run.verdict)
    v["reasons"] = tuple(v.get("reasons", ()))
    return Verdict(**v)
