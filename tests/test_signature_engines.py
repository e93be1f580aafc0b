"""The paper's checks 1 and 2 with either engine: the emulating TorchEngine (its logits recorded) or a built
engine whose logits are not seen — real vLLM — where Δ, k1/k3 and boundary tokens are still measured and the
engine-side quantities (envelope, overlap) are left empty, and every record names the engine that made it."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from workbench.engines import TorchEngine, make_perturbation
from workbench.experiments.overlap import measure_overlap
from workbench.experiments.signature import engine_label, measure_signature
from workbench.models import TinyModelConfig, build_tiny_model, build_tokenizer
from workbench.tasks import make_task

KW = {"n_trajectories": 64, "k": 4, "batch_prompts": 8, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def fresh() -> tuple[torch.nn.Module, Any, Any]:
    """A random-init policy (head_dim 32, so vLLM's CPU build serves it): it samples low-p tokens often."""
    tok = build_tokenizer(512)
    model = build_tiny_model(TinyModelConfig(vocab_size=512, hidden_size=64, num_layers=1), tok)
    return model, tok, make_task("addition", digits=2)


def test_engine_label_names_the_real_engine_apart_from_the_emulation() -> None:
    assert engine_label("torch", "fp16") == "TorchEngine fp16 (emulated)"
    assert engine_label("vllm", "bf16") in ("vLLM bf16 (CPU build)", "vLLM bf16 (CUDA)")
    with pytest.raises(ValueError, match="engine='sglang'"):
        engine_label("sglang")


def test_a_built_engine_measures_the_same_tokens_without_its_logits(fresh: Any) -> None:
    """Passing a built engine (as a notebook shares one vLLM) samples exactly what the named engine samples;
    only what needs the engine's logits — Prop 4.2's envelope, the safe-set overlap — is left empty."""
    model, tok, task = fresh

    def built() -> TorchEngine:
        return TorchEngine(
            model,
            dtype="fp32",
            perturbation=make_perturbation("gaussian:1.0"),
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )

    named = measure_signature(model, tok, task, engine_dtype="fp32", perturbation="gaussian:1.0", **KW)
    shared = measure_signature(model, tok, task, engine=built(), engine_dtype="fp32", **KW)
    assert shared.n_tokens == named.n_tokens and shared.k1 == pytest.approx(named.k1)
    assert shared.engine == "TorchEngine fp32 + gaussian:1 (emulated)"  # named from the built engine
    assert [b["count"] for b in shared.bins] == [b["count"] for b in named.bins]
    assert named.envelope["frac_within_exact"] == 1.0
    assert shared.envelope["count"] == 0 and math.isnan(shared.envelope["frac_within_exact"])

    rec = measure_overlap(model, tok, task, engine_dtype="fp32", perturbation="gaussian:1.0", rho=0.5, **KW)
    blind = measure_overlap(model, tok, task, engine=built(), engine_dtype="fp32", rho=0.5, **KW)
    assert rec.boundary_tokens > 0 and rec.overlap_mean < 1.0
    assert (blind.boundary_tokens, blind.n_positions) == (rec.boundary_tokens, rec.n_positions)
    assert blind.safe_size_trainer == pytest.approx(rec.safe_size_trainer)
    assert all(math.isnan(v) for v in (blind.overlap_mean, blind.reverse_mean, blind.safe_size_engine))


@pytest.mark.vllm
def test_real_vllm_signature_and_overlap_share_one_engine(fresh: Any) -> None:
    """Real vLLM at fp32 through both checks on one engine: it agrees with the trainer to float rounding in
    every probability bin, and at the same ρ it samples no token the trainer prunes."""
    from workbench.engines import make_engine

    model, tok, task = fresh
    real = make_engine("vllm", model, tok, dtype="fp32")
    sig = measure_signature(model, tok, task, engine=real, **KW)
    assert sig.engine in ("vLLM fp32 (CPU build)", "vLLM fp32 (CUDA)")
    assert sig.n_tokens > 100 and abs(sig.k1) < 1e-5
    assert all(b["mean_abs_delta"] < 1e-4 for b in sig.bins if b["count"] > 0)
    # A random policy samples its tail (p ≈ 1/512): the agreement holds where mismatch lives, not just at p → 1.
    assert sum(b["count"] for b in sig.bins if b["hi"] <= 1e-2) > 100
    ov = measure_overlap(model, tok, task, engine=real, rho=0.5, **KW)
    assert ov.engine == sig.engine and ov.n_positions > 100
    assert ov.boundary_tokens == 0 and ov.safe_size_trainer < 512
    assert math.isnan(ov.overlap_mean)
