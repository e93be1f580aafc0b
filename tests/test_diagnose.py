"""``workbench diagnose``: its figures against the existing signature / overlap / Prop 5.5 code on the same
samples, the bad-input errors (raised before any sampling), the files it writes, and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from workbench import dvp, metrics, models
from workbench.cli import main
from workbench.experiments import diagnose
from workbench.experiments.diagnose import DiagnoseConfig, run_diagnosis
from workbench.experiments.signature import measure_signature, probe_batches
from workbench.tasks import make_task
from workbench.theory.prop55 import bias_bound

SIZES = {"samples": 64, "k": 4, "batch_prompts": 8, "max_new_tokens": 6}
#: The same sampling, in the keywords of probe_batches / measure_signature.
PROBE = {
    "engine_dtype": "fp32",
    "perturbation": "gaussian:0.5",
    "n_trajectories": SIZES["samples"],
    "k": SIZES["k"],
    "batch_prompts": SIZES["batch_prompts"],
    "max_new_tokens": SIZES["max_new_tokens"],
}
#: Large ρ as well: the random-init policy is so flat that ρ ≤ 1e-2 prunes nothing of it.
RHOS = (math.exp(-13), 1e-2, 0.2, 0.5)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init policy on 2,048 ids: it spreads its mass, so tail tokens are sampled often."""
    tok = models.build_tokenizer(2048)
    model = models.build_tiny_model(
        models.TinyModelConfig(vocab_size=2048, hidden_size=32, num_layers=1, num_heads=2), tok
    )
    return models.save_policy(model, tok, tmp_path_factory.mktemp("policy") / "tiny")


@pytest.fixture(scope="module")
def noisy(policy_dir: Path) -> diagnose.Diagnosis:
    cfg = DiagnoseConfig(
        model=str(policy_dir),
        task="addition",
        engine_dtype="fp32",
        perturbation="gaussian:0.5",
        rhos=RHOS,
        **SIZES,
    )
    return run_diagnosis(cfg)


def test_figures_equal_measure_signature_on_the_same_samples(policy_dir: Path, noisy: Any) -> None:
    model, tok = models.resolve_policy(str(policy_dir))
    sig = measure_signature(model, tok, make_task("addition"), **PROBE)
    assert (noisy.n_trajectories, noisy.n_tokens) == (sig.n_trajectories, sig.n_tokens)
    for ours, theirs in zip(noisy.bins, sig.bins):
        for key in ("lo", "hi", "count", "mean_delta", "mean_abs_delta", "frac_positive"):
            assert ours[key] == pytest.approx(theirs[key], nan_ok=True), key
    lowp = noisy.tail["lowp"]
    assert lowp["count"] == sig.lowp["count"] > 100
    assert lowp["mean"] == pytest.approx(sig.lowp["delta_mean"])
    assert (lowp["mean_ci_lo"], lowp["mean_ci_hi"]) == pytest.approx(
        (sig.lowp["delta_ci_lo"], sig.lowp["delta_ci_hi"])
    )
    assert noisy.tail["e13"]["count"] == sig.tail["count"]
    assert noisy.envelope["measured"] == pytest.approx(sig.envelope)
    assert noisy.naive["k1"] == pytest.approx(sig.k1) and noisy.naive["k3"] == pytest.approx(sig.k3)


def test_the_positive_mode_of_prop43_is_found(noisy: Any) -> None:
    # Gaussian logit noise σ = 0.5 on a flat policy: sampled tail tokens have mean Δ ≈ σ²/2 = 0.125 > 0
    # (THEORY.md, Prop 4.3); the mode (≈ σ²) is reported with its bootstrap interval.
    lowp = noisy.tail["lowp"]
    assert lowp["mean_ci_lo"] > 0 and 0.05 < lowp["mean"] < 0.3
    assert lowp["mode_ci_lo"] <= lowp["mode"] <= lowp["mode_ci_hi"] and -0.5 < lowp["mode"] < 1.0
    # and every per-bin extra is consistent with the bin's own numbers
    for b in noisy.bins:
        if b["count"] >= 2:
            assert b["ci_lo"] <= b["mean_delta"] <= b["ci_hi"]
            assert b["mean_abs_delta"] <= b["max_abs_delta"]


