"""The headline demo: naive RLOO vs DVP + MIS on the same seed, ending in a table and an HTML report.

``workbench demo [--quick] [--steps N] [--seed S] [--out DIR]`` calls :func:`run_demo`, which trains
the :data:`~workbench.experiments.presets.HEADLINE_ARMS` of the
:data:`~workbench.experiments.presets.HEADLINE_SCENARIO` (tqdm bars), judges each run with the
collapse criterion (:mod:`workbench.experiments.collapse`), writes ``results.json``/``summary.csv``
and ``report.html`` into ``out_dir`` and returns a :class:`DemoReport`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from workbench.experiments.presets import HEADLINE_ARMS, HEADLINE_SCENARIO, SCENARIOS, run_length
from workbench.experiments.runner import ArmResults, run_arms

__all__ = ["DemoReport", "format_table", "run_demo"]


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
class DemoReport:
    """What :func:`run_demo` produced."""

    results: ArmResults
    """Every run, its metrics and its verdict."""
    html: Path
    """The plotly HTML report."""
    results_json: Path
    """``results.json`` (data behind the report)."""

    def summary(self) -> str:
        """The terminal table plus a one-line reading of the verdicts."""
        r = self.results
        scen = SCENARIOS[r.scenario]
        head = (
            f"scenario {r.scenario!r} (engine {scen.get('engine_dtype', 'bf16')} + "
            f"{scen.get('perturbation') or 'no perturbation'}), {r.steps} steps, "
            f"seeds {r.seeds}{' (QUICK)' if r.quick else ''}"
        )

        def line(which: str) -> str:
            return "; ".join(
                f"{arm}: " + ", ".join(f"{n} {label}" for label, n in c.items() if n)
                for arm, c in r.counts(which).items()
            )

        return "\n".join(
            [
                head,
                format_table(r),
                f"verdicts (sampled reward) — {line('verdict')}",
                f"verdicts (clean-engine eval reward) — {line('verdict_eval')}",
            ]
        )


def run_demo(steps: int | None, seed: int, out_dir: Path, quick: bool) -> DemoReport:
    """Run the headline comparison (naive RLOO vs DVP + MIS) and write its report.

    Args:
        steps: steps per arm (``None``: the headline scenario's full or QUICK length).
        seed: the seed shared by both arms (same prompts, same policy).
        out_dir: where ``results.json``, ``summary.csv`` and ``report.html`` go (created).
        quick: the QUICK length (about a minute on 2 idle cores).

    Returns:
        A :class:`DemoReport` (``.summary()`` for the terminal, ``.html`` for the browser).
    """
    from workbench import viz

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
    labels = {r.name: f"{r.arm} ({(r.verdict or {}).get('label', '?')})" for r in results.runs}
    runs = {labels[k]: v for k, v in results.histories().items()}
    fig = viz.training_figure(
        runs,
        viz.EXPERIMENT_PANELS,  # the clean-eval reward the verdicts read first, then the tail mechanism
        title=(
            f"{HEADLINE_SCENARIO}: naive RLOO vs DVP + MIS — seed {seed}, {n} steps"
            + (" (QUICK)" if quick else "")
        ),
    )
    html = viz.save_html(fig, out_dir / "report.html")
    return DemoReport(results=results, html=Path(html), results_json=out_dir / "results.json")
