"""benchmarks/bench_fused_head.py: the real entry point on a tiny budget.

Runs ``main`` at a size where the fused head needs several row blocks and vocabulary tiles, and checks what
the report is made of: every method in both modes, fused and unfused agreeing, positive times, and the
fused path's working memory far below the materialised logits' (the memory target the full run checks).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fused_head.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("bench_fused_head", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(SCRIPT.parent))  # as `python benchmarks/…` does: it imports bench_logprobs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(SCRIPT.parent))
        sys.modules.pop(spec.name, None)


def test_smoke_tiny_budget(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--rows", "256", "--hidden", "16", "--vocab", "4096", "--repeats", "1", "--chunk-size", "8"]
    results = bench.main([*argv, "--dtypes", "fp32", "bf16"])
    assert {(r["dtype"], r["mode"], r["method"]) for r in results} == {
        (d, m, k) for d in ("fp32", "bf16") for m in ("fwd", "fwd+bwd") for k in bench.METHODS
    }
    assert all(r["median_s"] > 0 and r["diff_unfused"] < 1e-4 for r in results)
    for dtype in ("fp32", "bf16"):
        for mode in ("fwd", "fwd+bwd"):
            _, _, extra = bench.ratios(results, dtype, mode, "unfused")
            assert extra < 0.5, (dtype, mode, extra)  # 8-row blocks vs 256 rows of logits
    out = capsys.readouterr().out
    assert "fp32 fwd+bwd: fused/unfused time" in out and "≤ 1.3× unfused" in out
    assert "load average" in out


def test_inputs_prune_most_of_the_vocabulary(bench: ModuleType) -> None:
    """The synthetic head is LLM-like: the e^-13 cut keeps a small part of the vocabulary."""
    from workbench.dvp import DEFAULT_RHO, lm_head_token_stats

    h, w, tokens, _ = bench.make_inputs(64, 64, 8192, bench.DTYPES["fp32"], seed=0)
    st = lm_head_token_stats(h, w, tokens, DEFAULT_RHO)
    assert float(st.safe_size.float().mean()) < 0.5 * 8192
    assert float((st.logp > -100).float().mean()) > 0.8  # most sampled tokens are kept
