"""benchmarks/gpu_check.py: its CPU dry run goes through every section the GPU run does, and its budget holds.

The dry run is the real entry point (a subprocess, as the wrapper starts it) at tiny sizes on the CPU:
the JSON must hold every section with status ``ok``, finite numbers for every measured quantity, and the
log what was printed. With no time budget at all every unit of work is skipped with a note, and the
files are still written.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(out: Path, *flags: str) -> dict:
    """Run the script as the wrapper does; return its JSON, with the log under ``"_log"``."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    data["_log"] = (out / "gpu_check.log").read_text()
    return data


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run(tmp_path_factory.mktemp("gpu_check"), "--horizon")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_dry_run_writes_every_section_ok(dry_run: dict) -> None:
    sections = dry_run["sections"]
    assert sorted(sections) == ["env", "fused_head", "horizon", "logprobs", "rloo"]
    assert all(s["status"] == "ok" for s in sections.values()), sections
    assert dry_run["notes"] == []  # nothing skipped: the dry run fits its budget
    env = sections["env"]
    assert env["device"] == "cpu" and env["gpu"] is None
    assert env["torch"] and env["transformers"] and env["workbench"]
    assert _finite(dry_run["elapsed_s"]) and dry_run["elapsed_s"] < dry_run["budget_s"]


def test_dry_run_trains_each_arm_with_finite_metrics(dry_run: dict) -> None:
    rloo = dry_run["sections"]["rloo"]
    steps = dry_run["sizes"]["steps"]
    assert rloo["parameters"] > 0
    assert sorted(rloo["arms"]) == ["dvp_mis", "naive"]
    for arm, result in rloo["arms"].items():
        assert result["config"]["device"] == "cpu" and result["config"]["train_dtype"] == "bf16"
        assert len(result["steps"]) == steps
        for row in result["steps"]:
            assert all(_finite(v) for v in row.values()), (arm, row)
            assert row["perf/step_s"] > 0 and row["mismatch/k3"] >= 0 and row["mismatch/mean_abs_delta"] >= 0
        summary = result["summary"]
        assert all(_finite(v) for v in summary.values()), (arm, summary)
        assert summary["steps"] == steps and summary["peak_mib"] > 0
    # The arms differ in what the config says: naive trains on the full vocabulary, DVP + MIS prunes.
    assert rloo["arms"]["naive"]["config"]["rho"] is None
    assert rloo["arms"]["dvp_mis"]["config"]["rho"] > 0
    rel = rloo["relative"]["dvp_mis"]
    assert rloo["relative_to"] == "naive" and _finite(rel["step_time"]) and _finite(rel["peak_memory"])
    assert "dvp_mis vs naive: step time" in dry_run["_log"]


def test_dry_run_benchmarks_dvp_against_the_unmasked_reference(dry_run: dict) -> None:
    lp = dry_run["sections"]["logprobs"]
    assert sorted(lp["cases"]) == ["bf16", "fp32"]
    for case in lp["cases"].values():
        assert {"dvp", "naive", "unmasked"} <= set(case["methods"])
        for row in case["methods"].values():
            assert row["vocab"] == lp["vocab"]
            assert row["median_s"] > 0 and row["peak_mib"] > 0
        assert case["methods"]["dvp"]["diff_unmasked"] < 1e-4  # DVP with ρ = None is the unmasked reference
        for key in ("dvp_time_vs_unmasked", "dvp_memory_vs_unmasked", "dvp_memory_vs_naive"):
            assert _finite(case[key]) and case[key] > 0
        assert case["dvp_memory_vs_naive"] < 1  # the naive masked version holds full [rows, V] tensors


def test_an_exhausted_budget_skips_every_unit_with_a_note(tmp_path: Path) -> None:
    data = _run(tmp_path, "--budget-s", "0", "--horizon")
    sections = data["sections"]
    assert sections["rloo"]["arms"] == {} and sections["logprobs"]["cases"] == {}
    assert sections["fused_head"]["cases"] == {} and sections["horizon"]["points"] == {}
    assert [n.split(":")[0] for n in data["notes"]] == [
        "logprobs",
        "logprobs",
        "fused_head",
        "fused_head",
        "rloo",
        "horizon",
    ]
    assert all("budget is 0 s" in n for n in data["notes"])
    assert "NOTE rloo: skipped the whole section" in data["_log"]
