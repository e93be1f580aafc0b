"""The headline demo: naive RLOO vs DVP + MIS on the same seed, ending in a table and an HTML report.

``workbench demo [--quick] [--steps N] [--seed S] [--out DIR]`` calls :func:`run_demo`, which trains
the :data:`~workbench.experiments.presets.HEADLINE_ARMS` of the
:data:`~workbench.experiments.presets.HEADLINE_SCENARIO` (tqdm bars), judges each run with the
collapse criterion (:mod:`workbench.experiments.collapse`), writes ``results.json``/``summary.csv``
into ``out_dir`` and returns a :class:`DemoRun`; the CLI then draws ``report.html`` from it with
:func:`workbench.viz.save_training_report`. The terminal summary and the report both lead with
:func:`findings`: what the runs measured, in plain words, with the verdict as
one line among them — a reader who has not met the criterion still sees what happened.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.experiments.presets import HEADLINE_ARMS, HEADLINE_SCENARIO, SCENARIOS, run_length
from workbench.experiments.runner import ArmResults, run_arms

__all__ = ["DemoRun", "findings", "format_table", "run_demo"]

#: How the findings name the arms a reader meets in the demo (other arms keep their preset key).
ARM_NAMES = {
    "naive": "naive RLOO",
    "dvp_mis": "DVP + MIS",
    "dvp_mis_veto": "DVP + MIS with the veto",
    "dvp": "DVP",
    "control": "control (no mismatch)",
}

Row = dict[str, Any]


def _num(x: float, signed: bool = False) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:+.3f}" if signed else f"{x:.3f}"


def _per_arm(runs: list[Row], cell: Callable[[Row], str], sep: str = "; ") -> str:
    """``"naive RLOO <cell>; DVP + MIS <cell>"``: one quantity, every arm."""
    return sep.join(f"{ARM_NAMES.get(r['arm'], r['arm'])} {cell(r)}" for r in runs)


def _gaps(runs: list[Row], reference: str | None) -> str:
    """Each arm's final clean-eval reward against the reference's (`` naive RLOO ends 0.076 below …``)."""
    ref = next((r for r in runs if r["arm"] == reference), None)
    if ref is None or not math.isfinite(ref["eval_final"]):
        return ""
    ref_name, ref_final = ARM_NAMES.get(ref["arm"], ref["arm"]), ref["eval_final"]
    return "".join(
        f" {ARM_NAMES.get(r['arm'], r['arm'])} ends {abs(r['eval_final'] - ref_final):.3f} "
        f"{'below' if r['eval_final'] < ref_final else 'above'} {ref_name}."
        for r in runs
        if r is not ref and math.isfinite(r["eval_final"])
    )


def findings(results: ArmResults) -> list[str]:
    """What the runs measured, in plain words: one line per quantity, every arm on each line.

    Per seed: the clean-engine eval reward first → last (the policy itself, the demo's main result) and
    each arm's gap to the reference arm; the sampled reward; the mismatch k1, first → last quarter; the
    tail draws each arm sampled and how many it dropped from its loss; and, as one line among them, the
    collapse criterion's verdicts (``too short`` below its ``min_steps``). The numbers are those of
    :meth:`ArmResults.summary_rows`, as in :func:`format_table`.
    """
    lines = []
    for seed in results.seeds:
        runs = [r for r in results.summary_rows() if r["seed"] == seed]
        prefix = f"seed {seed}: " if len(results.seeds) > 1 else ""
        eval_change = _per_arm(
            runs,
            lambda r: (
                f"{_num(r['eval_first'])} → {_num(r['eval_final'])} "
                f"({_num(r['eval_final'] - r['eval_first'], signed=True)})"
            ),
        )
        lines += [
            f"{prefix}clean-engine eval reward (the policy itself, sampled by an fp32 engine without the "
            f"perturbation), first measurement → mean of the last quarter: {eval_change}."
            + _gaps(runs, results.reference),
            f"{prefix}sampled reward (what the perturbed engine's responses earned), first → last window: "
            + _per_arm(runs, lambda r: f"{_num(r['reward_start'])} → {_num(r['reward_final'])}")
            + ".",
            f"{prefix}mismatch k1 = mean(log μ − log π) over the sampled tokens (0: engine and trainer "
            "agree), first → last quarter: "
            + _per_arm(runs, lambda r: f"{_num(r['k1_first'])} → {_num(r['k1_final'])}")
            + ".",
            f"{prefix}tail draws (sampled tokens below e^-13 of the trainer's max): "
            + _per_arm(
                runs,
                lambda r: (
                    f"sampled {r['tail_draws']:.0f}, dropped {r['boundary_tokens']:.0f} of them from its loss"
                ),
            )
            + ".",
            f"{prefix}verdict of the collapse criterion (workbench/experiments/collapse.py): "
            "on the clean-eval reward: "
            + _per_arm(runs, lambda r: r["verdict_eval"] or "not measured", sep=", ")
            + "; on the sampled reward: "
            + _per_arm(runs, lambda r: r["verdict"], sep=", ")
            + ".",
        ]
    return lines


def format_table(results: ArmResults) -> str:
    """Terminal table: arm, seed, reward first→last, k3 max, grad-norm max, tail draws, verdicts.

    "reward first→last" is the mean *sampled* reward over the verdict's start and final windows; "eval
    first→last" the clean-engine reward (first measurement → mean over the last quarter), ``nan`` when the
    run did not measure it. "verdict" judges the sampled reward, "verdict (eval)" the clean one.
    """
    header = (
        "arm",
        "seed",
        "reward first→last",
        "eval first→last",
        "k3 max",
        "grad-norm max",
        "tail draws",
        "verdict",
        "verdict (eval)",
    )
    lines = []
    for row in results.summary_rows():
        lines.append(
            (
                row["arm"],
                str(row["seed"]),
                f"{row['reward_start']:.3f} → {row['reward_final']:.3f}",
                f"{row['eval_first']:.3f} → {row['eval_final']:.3f}",
                f"{row['k3_max']:.2e}",
                f"{row['grad_norm_max']:.2f}",
                f"{row['tail_draws']:.0f}",
                row["verdict"],
                row["verdict_eval"] or "—",
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "  ".join("─" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


@dataclass
class DemoRun:
    """What :func:`run_demo` produced: the runs and where their data lies (the report is drawn by viz)."""

    results: ArmResults
    """Every run, its metrics and its verdict."""
    results_json: Path
    """``results.json`` (data behind the report)."""

    @property
    def title(self) -> str:
        """The report's title: scenario, seed and length."""
        r = self.results
        return f"{r.scenario}: naive RLOO vs DVP + MIS — seed {r.seeds[0]}, {r.steps} steps" + (
            " (QUICK)" if r.quick else ""
        )

    def histories(self) -> dict[str, list[Row]]:
        """``{"<arm> (<verdict>)": metric rows}``: the curves of the report, labelled with their verdicts."""
        labels = {r.name: f"{r.arm} ({(r.verdict or {}).get('label', '?')})" for r in self.results.runs}
        return {labels[k]: v for k, v in self.results.histories().items()}

    def findings(self) -> list[str]:
        """:func:`findings` of these runs."""
        return findings(self.results)

    def summary(self) -> str:
        """The terminal table, then :func:`findings`: what the runs measured, in plain words."""
        r = self.results
        scen = SCENARIOS[r.scenario]
        head = (
            f"scenario {r.scenario!r} (engine {scen.get('engine_dtype', 'bf16')} + "
            f"{scen.get('perturbation') or 'no perturbation'}), {r.steps} steps, "
            f"seeds {r.seeds}{' (QUICK)' if r.quick else ''}"
        )

        return "\n".join(
            [head, format_table(r), "", "What the runs measured:", *(f"- {f}" for f in findings(r))]
        )


def run_demo(steps: int | None, seed: int, out_dir: Path, quick: bool) -> DemoRun:
    """Run the headline comparison (naive RLOO vs DVP + MIS) and write its results.

    The HTML report is drawn from the returned data by :func:`workbench.viz.save_training_report` (what
    ``workbench demo`` does next).

    Args:
        steps: steps per arm (``None``: the headline scenario's full or QUICK length).
        seed: the seed shared by both arms (same prompts, same policy).
        out_dir: where ``results.json`` and ``summary.csv`` go (created).
        quick: the QUICK length (about a minute on 2 idle cores).

    Returns:
        A :class:`DemoRun` (``.summary()`` for the terminal, ``.histories()`` and ``.findings()`` for the report).
    """
    if steps is not None and steps < 2:
        raise ValueError(f"steps={steps} must be >= 2 (or None for the preset's length)")
    out_dir = Path(out_dir)
    n = run_length(HEADLINE_SCENARIO, quick) if steps is None else steps
    cmd = f"workbench demo --steps {n} --seed {seed} --out {shlex.quote(str(out_dir))}" + (
        " --quick" if quick else ""
    )
    results = run_arms(
        HEADLINE_SCENARIO,
        list(HEADLINE_ARMS),
        seeds=[seed],
        steps=n,
        quick=quick,
        reference="dvp_mis",
        out_dir=out_dir,
        command=cmd,
    )
    return DemoRun(results=results, results_json=out_dir / "results.json")
