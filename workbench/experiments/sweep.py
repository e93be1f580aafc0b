"""The paper's check 3 — the ρ sweep: final reward and final mismatch as functions of ρ, over seeds.

Every point is the ``dvp_mis`` arm of a scenario with only ``rho`` changed (engine and trainer use the
same ρ; ``None`` is "no pruning", i.e. the ``mis`` arm). The paper expects a U-shape: a large ρ
prunes tokens the policy needs (bias, Prop 5.5), a tiny ρ lets the tail back in (mismatch).
:func:`u_shape` reads the sweep and says whether the best ρ is interior, and where.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from workbench.dvp import DEFAULT_RHO
from workbench.experiments.runner import (
    RunResult,
    _last_finite,
    _tail_mean,
    atomic_write_json,
    atomic_write_text,
    read_json,
    run_from_dict,
    run_one,
)

__all__ = ["SWEEP_RHOS", "SweepResults", "load_sweep", "rho_label", "rho_sweep", "u_shape"]

#: The issue's grid: {1e-2, 1e-4, 1e-6, 1e-8, 1e-10, e^-13, 1e-16} and no pruning.
SWEEP_RHOS: tuple[float | None, ...] = (1e-2, 1e-4, 1e-6, 1e-8, 1e-10, DEFAULT_RHO, 1e-16, None)


def rho_label(rho: float | None) -> str:
    """Short label of a ρ value.

    >>> rho_label(None), rho_label(DEFAULT_RHO), rho_label(1e-4)
    ('none', 'e^-13', '1e-04')
    """
    if rho is None:
        return "none"
    if math.isclose(rho, DEFAULT_RHO):
        return "e^-13"
    return f"{rho:.0e}"


@dataclass
class SweepResults:
    """Runs of a ρ sweep and the per-ρ summary."""

    scenario: str
    rhos: list[float | None]
    seeds: list[int]
    steps: int
    runs: dict[str, list[RunResult]] = field(default_factory=dict)
    """``rho_label -> runs`` (one per seed)."""
    command: str = ""

    def points(self) -> list[dict[str, Any]]:
        """Per ρ, largest first and no pruning last (the order :func:`u_shape` reads): mean ± std over seeds of
        the final sampled and clean-eval reward, final k1/k3, final 1 − Z, tail draws."""
        out = []
        for rho in sorted(self.rhos, key=lambda r: (r is None, -(r or 0.0))):
            runs = self.runs.get(rho_label(rho), [])
            if not runs:
                continue
            finals = [_tail_mean(r.series("reward/mean")) for r in runs]
            evals = [e for e in (_last_finite(r.series("eval/reward")) for r in runs) if math.isfinite(e)]
            k3 = [_tail_mean(r.series("mismatch/k3")) for r in runs]
            k1 = [_tail_mean(r.series("mismatch/k1")) for r in runs]
            pruned = [_tail_mean(r.series("dvp/one_minus_z_mean")) for r in runs]
            tails = [sum(x for x in r.series("mismatch/tail_tokens") if math.isfinite(x)) for r in runs]
            out.append(
                {
                    "rho": rho,
                    "label": rho_label(rho),
                    "n": len(runs),
                    "reward_final_mean": statistics.fmean(finals),
                    "reward_final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                    "eval_final_mean": statistics.fmean(evals) if evals else math.nan,
                    "eval_final_std": statistics.stdev(evals) if len(evals) > 1 else 0.0,
                    "k3_final_mean": statistics.fmean(k3),
                    "k1_final_mean": statistics.fmean(k1),
                    "one_minus_z_final_mean": statistics.fmean(pruned),
                    "tail_draws_mean": statistics.fmean(tails),
                    "finals": finals,
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: summary points plus every run (metrics: :data:`~workbench.experiments.runner.KEPT_KEYS`)."""
        return {
            "scenario": self.scenario,
            "rhos": self.rhos,
            "seeds": self.seeds,
            "steps": self.steps,
            "command": self.command,
            "points": self.points(),
            "u_shape": u_shape(self.points()),
            "u_shape_eval": u_shape(self.points(), key="eval_final_mean"),
            "runs": {k: [r.to_dict() for r in v] for k, v in self.runs.items()},
        }

    def save(self, path: str) -> None:
        """Write ``sweep.json`` and ``sweep.csv`` into the directory ``path`` (atomically)."""
        from pathlib import Path

        out = Path(path)
        atomic_write_json(out / "sweep.json", self.to_dict())
        cols = [
            "label",
            "n",
            "reward_final_mean",
            "reward_final_std",
            "eval_final_mean",
            "eval_final_std",
            "k3_final_mean",
            "k1_final_mean",
            "one_minus_z_final_mean",
            "tail_draws_mean",
        ]
        lines = [",".join(cols)]
        for p in self.points():
            lines.append(",".join(str(p[c]) if isinstance(p[c], (str, int)) else f"{p[c]:.6g}" for c in cols))
        atomic_write_text(out / "sweep.csv", "\n".join(lines) + "\n")


