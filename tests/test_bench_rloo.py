"""benchmarks/bench_rloo.py: the real entry point on a tiny budget, and its tokens/s arithmetic.

The smoke test runs ``main(["--quick", ...])`` — both trainers for real (ours, then TRL's ``RLOOTrainer``
on CPU) — and checks what the report is made of: per-step times with the warm-up dropped, response-token
counts that can only be response tokens, a positive tokens/s on both sides and their ratio.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("trl", reason="TRL is not installed: pip install -e '.[bench]'")
pytest.importorskip("datasets", reason="datasets (a TRL dependency) is not installed")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rloo.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("bench_rloo", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_side_result_rates_are_mean_tokens_over_median_time(bench: ModuleType) -> None:
    r = bench.SideResult("x", step_s=[0.5, 0.1, 0.2, 9.0], tokens=[40, 60, 50, 50], threads=1)
    assert r.median_step_s == pytest.approx(0.35)  # a 9 s outlier step does not move it
    assert r.tokens_per_step == pytest.approx(50.0)
    assert r.tokens_per_s == pytest.approx(50.0 / 0.35)
    d = r.to_dict()
    assert d["tokens_per_s"] == pytest.approx(r.tokens_per_s) and d["step_s"] == r.step_s


def test_peak_rss_reset_tracks_a_new_allocation(bench: ModuleType) -> None:
    if not bench._reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    base = bench._peak_rss_mib()
    block = bytearray(64 * 2**20)  # 64 MiB, touched by the zero fill
    grown = bench._peak_rss_mib()
    del block
    assert grown - base >= 48, (base, grown)


def test_quick_run_reports_both_sides_and_their_ratio(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "bench.json"
    assert bench.main(["--quick", "--threads", "1", "--json", str(out_file)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out_file.read_text())

    cfg = bench.QUICK
    n_seq = cfg["prompts"] * cfg["k"]
    max_new = 4  # addition, 2 digits: up to 3 answer characters + eos
    sides = ("ours", "trl") if "ours_vllm" not in data["results"] else ("ours", "trl", "ours_vllm")
    assert set(data["results"]) == set(sides)
    for side in sides:
        r = data["results"][side]
        assert len(r["step_s"]) == len(r["tokens"]) == cfg["steps"] * cfg["rounds"]  # warm-up dropped
        assert all(t > 0 for t in r["step_s"])
        # Response tokens only: every sequence has at least its eos, none more than max_new tokens
        # (prompt tokens — 4 to 6 per sequence — would push the count past n_seq * max_new).
        assert all(n_seq <= n <= n_seq * max_new for n in r["tokens"]), r["tokens"]
        assert r["tokens_per_s"] == pytest.approx(
            statistics.fmean(r["tokens"]) / statistics.median(r["step_s"])
        )
        assert r["tokens_per_s"] > 0
        assert r["threads"] == 1
        assert r["memory"]["peak_rss_mib"] >= r["memory"]["rss_start_mib"] > 0
    ratio = data["results"]["ours"]["tokens_per_s"] / data["results"]["trl"]["tokens_per_s"]
    assert data["ratio"] == pytest.approx(ratio)
    assert f"ours / TRL: {data['ratio']:.2f}× tokens/s" in printed
    assert any(line.startswith("ours ") for line in printed.splitlines())
    assert any(line.startswith("TRL ") for line in printed.splitlines())
    if "ours_vllm" in data["results"]:  # real vLLM installed (make test): our trainer timed on it too
        vllm_ratio = data["results"]["ours_vllm"]["tokens_per_s"] / data["results"]["ours"]["tokens_per_s"]
        assert data["vllm_ratio"] == pytest.approx(vllm_ratio)
        assert f"ours with vLLM / ours with TorchEngine: {vllm_ratio:.2f}× tokens/s" in printed
