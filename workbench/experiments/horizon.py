"""The horizon study (issue 14): how the damage of a perturbation grows with the response length T.

Theorem 4.1 says the naive gradient's bias grows with the number of tail tokens in a sequence and does not
average out, so a perturbation that only degrades a 24-token policy should hurt more as responses grow. The
study runs one scenario family at several horizons (``floor12`` at T ≈ 24, ``floor12_t64``, ``floor12_t128``,
``floor12_t256``: the same floor, two, six, twelve and twenty-four posed additions) with a ``control`` arm on
every seed, and reads off:

- **damage**: the same seed's control minus the arm, final clean-eval reward (the evaluations in the last
  quarter of the steps, averaged: ``summary.csv``'s ``eval_final``) — what the mismatch cost the policy;
- **tail draws per sequence**: sampled tokens below e^-13 of their row's max, per rollout sequence;
- **k1 per sequence**: the per-token k1 times the mean response length, the sequence log-ratio
  ``Σ_t log μ − log π`` that sequence-level corrections see.

:func:`horizon_rows` turns saved :class:`~workbench.experiments.runner.ArmResults` into those rows (mean and
sample standard deviation over seeds); :func:`workbench.viz.horizon_figure` draws damage against T.
:func:`sequence_mismatch` is the QUICK probe the tests use: a few naive steps at each horizon.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from workbench.experiments.runner import ArmResults, RunResult, _tail_mean, run_one

__all__ = ["HORIZON_SCENARIOS", "horizon_rows", "run_damage", "sequence_mismatch"]

#: The horizon study's scenarios, shortest first (responses up to 24, 64, 124 and 244 tokens).
HORIZON_SCENARIOS: tuple[str, ...] = ("floor12", "floor12_t64", "floor12_t128", "floor12_t256")


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _eval_final(run: RunResult) -> float:
    """The run's final clean-eval reward, as ``summary.csv``'s ``eval_final``: the finite evaluations among
    its last quarter of steps, averaged."""
    final = _tail_mean(run.series("eval/reward"))
    if not math.isfinite(final):
        raise ValueError(
            f"run {run.name} of {run.scenario} has no clean-eval reward in its last quarter of steps; the "
            "horizon study needs eval_every > 0 and at most a quarter of the run between evaluations"
        )
    return final


def run_damage(run: RunResult, control: RunResult) -> float:
    """``control``'s final clean-eval reward minus ``run``'s (positive: the arm lost reward)."""
    return _eval_final(control) - _eval_final(run)


def _per_sequence(run: RunResult) -> tuple[float, float, float]:
    """(mean response length, tail draws per sequence, k1 per sequence) over the run's steps."""
    seqs = run.config["prompts_per_step"] * run.config["k"]
    lengths = [x for x in run.series("response/length_mean") if math.isfinite(x)]
    tails = [x for x in run.series("mismatch/tail_tokens") if math.isfinite(x)]
    k1_seq = [
        k1 * length
        for k1, length in zip(run.series("mismatch/k1"), run.series("response/length_mean"), strict=True)
        if math.isfinite(k1) and math.isfinite(length)
    ]
    return (
        statistics.fmean(lengths) if lengths else math.nan,
        sum(tails) / (seqs * len(tails)) if tails else math.nan,
        statistics.fmean(k1_seq) if k1_seq else math.nan,
    )


def horizon_rows(results: Iterable[ArmResults], control: str = "control") -> list[dict[str, Any]]:
    """One row per (horizon, arm other than ``control``): T, damage and the per-sequence mismatch.

    Results of the same scenario and task (``overrides["task_kwargs"]``) are pooled, so seeds run in separate
    processes or on separate machines count together. Every seed of every arm needs a ``control`` run on the
    same seed (the damage is paired by seed). ``T`` is the control's mean response length (the policy's own
    length, not shortened or lengthened by the damage). Rows are sorted by T, then arm.

    Returns:
        Dicts with ``scenario``, ``task_kwargs``, ``T``, ``arm``, ``seeds``, ``damage`` (per seed),
        ``damage_mean``, ``damage_sd``, ``tail_per_seq`` and ``k1_per_seq`` (means over seeds) and
        ``verdicts`` (clean-eval verdict labels per seed, where judged).
    """
    groups: dict[tuple[str, str], dict[tuple[str, int], RunResult]] = {}
    for res in results:
        key = (res.scenario, json.dumps(res.overrides.get("task_kwargs"), sort_keys=True))
        runs = groups.setdefault(key, {})
        for run in res.runs:
            if (run.arm, run.seed) in runs:
                raise ValueError(f"{res.scenario}: two runs of {run.name} with the same task; pass each once")
            runs[run.arm, run.seed] = run
    rows = []
    for (scenario, task_kwargs), runs in groups.items():
        seeds = sorted({s for a, s in runs if a == control})
        if not seeds:
            raise ValueError(
                f"{scenario} (task {task_kwargs}): no {control!r} run; the damage is measured against it — "
                f"run it on the same seeds (e.g. --arms naive,dvp_mis,{control})"
            )
        t_control = statistics.fmean(_per_sequence(runs[control, s])[0] for s in seeds)
        for arm in sorted({a for a, _ in runs if a != control}):
            arm_runs = [runs[arm, s] for s in seeds if (arm, s) in runs]
            damage = [run_damage(r, runs[control, r.seed]) for r in arm_runs]
            per_seq = [_per_sequence(r) for r in arm_runs]
            mean, sd = _mean_sd(damage)
            rows.append(
                {
                    "scenario": scenario,
                    "task_kwargs": json.loads(task_kwargs),
                    "T": t_control,
                    "arm": arm,
                    "seeds": [r.seed for r in arm_runs],
                    "damage": damage,
                    "damage_mean": mean,
                    "damage_sd": sd,
                    "tail_per_seq": statistics.fmean(p[1] for p in per_seq),
                    "k1_per_seq": statistics.fmean(p[2] for p in per_seq),
                    "verdicts": [(r.verdict_eval or {}).get("label", "") for r in arm_runs],
                }
            )
    return sorted(rows, key=lambda r: (r["T"], r["arm"]))


def sequence_mismatch(
    scenarios: Sequence[str] = HORIZON_SCENARIOS[:2], arm: str = "naive", steps: int = 3, seed: int = 0
) -> dict[str, dict[str, float]]:
    """A QUICK probe of the mechanism: ``steps`` steps of ``arm`` per scenario, no evaluation.

    Returns, per scenario, the mean response length ``T``, ``tail_per_seq`` and ``k1_per_seq`` — the
    quantities Theorem 4.1 says grow with T. A few steps suffice: they are properties of the warm start
    and the engine, measured on its rollouts, before training has moved the policy much.
    """
    out = {}
    for scenario in scenarios:
        run = run_one(scenario, arm, seed, steps, overrides={"eval_every": 0}, progress=False)
        t, tail, k1 = _per_sequence(run)
        out[scenario] = {"T": t, "tail_per_seq": tail, "k1_per_seq": k1}
    return out