def load_sweep(path: str | os.PathLike[str]) -> SweepResults:
    """Read a ``sweep.json`` (or the directory holding it) written by :meth:`SweepResults.save`.

    The summary is recomputed from the runs, so a sweep saved by an older version reads with today's
    :meth:`SweepResults.points` (ρ order, clean-eval columns).
    """
    data = read_json(path, "sweep.json")
    return SweepResults(
        scenario=data["scenario"],
        rhos=list(data["rhos"]),
        seeds=[int(s) for s in data["seeds"]],
        steps=int(data["steps"]),
        runs={label: [run_from_dict(r) for r in runs] for label, runs in data["runs"].items()},
        command=data.get("command", ""),
    )


def u_shape(points: Sequence[Mapping[str, Any]], key: str = "reward_final_mean") -> dict[str, Any]:
    """Does the final reward peak at an interior ρ, beyond the seed noise?

    The grid is ordered from the largest ρ (most pruning) to the smallest and then ``None``. A U-shape
    (an inverted U in reward) needs the best point to be interior *and* both ends to trail it by more
    than the standard error of the difference.

    Args:
        points: :meth:`SweepResults.points`.
        key: the quantity to maximise (``*_mean``; its spread is read from the matching ``*_std``).

    Returns:
        ``{"best": label, "interior": bool, "left_gap": float, "right_gap": float, "u_shape": bool}``.

    >>> pts = [{"label": "a", "reward_final_mean": 0.2, "reward_final_std": 0.01, "n": 3},
    ...        {"label": "b", "reward_final_mean": 0.5, "reward_final_std": 0.01, "n": 3},
    ...        {"label": "c", "reward_final_mean": 0.3, "reward_final_std": 0.01, "n": 3}]
    >>> u_shape(pts)["u_shape"], u_shape(pts)["best"]
    (True, 'b')
    """
    if len(points) < 3:
        return {
            "best": None,
            "interior": False,
            "left_gap": math.nan,
            "right_gap": math.nan,
            "u_shape": False,
        }
    vals = [float(p[key]) for p in points]
    best = max(range(len(vals)), key=vals.__getitem__)

    std_key = key.removesuffix("_mean") + "_std"

    def se(i: int) -> float:
        p = points[i]
        return float(p.get(std_key, 0.0)) / math.sqrt(max(1, int(p.get("n", 1))))

    left, right = vals[best] - vals[0], vals[best] - vals[-1]
    interior = 0 < best < len(vals) - 1
    sig_left = left > 2 * math.hypot(se(best), se(0))
    sig_right = right > 2 * math.hypot(se(best), se(len(vals) - 1))
    return {
        "best": points[best]["label"],
        "interior": interior,
        "left_gap": left,
        "right_gap": right,
        "u_shape": bool(interior and sig_left and sig_right),
    }


def rho_sweep(
    scenario: str,
    rhos: Sequence[float | None] = SWEEP_RHOS,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int | None = None,
    quick: bool = False,
    *,
    arm: str = "dvp_mis",
    overrides: Mapping[str, Any] | None = None,
    out_dir: str | None = None,
    progress: bool = True,
    command: str = "",
) -> SweepResults:
    """Run ``arm`` of ``scenario`` at every ρ in ``rhos`` on every seed.

    Args:
        scenario: a scenario name.
        rhos: the grid (``None``: no pruning).
        seeds: seeds per ρ.
        steps: steps per run (``None``: the scenario's full or QUICK length).
        quick: QUICK length.
        arm: the arm whose ``rho`` is swept (both engine and trainer follow it).
        overrides: further config fields.
        out_dir: save after every run (a cut-off sweep keeps what it finished).
        progress: tqdm bars.
        command: recorded in the results.

    Returns:
        A :class:`SweepResults`.
    """
    from tqdm.auto import tqdm

    from workbench.experiments.presets import run_length

    n = run_length(scenario, quick) if steps is None else steps
    res = SweepResults(scenario, list(rhos), list(seeds), n, command=command)
    grid = [(rho, s) for s in seeds for rho in rhos]
    for rho, seed in tqdm(grid, desc=f"ρ sweep {scenario}", disable=not progress):
        run = run_one(
            scenario, arm, seed, n, overrides={**dict(overrides or {}), "rho": rho}, progress=progress
        )
        res.runs.setdefault(rho_label(rho), []).append(run)
        if out_dir is not None:
            res.save(out_dir)
    return res
