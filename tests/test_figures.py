"""Experiment figures (notebooks 07, 08, 10): they plot exactly the numbers of the experiment records.

Inputs are the real record types of :mod:`workbench.experiments` (built directly, no training), and
their ``to_dict()`` form, so a renamed field breaks here rather than in a notebook.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest

from workbench.experiments.beyond import Prop55Point
from workbench.experiments.overlap import Overlap
from workbench.experiments.runner import RunResult
from workbench.experiments.signature import Signature
from workbench.experiments.sweep import SweepResults, rho_label
from workbench.viz.figures import (
    EXPERIMENT_PANELS,
    overlap_figure,
    prop55_figure,
    save_figure,
    signature_figure,
    sweep_figure,
    training_figure,
    update_training_figure,
)


def _run(rho: float | None, seed: int, reward: float, k3: float) -> RunResult:
    rows = [
        {
            "step": float(i + 1),
            "reward/mean": reward,
            "mismatch/k3": k3,
            "mismatch/k1": k3 / 2,
            "dvp/one_minus_z_mean": 0.0 if rho is None else rho,
            "mismatch/tail_tokens": 1.0 if rho is None else 0.0,
        }
        for i in range(8)
    ]
    return RunResult("floor", "dvp_mis", seed, {"rho": rho}, rows, 1.0)


def test_sweep_figure_plots_the_sweep_points_in_grid_order() -> None:
    rhos = [1e-2, None, math.exp(-13)]  # any order: the figure sorts largest ρ first, none last
    res = SweepResults("floor", rhos, [0, 1], 8)
    for rho, rewards, k3 in (
        (1e-2, (0.2, 0.4), 1e-4),
        (math.exp(-13), (0.6, 0.6), 1e-4),
        (None, (0.1, 0.3), 1e-1),
    ):
        res.runs[rho_label(rho)] = [_run(rho, s, r, k3) for s, r in enumerate(rewards)]
    points = res.points()
    assert [p["label"] for p in points] == ["1e-02", "e^-13", "none"]  # ρ order, whatever the grid's order
    fig = sweep_figure(points, title="t")
    reward, k3, pruned, tails = fig.data
    assert list(reward.x) == ["1e-02", "e^-13", "none"]
    assert list(reward.y) == pytest.approx([0.3, 0.6, 0.2])
    assert list(reward.error_y.array) == pytest.approx([math.sqrt(0.02), 0.0, math.sqrt(0.02)])
    assert list(k3.y) == pytest.approx([1e-4, 1e-4, 1e-1])
    assert pruned.y[:2] == pytest.approx((1e-2, math.exp(-13))) and pruned.y[2] is None  # 0 on a log axis
    assert list(tails.y) == [None, None, 8.0]
    assert fig.layout.yaxis2.type == "log" and fig.layout.title.text == "t"


def _signature(engine: str, shift: float) -> Signature:
    bins = [
        {"lo": 0.0, "hi": 1e-3, "count": 10, "mean_delta": 0.5 + shift, "mean_abs_delta": 0.6, "frac_positive": 0.8},
        {"lo": 1e-3, "hi": 0.5, "count": 0, "mean_delta": math.nan, "mean_abs_delta": math.nan, "frac_positive": math.nan},
        {"lo": 0.5, "hi": 1.0, "count": 90, "mean_delta": -0.001, "mean_abs_delta": 0.002, "frac_positive": 0.4},
    ]  # fmt: skip
    deltas = [(math.log(1e-4), 0.7), (math.log(0.9), -0.001), (math.log(0.99), 0.0)]
    return Signature(engine, 4, 100, bins, {}, {}, {}, 0.01, 0.001, deltas)


def test_signature_figure_signed_means_per_non_empty_bin_and_scatter() -> None:
    sigs = [_signature("bf16 + none", 0.0), _signature("bf16 + floor:13.5", 1.0)]
    fig = signature_figure(sigs, max_points=2)
    assert len(fig.data) == 4
    bins0, scatter0, bins1, _ = fig.data
    assert bins0.name == "bf16 + none" and bins1.name == "bf16 + floor:13.5"
    assert list(bins0.y) == pytest.approx([0.5, -0.001])  # empty bin dropped, sign kept
    assert list(bins1.y) == pytest.approx([1.5, -0.001])
    assert list(scatter0.x) == pytest.approx([-4.0, math.log10(0.9)]) and list(scatter0.y) == [0.7, -0.001]
    # The to_dict() form plots the same numbers; a mapping names the engines.
    fig2 = signature_figure({"A": sigs[0].to_dict()})
    assert fig2.data[0].name == "A" and list(fig2.data[0].y) == list(bins0.y)


def test_overlap_figure_bars_and_log_boundary_rate() -> None:
    ov = [
        Overlap("bf16 + none", 1e-4, 8, 100, 1.0, 1.0, 1.0, 1.0, 0, 0.0, 3.0, 3.0),
        Overlap("bf16 + floor:12", 1e-4, 8, 100, 0.98, 0.5, 0.9, 0.2, 5, 0.05, 3.0, 900.0),
    ]
    fig = overlap_figure(ov)
    trainer, engine, exact, boundary = fig.data
    assert list(trainer.x) == ["bf16 + none", "bf16 + floor:12"]
    assert list(trainer.y) == [1.0, 0.98] and list(engine.y) == [1.0, 0.2] and list(exact.y) == [1.0, 0.9]
    assert list(boundary.y) == [None, 0.05]
    assert overlap_figure([o.to_dict() for o in ov]).data[3].y == boundary.y


def test_prop55_figure_sorted_by_rho_with_abs_gap() -> None:
    pts = [
        Prop55Point(1e-2, 24, 100, 0.01, 0.05, 1.2, 0.2, -0.03, 0.01),
        Prop55Point(1e-6, 24, 100, 0.0, 0.0, 0.0, 0.0, 0.01, 0.01),
    ]
    bound, tv, gap, mean = prop55_figure(pts).data
    assert list(bound.x) == [1e-6, 1e-2]
    assert list(bound.y) == [None, 1.2] and list(tv.y) == [None, 0.2]
    assert list(gap.y) == pytest.approx([0.01, 0.03]) and list(gap.error_y.array) == pytest.approx(
        [0.02, 0.02]
    )
    assert list(mean.y) == [None, 0.01]


@pytest.mark.parametrize("fn", [sweep_figure, signature_figure, overlap_figure, prop55_figure])
def test_empty_inputs_raise_a_clear_error(fn: object) -> None:
    with pytest.raises(ValueError, match="empty"):
        fn([])  # type: ignore[operator]


def test_missing_field_names_the_field() -> None:
    with pytest.raises(ValueError, match="reward_final_mean"):
        sweep_figure([{"label": "x"}])


def test_training_figure_update_roundtrip() -> None:
    runs = {"a": [{"step": 1.0, "reward/mean": 0.5}], "b": []}
    fig = training_figure(runs, widget=False)
    assert isinstance(fig, go.Figure) and len(fig.data) == 2 * 6
    assert all(t.connectgaps for t in fig.data)  # sparse metrics (eval every 10 steps) still draw lines
    runs["b"] = [{"step": 1.0, "reward/mean": 0.1}, {"step": 2.0, "reward/mean": 0.2}]
    update_training_figure(fig, runs)
    assert list(fig.data[6].y) == [0.1, 0.2] and list(fig.data[7].y) == [None, None]  # missing key → gaps


def test_training_figure_groups_share_a_colour_and_one_legend_entry() -> None:
    runs = {"naive/s0": [], "naive/s1": [], "dvp_mis/s0": []}
    groups = {"naive/s0": "naive", "naive/s1": "naive", "dvp_mis/s0": "dvp_mis"}
    fig = training_figure(runs, EXPERIMENT_PANELS, groups=groups)
    n = len(EXPERIMENT_PANELS)
    naive0, naive1, dvp = fig.data[0], fig.data[n], fig.data[2 * n]
    assert naive0.line.color == naive1.line.color != dvp.line.color
    assert naive0.name == naive1.name == "naive" and dvp.name == "dvp_mis"
    assert [t.name for t in fig.data if t.showlegend] == ["naive", "dvp_mis"]


def test_save_figure_writes_html_atomically_and_rejects_unknown_suffixes(tmp_path) -> None:
    fig = training_figure({"a": [{"step": 1.0, "reward/mean": 0.5}]})
    out = save_figure(fig, tmp_path / "sub" / "r.html")
    assert out.read_text().rstrip().endswith("</html>") and list(out.parent.iterdir()) == [
        out
    ]  # no temp left
    with pytest.raises(ValueError, match=r"\.html or one of"):
        save_figure(fig, tmp_path / "r.txt")


def test_report_command_plots_an_experiment_results_file_one_colour_per_arm(tmp_path) -> None:
    from workbench.cli import main
    from workbench.experiments.runner import ArmResults

    res = ArmResults(
        "floor", ["dvp_mis"], [0, 1], 8, True, runs=[_run(None, 0, 0.5, 0.1), _run(None, 1, 0.6, 0.2)]
    )
    res.save(tmp_path / "exp")
    assert main(["report", str(tmp_path / "exp" / "results.json"), "--out", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "clean-engine eval reward" in html and "seeds [0, 1]" in html
    assert main(["report", str(tmp_path / "exp" / "results.json"), "--out", str(tmp_path / "r.txt")]) == 2


def test_save_figure_exports_an_svg_through_kaleido(tmp_path) -> None:
    import shutil

    pytest.importorskip("kaleido", reason="static export needs kaleido (pip install -e '.[browser]')")
    if not any(shutil.which(b) for b in ("chromium", "google-chrome", "chrome")):
        pytest.skip("kaleido needs a Chrome/Chromium binary (Debian: apt-get install chromium)")
    fig = training_figure({"naive/s0": [{"step": 1.0, "eval/reward": 0.9}]}, EXPERIMENT_PANELS, title="t")
    out = save_figure(fig, tmp_path / "h.svg")
    svg = out.read_text()
    assert svg.startswith("<svg") and 'width="1100"' in svg and "clean-engine eval reward" in svg


def test_sweep_figure_adds_the_clean_eval_reward_when_measured() -> None:
    pts = [
        {
            "rho": r,
            "label": rho_label(r),
            "reward_final_mean": 0.5,
            "reward_final_std": 0.0,
            "k3_final_mean": 1e-3,
            "one_minus_z_final_mean": 1e-4,
            "tail_draws_mean": 1.0,
            "eval_final_mean": e,
            "eval_final_std": 0.01,
        }
        for r, e in ((1e-2, 0.9), (None, 0.8))
    ]
    fig = sweep_figure(pts)
    assert fig.data[-1].name == "final clean-eval reward" and fig.data[-1].y == (0.9, 0.8)
    no_eval = [{k: v for k, v in p.items() if not k.startswith("eval")} for p in pts]
    assert len(sweep_figure(no_eval).data) == len(fig.data) - 1


def test_sweep_points_take_the_last_measured_clean_eval_reward() -> None:
    res = SweepResults("floor", [1e-2, 1e-4, None], [0, 1], 8)
    for rho, evals in ((1e-2, (0.5, 0.5)), (1e-4, (0.9, 0.7)), (None, (0.5, 0.5))):
        runs = []
        for s, e in enumerate(evals):
            run = _run(rho, s, 0.5, 1e-3)
            run.history[4]["eval/reward"], run.history[7]["eval/reward"] = 0.1, e  # eval every few steps
            runs.append(run)
        res.runs[rho_label(rho)] = runs
    pts = {p["label"]: p for p in res.points()}
    assert pts["1e-04"]["eval_final_mean"] == pytest.approx(0.8) and pts["none"]["eval_final_mean"] == 0.5
    assert pts["1e-04"]["eval_final_std"] == pytest.approx(math.sqrt(0.02))
    assert res.to_dict()["u_shape_eval"]["best"] == "1e-04"  # the sampled reward is flat: no best there


def test_load_sweep_round_trips_the_runs_and_recomputes_the_points(tmp_path) -> None:
    from workbench.experiments.sweep import load_sweep

    res = SweepResults("floor", [None, 1e-2], [0, 1], 8, command="cmd")
    for rho, reward in ((1e-2, 0.7), (None, 0.4)):
        res.runs[rho_label(rho)] = [_run(rho, s, reward + 0.1 * s, 1e-3) for s in (0, 1)]
    res.save(str(tmp_path))
    back = load_sweep(tmp_path)
    assert back.command == "cmd" and back.steps == 8 and list(back.runs) == list(res.runs)
    for a, b in zip(back.points(), res.points(), strict=True):
        assert a["label"] == b["label"] and a["reward_final_mean"] == pytest.approx(b["reward_final_mean"])
    with pytest.raises(ValueError, match="run the experiment first"):
        load_sweep(tmp_path / "missing")