def test_rho_sweep_equals_reference_overlap_z_and_prop55_on_the_same_samples(
    policy_dir: Path, noisy: Any
) -> None:
    # Recompute every sweep figure on the very same batches with the naive reference implementations.
    model, tok = models.resolve_policy(str(policy_dir))
    batches = list(probe_batches(model, tok, make_task("addition"), **PROBE))
    assert [r["rho"] for r in noisy.rho_sweep] == sorted(RHOS, reverse=True)
    for row in noisy.rho_sweep:
        rho = row["rho"]
        omz, overlap, outside, boundary = [], [], [], []
        for b in batches:
            m, tokens = b.rollout.mask, b.rollout.tokens
            omz.append(1 - dvp.retained_mass_reference(b.logits_train, rho).double()[m])
            safe_t = dvp.safe_mask_reference(b.logits_train, rho)  # (N, T, V)
            safe_e = dvp.safe_mask_reference(b.logits_engine, rho)
            overlap.append(((safe_t & safe_e).sum(-1) / safe_t.sum(-1)).double()[m])
            out_t = ~safe_t.gather(-1, tokens[..., None]).squeeze(-1)
            in_e = safe_e.gather(-1, tokens[..., None]).squeeze(-1)
            outside.append(out_t[m])
            boundary.append((out_t & in_e)[m])
        omz_all = torch.cat(omz)
        assert row["one_minus_z_max"] == pytest.approx(float(omz_all.max()), abs=1e-6)
        assert row["bias_bound"] == pytest.approx(bias_bound(max(0.0, float(omz_all.max())), 6), abs=1e-5)
        assert row["overlap_mean"] == pytest.approx(float(torch.cat(overlap).mean()))
        assert row["outside_rate"] == pytest.approx(float(torch.cat(outside).double().mean()))
        assert row["boundary_rate"] == pytest.approx(float(torch.cat(boundary).double().mean()))
    # a smaller ρ keeps more of the vocabulary: the pruned mass and the bound only shrink along the sweep
    bounds = [r["bias_bound"] for r in noisy.rho_sweep]
    assert bounds == sorted(bounds, reverse=True) and bounds[0] > 0
    big = noisy.rho_sweep[0]  # ρ = 0.5 prunes sampled tokens, and the noisy engine's safe sets differ
    assert big["outside_rate"] > 0 and 0 < big["mismatch_removed"] <= 1 and big["overlap_mean"] < 1


def test_recommendation_is_the_largest_rho_within_the_bias_tolerance(noisy: Any) -> None:
    ok = [r["rho"] for r in noisy.rho_sweep if r["bias_bound"] <= 0.05]
    assert noisy.recommendation["rho"] == max(ok)
    assert f"{max(ok):.3g}" in noisy.recommendation["reason"]


def test_sequence_log_ratio_is_the_sum_of_token_deltas(noisy: Any) -> None:
    rows = noisy.sequence["by_length"]
    assert sum(r["count"] for r in rows) == noisy.n_trajectories
    assert all(1 <= r["length"] <= 6 for r in rows)
    # Σ over responses of S(y) = Σ over tokens of Δ = n_tokens · k1
    total = sum(r["count"] * r["mean_log_ratio"] for r in rows)
    assert total == pytest.approx(noisy.n_tokens * noisy.naive["k1"], rel=1e-6, abs=1e-9)


def test_batch_invariance_is_measured_on_the_engine_weights(noisy: Any) -> None:
    inv = noisy.batch_invariance
    assert inv["available"] and inv["rows"] == 8 and inv["batch_size"] == 32
    assert sum(b["count"] for b in inv["bins"]) == inv["n_tokens"]
    assert 0 <= inv["max_abs_diff"] < 1e-3  # fp32: padding and batch shape change only the rounding


def test_mean_ci_and_kde_mode() -> None:
    x = torch.tensor([0.3, -0.1, 0.7, 0.2, 0.25])
    mean, lo, hi = metrics.mean_ci(x)
    x64 = x.double()
    tail = metrics.sampled_tail_delta(torch.zeros_like(x64) - 10, x64 - 10, torch.ones(5, dtype=torch.bool))
    assert (mean, lo, hi) == pytest.approx(
        (
            tail["mismatch/lowp_delta_mean"],
            tail["mismatch/lowp_delta_ci_lo"],
            tail["mismatch/lowp_delta_ci_hi"],
        )
    )
    assert all(math.isnan(v) for v in metrics.mean_ci(torch.tensor([]))) and math.isnan(
        metrics.mean_ci(x[:1])[1]
    )
    # A skewed sample: the mode sits at the peak, well below the mean.
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # Gamma has no generator argument: seed the global RNG locally
        torch.manual_seed(0)
        skewed = torch.distributions.Gamma(2.0, 1.0).sample((4000,))  # mode 1, mean 2
    # The KDE mode of 4,000 draws lands within ±0.3 of 1 (0.95–1.28 over seeds 0–4): near the peak, far from the mean.
    assert metrics.kde_mode(skewed) == pytest.approx(1.0, abs=0.35) and metrics.kde_mode(skewed) < 1.6
    mode, lo, hi = metrics.mode_ci(skewed[:400], gen)
    assert lo <= mode <= hi and hi < 2.0
    assert (
        math.isnan(metrics.kde_mode(torch.tensor([]))) and metrics.kde_mode(torch.tensor([3.0, 3.0])) == 3.0
    )


