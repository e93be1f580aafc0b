"""The horizon study (issue 14): damage against T from saved results, and the direction the data shows.

- :func:`horizon_rows` on hand-made runs: damage paired by seed against the control, pooled across results
  of the same task, T from the control's lengths, per-sequence tail draws and k1; clear errors.
- The QUICK probe on the shipped policies: at T ≈ 60 a naive run draws more tail tokens per sequence and has
  a larger sequence log-ratio than at T ≈ 24 (lessons/LOG.md: 0.35 → 0.83 and 5.8 → 14 over 150 steps).
- ``workbench horizon`` writes the rows and the figure, each extra set in its own line style.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.experiments import ArmResults, RunResult, horizon_rows, sequence_mismatch
from workbench.viz import horizon_figure


def _run(arm: str, seed: int, evals: list[float], length: float, tails: float, k1: float) -> RunResult:
    """A 4-step run with clean evals at steps 1 and 4 (the last quarter holds step 4 only)."""
    history = [
        {
            "eval/reward": e,
            "response/length_mean": length,
            "mismatch/tail_tokens": tails,
            "mismatch/k1": k1,
        }
        for e in (evals[0], math.nan, math.nan, evals[1])
    ]
    return RunResult("floor12", arm, seed, {"prompts_per_step": 2, "k": 2}, history, 1.0)


def _results(runs: list[RunResult], task_kwargs: dict | None = None) -> ArmResults:
    return ArmResults(
        scenario="floor12",
        arms=sorted({r.arm for r in runs}),
        seeds=sorted({r.seed for r in runs}),
        steps=4,
        quick=False,
        runs=runs,
        overrides={} if task_kwargs is None else {"task_kwargs": task_kwargs},
    )


def test_rows_pair_damage_by_seed_and_pool_results_of_one_task() -> None:
    short = _results([_run("control", 0, [0.5, 0.9], 20.0, 0, 0), _run("naive", 0, [0.5, 0.7], 22.0, 4, 0.5)])
    long_s0 = _results(
        [_run("control", 0, [0.5, 0.8], 60.0, 0, 0), _run("naive", 0, [0.5, 0.4], 58.0, 8, 0.5)],
        {"n_problems": 6},
    )
    long_s1 = _results(
        [_run("control", 1, [0.5, 0.9], 62.0, 0, 0), _run("naive", 1, [0.5, 0.3], 62.0, 12, 0.25)],
        {"n_problems": 6},
    )
    rows = horizon_rows([long_s0, short, long_s1])
    assert [(r["T"], r["arm"]) for r in rows] == [(20.0, "naive"), (61.0, "naive")]  # sorted by T
    short_row, long_row = rows
    assert short_row["damage"] == pytest.approx([0.2]) and short_row["damage_sd"] == 0.0
    assert long_row["seeds"] == [0, 1] and long_row["damage"] == pytest.approx([0.4, 0.6])
    assert long_row["damage_mean"] == pytest.approx(0.5) and long_row["damage_sd"] == pytest.approx(
        0.1414, abs=1e-4
    )
    # tail draws per sequence: 4 steps of (8 | 12) draws over 2 × 2 sequences; k1 per sequence: k1 × length
    assert long_row["tail_per_seq"] == pytest.approx((8 / 4 + 12 / 4) / 2)
    assert long_row["k1_per_seq"] == pytest.approx((0.5 * 58 + 0.25 * 62) / 2)
    assert long_row["task_kwargs"] == {"n_problems": 6}


def test_rows_name_what_is_missing() -> None:
    no_control = _results([_run("naive", 0, [0.5, 0.7], 22.0, 4, 0.5)])
    with pytest.raises(ValueError, match=r"no 'control' run; .*--arms naive,dvp_mis,control"):
        horizon_rows([no_control])
    twice = _results([_run("control", 0, [0.5, 0.9], 20.0, 0, 0)])
    with pytest.raises(ValueError, match=r"two runs of control/s0"):
        horizon_rows([twice, twice])
    no_eval = _results(
        [_run("control", 0, [0.5, math.nan], 20.0, 0, 0), _run("naive", 0, [0.5, 0.7], 22.0, 4, 0.5)]
    )
    with pytest.raises(ValueError, match=r"no clean-eval reward in its last quarter"):
        horizon_rows([no_eval])


def test_quick_probe_more_tail_per_sequence_at_the_longer_horizon() -> None:
    """The direction every horizon run showed: tail draws and the sequence log-ratio grow with T."""
    probe = sequence_mismatch(("floor12", "floor12_t64"), steps=2)
    short, long = probe["floor12"], probe["floor12_t64"]
    assert 18 < short["T"] < 26 and 45 < long["T"] < 66
    assert long["tail_per_seq"] > 1.5 * short["tail_per_seq"] > 0
    assert long["k1_per_seq"] > 1.5 * short["k1_per_seq"] > 0


def test_cli_writes_rows_and_figure(tmp_path: Path) -> None:
    runs = [_run("control", 0, [0.5, 0.9], 20.0, 0, 0), _run("naive", 0, [0.5, 0.7], 22.0, 4, 0.5)]
    _results(runs).save(tmp_path / "short")
    assert main(["horizon", str(tmp_path / "short"), "--out", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "horizon.json").read_text())
    assert [r["arm"] for r in data["rows"]] == ["naive"] and data["rows"][0]["damage"] == pytest.approx([0.2])
    assert "plotly" in (tmp_path / "out" / "horizon.html").read_text()


def test_cli_draws_each_extra_set_in_its_own_style_under_the_given_title(tmp_path: Path) -> None:
    """Two extra sets of the same arm must not look alike (they did: both were 'dash')."""
    runs = [_run("control", 0, [0.5, 0.9], 20.0, 0, 0), _run("naive", 0, [0.5, 0.7], 22.0, 4, 0.5)]
    _results(runs).save(tmp_path / "short")
    args = ["horizon", str(tmp_path / "short"), "--out", str(tmp_path / "out"), "--title", "floor, 0.4 M"]
    for label in ("GPU", "int4 KV"):
        args += ["--extra", label, str(tmp_path / "short")]
    assert main(args) == 0
    data = json.loads((tmp_path / "out" / "horizon.json").read_text())
    assert sorted(data["extra"]) == ["GPU", "int4 KV"]
    rows, extra = data["rows"], data["extra"]
    fig = horizon_figure(rows, extra=extra, title="floor, 0.4 M")
    lines = [t for t in fig.data if t.showlegend is not False]
    assert [t.name for t in lines] == ["naive", "naive (GPU)", "naive (int4 KV)"]
    assert len({(t.line.dash, t.marker.symbol) for t in lines}) == 3
    assert len({t.line.color for t in lines}) == 1  # the arm keeps its colour across sets
    assert "floor, 0.4 M" in (tmp_path / "out" / "horizon.html").read_text()


def test_figure_grows_so_a_long_legend_fits() -> None:
    # 16 legend lines overflowed the fixed 400 px figure (the GPU set's last entries were cut off).
    def row(arm: str) -> dict[str, object]:
        return {
            "T": 22.0,
            "arm": arm,
            "damage": [0.1],
            "damage_mean": 0.1,
            "damage_sd": 0.0,
            "tail_per_seq": 0.3,
        }

    few = horizon_figure([row("naive")])
    many = horizon_figure([row(f"arm{i}") for i in range(16)])
    assert few.layout.height == 400
    assert many.layout.height >= 16 * 19 + 100  # every line ≈ 19 px, plus the title and axis margins