# ------------------------------------------------------------------ the command and its bad inputs


@pytest.fixture
def no_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("sampling started before the input was checked")

    monkeypatch.setattr(diagnose, "probe_batches", refuse)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model", "no_such_policy"], ["no_such_policy", "multiadd"]),
        (["--model", "multiadd", "--engine-dtype", "int3"], ["engine_dtype='int3'", "fp32", "bf16"]),
        (["--model", "multiadd", "--rhos", "1e-2,0"], ["rhos", "0.0", "(0, 1]"]),
        (["--model", "multiadd", "--rhos", "1.5"], ["1.5", "(0, 1]"]),
        (["--model", "multiadd", "--engine", "tpu"], ["engine='tpu'", "'torch' or 'vllm'"]),
        (["--model", "multiadd", "--samples", "0"], ["samples=0", ">= 1"]),
        (["--model", "multiadd", "--prompts", "missing.jsonl"], ["missing.jsonl", "no such file"]),
    ],
)
def test_bad_input_is_a_clear_error_before_sampling(
    flags: list[str],
    expected: list[str],
    tmp_path: Path,
    no_sampling: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "d"
    assert main(["diagnose", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(e in err for e in expected), err
    assert not out.exists()


def test_malformed_prompts_file_names_the_line(tmp_path: Path, no_sampling: None, capsys: Any) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": oops}\n')
    assert (
        main(["diagnose", "--model", "multiadd", "--prompts", str(prompts), "--out", str(tmp_path / "d")])
        == 2
    )
    assert f"{prompts}:2: invalid JSON" in capsys.readouterr().err


def test_a_non_empty_out_dir_needs_force(tmp_path: Path, no_sampling: None, capsys: Any) -> None:
    (tmp_path / "keep.txt").write_text("x")
    assert main(["diagnose", "--model", "multiadd", "--out", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_vllm_that_cannot_run_is_reported_before_sampling(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_sampling: None, capsys: Any
) -> None:
    import workbench.engines.vllm_engine as vllm_engine

    monkeypatch.setattr(vllm_engine, "vllm_unavailable_reason", lambda: "vllm is not installed")
    assert main(["diagnose", "--model", "multiadd", "--engine", "vllm", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "--engine vllm cannot run here: vllm is not installed" in err and "--engine torch" in err


def test_the_command_writes_json_and_report(policy_dir: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "d"
    flags = ["--model", str(policy_dir), "--task", "addition", "--samples", "16", "--max-new-tokens", "4"]
    assert main(["diagnose", *flags, "--rhos", "1e-2,1e-4", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["diagnosis.json", "report.html"]  # no temp file left
    data = json.loads((out / "diagnosis.json").read_text())
    assert data["seed"] == 0 and data["config"]["rhos"] == [1e-2, 1e-4] and data["config"]["samples"] == 16
    assert {"python", "torch", "transformers", "workbench"} <= set(data["versions"])
    page = (out / "report.html").read_text()
    assert "Recommended ρ" in page and "plotly" in page and data["recommendation"]["reason"][:30] in page
    assert "recommended ρ" in capsys.readouterr().out
    # a second run into the same directory needs --force, and then replaces both files
    assert main(["diagnose", *flags, "--out", str(out)]) == 2
    assert main(["diagnose", *flags, "--seed", "1", "--force", "--out", str(out)]) == 0
    assert json.loads((out / "diagnosis.json").read_text())["seed"] == 1


def test_the_report_module_reads_data_only() -> None:
    source = Path(diagnose.__file__).parent.parent.joinpath("viz", "diagnose_report.py").read_text()
    assert "workbench.experiments" not in source and "workbench.engines" not in source


@pytest.mark.vllm
def test_diagnose_runs_on_the_real_vllm_engine(tmp_path: Path) -> None:
    res = run_diagnosis(
        DiagnoseConfig(model="multiadd", engine="vllm", engine_dtype="fp32", samples=16, rhos=(1e-2,)),
        tmp_path,
    )
    assert (
        res.versions["vllm"] and res.envelope["measured"] is None and res.rho_sweep[0]["overlap_mean"] is None
    )
    assert res.naive["mean_abs_delta"] < 1e-4  # fp32 vLLM reproduces the fp32 trainer
    assert not res.batch_invariance["available"]
