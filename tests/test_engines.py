"""TorchEngine: the rollout layout, agreement with the trainer's forward, precision mismatch, min-p,
eos, seeding, weight sync, and the fast paths (lean decode loop, sampler) against naive references."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
import transformers

from workbench.dvp import safe_mask, token_logprobs
from workbench.engines import (
    GaussianLogitNoise,
    ProbabilityFloor,
    Rollout,
    RolloutEngine,
    TailInflation,
    TorchEngine,
    left_pad,
    make_perturbation,
    position_ids,
)
from workbench.engines.sampling import (
    processed_logprobs,
    sample_categorical,
    sample_categorical_reference,
    sample_step,
)
from workbench.models import TinyModelConfig, build_tiny_model

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 4, 4, 4, 4, 4, 4, 4, 4, 11], [1, 20, 21]]
VOCAB = 256


def _model(family: str = "qwen2", sharpen: float = 1.0, seed: int = 0) -> transformers.PreTrainedModel:
    model = build_tiny_model(
        TinyModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, family=family, seed=seed)
    )
    if sharpen != 1.0:  # scale the final norm: logits spread over several nats (random init is ~flat)
        with torch.no_grad():
            model.model.norm.weight.mul_(sharpen)
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> object:
    """These models are tiny: a second intra-op thread only adds sync cost (10× on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> transformers.PreTrainedModel:
    return _model()


@pytest.fixture(scope="module")
def sharp() -> transformers.PreTrainedModel:
    return _model(sharpen=8.0)


def _trainer_logits(model: torch.nn.Module, r: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """The trainer's view: one full forward over the rollout, same position-id rule. (N, T, V)."""
    with torch.no_grad():
        out = model(
            input_ids=r.sequences,
            attention_mask=r.attention_mask,
            position_ids=position_ids(r.attention_mask),
        )
    return out.logits[:, r.prompt_len - 1 : -1].float() / temperature


def _delta(model: torch.nn.Module, r: Rollout, rho: float | None, temperature: float = 1.0) -> torch.Tensor:
    """Δ = log μ − log π on valid sampled tokens, π from the trainer's full forward."""
    with torch.no_grad():
        out = model(
            input_ids=r.sequences,
            attention_mask=r.attention_mask,
            position_ids=position_ids(r.attention_mask),
        )
    logits = out.logits[:, r.prompt_len - 1 : -1]  # (N, T, V)
    lp = token_logprobs(logits, r.tokens, rho, temperature=temperature)
    return (r.logprobs - lp)[r.mask]


def _engine(model: torch.nn.Module, **kw: object) -> TorchEngine:
    kw.setdefault("eos_token_id", 2)
    kw.setdefault("pad_token_id", 0)
    return TorchEngine(model, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- agreement with the trainer
@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("backend", ["lean", "hf"])
@pytest.mark.parametrize(("rho", "temperature"), [(None, 1.0), (1e-3, 0.7)])
def test_fp32_engine_matches_the_trainers_full_forward(
    family: str, backend: str, rho: float | None, temperature: float
) -> None:
    model = _model(family, sharpen=8.0)
    r = _engine(model, backend=backend).generate(
        PROMPTS, n=3, max_tokens=12, rho=rho, temperature=temperature, seed=1
    )
    delta = _delta(model, r, rho, temperature)
    assert delta.numel() > 50
    assert delta.abs().max().item() < 1e-5


def test_lean_and_hf_backends_draw_the_same_tokens(model: torch.nn.Module) -> None:
    for spec in (None, "kvquant:4", "gaussian:0.5+floor:6"):
        p = make_perturbation(spec)
        kw = dict(n=2, max_tokens=10, rho=1e-2, temperature=0.9, seed=3)
        a = _engine(model, backend="lean", perturbation=p).generate(PROMPTS, **kw)
        b = _engine(model, backend="hf", perturbation=p).generate(PROMPTS, **kw)
        assert torch.equal(a.tokens, b.tokens), spec
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
        assert torch.equal(a.safe_size, b.safe_size)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_low_precision_engines_mismatch_by_about_1e_3(family: str) -> None:
    model = _model(family)
    mean_abs = {}
    for dtype in ("fp32", "bf16", "fp16"):
        r = _engine(model, dtype=dtype).generate(PROMPTS, n=4, max_tokens=16, rho=None, seed=0)
        mean_abs[dtype] = _delta(model, r, None).abs().mean().item()
    assert mean_abs["fp32"] < 1e-6
    assert 1e-4 < mean_abs["bf16"] < 1e-2  # measured ≈ 9e-4 at random init
    assert 1e-6 < mean_abs["fp16"] < mean_abs["bf16"]  # fp16 has 3 more mantissa bits


def test_engine_rounds_its_own_weight_copy_and_leaves_the_trainer_alone(model: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = _engine(model, dtype="bf16")
    engine.generate(PROMPTS, n=1, max_tokens=4, seed=0)
    for name, p in engine.model.state_dict().items():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, before[name].to(torch.bfloat16))
    for name, p in model.state_dict().items():
        assert p.dtype == torch.float32 and torch.equal(p, before[name])


# ----------------------------------------------------------------------------- layout
def test_rollout_layout_follows_the_contract(model: torch.nn.Module) -> None:
    n = 3
    r = _engine(model).generate(PROMPTS, n=n, max_tokens=9, rho=None, seed=5)
    rows = len(PROMPTS) * n
    p = max(len(x) for x in PROMPTS)
    assert isinstance(r, Rollout) and r.num_samples == rows and r.prompt_len == p
    assert r.tokens.shape == r.logprobs.shape == r.mask.shape and r.tokens.shape[0] == rows
    assert r.prompt_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(n)]
    ids, mask, _ = left_pad(PROMPTS, 0, n)
    assert torch.equal(r.sequences[:, :p], ids) and torch.equal(r.attention_mask[:, :p], mask)
    assert torch.equal(r.sequences[:, p:], r.tokens)
    assert torch.equal(r.attention_mask[:, p:], r.mask.long())
    assert torch.equal(r.lengths, r.mask.sum(1))
    assert r.logprobs.dtype == torch.float32 and bool((r.logprobs <= 0).all())
    assert r.safe_size is None  # rho=None: no pruning, nothing to report
    assert isinstance(_engine(model), RolloutEngine)


def test_eos_is_kept_and_everything_after_it_is_padding(model: torch.nn.Module) -> None:
    kw = dict(n=2, max_tokens=12, seed=11)
    free = _engine(model, eos_token_id=3).generate(PROMPTS, **kw)
    # Same seed, same draws up to the first eos: make row 0's 6th token the eos, so row 0 must stop there.
    eos = int(free.tokens[0, 5])
    r = _engine(model, eos_token_id=eos, pad_token_id=0).generate(PROMPTS, **kw)
    assert r.lengths[0] <= 6 and eos in r.tokens[0].tolist()
    stopped = 0
    for row in range(r.num_samples):
        toks, m = r.tokens[row].tolist(), r.mask[row]
        if eos in toks:
            stopped += 1
            k = toks.index(eos)
            assert bool(m[: k + 1].all()) and not bool(m[k + 1 :].any())
            assert all(t == 0 for t in toks[k + 1 :])
            assert bool((r.logprobs[row, k + 1 :] == 0).all()) and r.logprobs[row, k] < 0
            assert r.lengths[row] == k + 1
        else:
            assert bool(m.all()) and r.lengths[row] == r.tokens.shape[1]
    assert stopped >= 1


def test_the_loop_ends_when_every_row_has_stopped(sharp: torch.nn.Module) -> None:
    # Near-greedy sampling and eos = the greedy first token of every prompt: all rows stop at step 1.
    first = _engine(sharp).generate(PROMPTS, n=1, max_tokens=1, temperature=1e-3, seed=0).tokens[:, 0]
    prompts = [p for p, t in zip(PROMPTS, first.tolist()) if t == first[0].item()]
    r = _engine(sharp, eos_token_id=int(first[0])).generate(
        prompts, n=2, max_tokens=30, temperature=1e-3, seed=0
    )
    assert r.tokens.shape[1] == 1 and bool(r.mask.all()) and r.lengths.tolist() == [1] * r.num_samples


def test_same_seed_same_rollout_other_seed_other_rollout(model: torch.nn.Module) -> None:
    engine = _engine(model, perturbation=GaussianLogitNoise(0.3))
    a = engine.generate(PROMPTS, n=2, max_tokens=8, rho=1e-3, seed=42)
    b = engine.generate(PROMPTS, n=2, max_tokens=8, rho=1e-3, seed=42)
    c = engine.generate(PROMPTS, n=2, max_tokens=8, rho=1e-3, seed=43)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    # The n samples of one prompt are different draws, not copies.
    assert not torch.equal(a.tokens[0], a.tokens[1])


# ----------------------------------------------------------------------------- min-p and processed log-probs
def test_every_sampled_token_is_in_the_safe_set_and_large_rho_prunes_hard(sharp: torch.nn.Module) -> None:
    engine = _engine(sharp)
    sizes = {}
    for rho in (0.5, 1e-6):
        r = engine.generate(PROMPTS, n=4, max_tokens=12, rho=rho, seed=2)
        z = _trainer_logits(engine.model, r)  # fp32 engine copy: same logits as the decode loop
        keep = safe_mask(z, rho)  # (N, T, V)
        in_safe = keep.gather(-1, r.tokens.unsqueeze(-1)).squeeze(-1)
        assert bool(in_safe[r.mask].all())
        assert torch.equal(r.safe_size[r.mask], keep.sum(-1)[r.mask])
        assert bool((r.safe_size[~r.mask] == 0).all())
        sizes[rho] = r.safe_size[r.mask].float().mean().item()
    assert sizes[0.5] < 4 < 50 < sizes[1e-6]


@pytest.mark.parametrize(
    "perturbation", [None, TailInflation(factor=3.0, threshold=2.0), ProbabilityFloor(nats=4.0)], ids=str
)
def test_logprobs_are_the_log_softmax_of_the_masked_processed_logits(
    sharp: torch.nn.Module, perturbation: object
) -> None:
    rho, temperature = 1e-2, 0.8
    engine = _engine(sharp, perturbation=perturbation)
    r = engine.generate(PROMPTS, n=3, max_tokens=10, rho=rho, temperature=temperature, seed=9)
    z = _trainer_logits(engine.model, r, temperature)  # (N, T, V), naive recomputation
    if perturbation is not None:
        z = perturbation(z)
    z = z.masked_fill(~safe_mask(z, rho), float("-inf"))
    naive = torch.log_softmax(z, dim=-1).gather(-1, r.tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(r.logprobs[r.mask], naive[r.mask], atol=2e-5, rtol=0)


def test_perturbations_change_the_engine_policy_by_their_expected_size(model: torch.nn.Module) -> None:
    def mean_abs(spec: str) -> float:
        r = _engine(model, perturbation=make_perturbation(spec)).generate(PROMPTS, n=4, max_tokens=12, seed=4)
        return _delta(model, r, None).abs().mean().item()

    kv8, kv4, kv2, noise = (
        mean_abs("kvquant:8"),
        mean_abs("kvquant:4"),
        mean_abs("kvquant:2"),
        mean_abs("gaussian:0.3"),
    )
    assert 1e-6 < kv8 < kv4 < kv2 < 0.5  # the KV hook is live in the decode loop, coarser = worse
    assert 0.05 < noise < 0.5  # ~σ·(1−p) per token with a near-flat random-init policy


# ----------------------------------------------------------------------------- sampler fast paths
def test_sample_step_equals_processed_logprobs_plus_sampling() -> None:
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 4
    for rho, temperature, pert in [(None, 1.0, None), (1e-3, 0.7, GaussianLogitNoise(0.5)), (0.3, 1.3, None)]:
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        tok, lp, size = sample_step(logits, temperature=temperature, rho=rho, perturbation=pert, generator=g1)
        logp, keep = processed_logprobs(
            logits, temperature=temperature, rho=rho, perturbation=pert, generator=g2
        )
        ref_tok = sample_categorical(logp.exp(), g2)
        assert torch.equal(tok, ref_tok)
        torch.testing.assert_close(lp, logp.gather(1, tok[:, None]).squeeze(1), atol=1e-5, rtol=0)
        if rho is None:
            assert size is None and keep is None
        else:
            assert torch.equal(size, keep.sum(-1))


def test_sample_step_keeps_ties_and_ignores_minus_inf_like_the_safe_mask() -> None:
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(3)) * 6
    logits[:, :4] = logits.amax(-1, keepdim=True)  # four-way ties at the max
    logits[:, 100:150] = float("-inf")  # e.g. banned ids
    for rho in (1.0, 1e-2, math.exp(-13)):
        g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        tok, lp, size = sample_step(logits, rho=rho, generator=g1)
        logp, keep = processed_logprobs(logits, rho=rho, generator=g2)
        assert torch.equal(tok, sample_categorical(logp.exp(), g2)) and torch.equal(size, keep.sum(-1))
        assert bool((size >= 4).all()) and bool(keep.gather(1, tok[:, None]).all())  # ties kept, draws safe
        torch.testing.assert_close(lp, logp.gather(1, tok[:, None]).squeeze(1), atol=1e-5, rtol=0)


def test_two_level_sampler_matches_the_naive_inverse_cdf() -> None:
    g = torch.Generator().manual_seed(0)
    for vocab in (1000, 4096, 130):
        probs = torch.rand(256, vocab, generator=g) ** 8  # skewed
        probs[probs < 0.01] = 0.0  # many exact zeros, whole empty blocks included
        probs[:, 0] += 1e-3  # every row has mass
        u = torch.rand(256, generator=g, dtype=torch.float64)
        fast = sample_categorical(probs, uniforms=u)
        assert torch.equal(fast, sample_categorical_reference(probs, u))
        assert bool((probs.gather(1, fast[:, None]) > 0).all())


def test_sampler_never_picks_a_zero_probability_token_even_at_the_edges() -> None:
    probs = torch.zeros(4, 300)
    probs[:, 127] = 1.0  # last entry of a block, followed by zeros
    probs[1, 128] = 1.0  # first entry of the next block
    u = torch.tensor([0.0, 1.0 - 1e-16, 0.5, 0.999999], dtype=torch.float64)
    out = sample_categorical(probs, uniforms=u)
    assert bool((probs.gather(1, out[:, None]) > 0).all())


def test_sampler_keeps_tiny_probabilities_that_float32_would_erase() -> None:
    probs = torch.tensor([[0.5, 1e-10, 0.25] + [0.0] * 200])  # token 1 sits next to a 0.5 in one block
    # A float32 cumulative sum cannot tell 0.5 from 0.5 + 1e-10: token 1 would never be drawn.
    assert probs.cumsum(-1)[0, 0] == probs.cumsum(-1)[0, 1]
    # The float64 inverse CDFs keep its 1e-10-wide interval. (Block totals are float32, the naive
    # reference's total is float64, so each gets the uniform that lands mid-interval for it.)
    for sampler, total in (
        (sample_categorical, probs.sum()),
        (sample_categorical_reference, probs.double().sum()),
    ):
        u = 1 - (0.5 + 5e-11) / total.double()
        assert sampler(probs, uniforms=u.reshape(1)).item() == 1


def test_sampler_frequencies_match_the_probabilities() -> None:
    probs = torch.softmax(torch.randn(500, generator=torch.Generator().manual_seed(1)) * 2, dim=0)
    draws = 200_000
    idx = sample_categorical(probs.expand(draws, -1).contiguous(), torch.Generator().manual_seed(2))
    freq = torch.bincount(idx, minlength=500).double() / draws
    # Total variation of an exact sampler ~ sqrt(V / draws) / 2 ≈ 0.025; a wrong one is far off.
    assert 0.5 * (freq - probs.double()).abs().sum().item() < 0.04
    assert abs(freq[probs.argmax()].item() - probs.max().item()) < 5 * math.sqrt(probs.max().item() / draws)


# ----------------------------------------------------------------------------- weight sync
def test_sync_weights_brings_the_engine_back_to_the_trainer(model: torch.nn.Module) -> None:
    trainer = copy.deepcopy(model)
    fp32, bf16 = _engine(trainer), _engine(trainer, dtype="bf16")
    with torch.no_grad():  # "a few optimiser steps"
        g = torch.Generator().manual_seed(0)
        for p in trainer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    stale = fp32.generate(PROMPTS, n=2, max_tokens=8, seed=0)
    assert _delta(trainer, stale, None).abs().mean().item() > 1e-3
    fp32.sync_weights(trainer)
    bf16.sync_weights(trainer)
    fresh = fp32.generate(PROMPTS, n=2, max_tokens=8, seed=0)
    assert _delta(trainer, fresh, None).abs().max().item() < 1e-5
    for name, p in bf16.model.state_dict().items():
        assert p.dtype == torch.bfloat16 and torch.equal(p, trainer.state_dict()[name].to(torch.bfloat16))
    # In place, no aliasing: later trainer updates do not leak into the engine.
    snapshot = {k: v.clone() for k, v in fp32.model.state_dict().items()}
    with torch.no_grad():
        for p in trainer.parameters():
            p.mul_(2.0)
    assert all(torch.equal(v, snapshot[k]) for k, v in fp32.model.state_dict().items())


def test_sync_weights_rejects_another_architecture(model: torch.nn.Module) -> None:
    other = build_tiny_model(TinyModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1))
    with pytest.raises(ValueError, match="does not match"):
        _engine(model).sync_weights(other)


def test_rollout_tensors_can_feed_the_trainers_backward_pass(model: torch.nn.Module) -> None:
    r = _engine(model).generate(PROMPTS, n=2, max_tokens=6, rho=1e-3, seed=0)
    assert not any(t.is_inference() for t in (r.sequences, r.attention_mask, r.tokens, r.logprobs, r.mask))
    trainer = copy.deepcopy(model).train()
    out = trainer(
        input_ids=r.sequences, attention_mask=r.attention_mask, position_ids=position_ids(r.attention_mask)
    )
    lp = token_logprobs(out.logits[:, r.prompt_len - 1 : -1], r.tokens, 1e-3)
    (-(lp * r.mask).sum()).backward()
    assert trainer.get_input_embeddings().weight.grad is not None


# ----------------------------------------------------------------------------- other architectures, errors
def test_other_architectures_run_on_the_hf_backend() -> None:
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    ).eval()
    engine = TorchEngine(gpt2, eos_token_id=2, pad_token_id=0)
    assert engine.backend == "hf"
    r = engine.generate(PROMPTS, n=2, max_tokens=6, rho=1e-2, temperature=0.9, seed=0)
    assert _delta(gpt2, r, 1e-2, 0.9).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="backend='lean' cannot run"):
        TorchEngine(gpt2, eos_token_id=2, pad_token_id=0, backend="lean")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(dtype="fp8"), "dtype"),
        (dict(backend="fast"), "backend"),
        (dict(pad_token_id=VOCAB), "pad_token_id"),
        (dict(eos_token_id=-1), "eos_token_id"),
        (dict(perturbation="gaussian:0.1"), "make_perturbation"),
    ],
)
def test_bad_engine_arguments_raise_value_error(model: torch.nn.Module, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _engine(model, **kwargs)


@pytest.mark.parametrize(
    ("prompts", "kwargs", "match"),
    [
        ([], {}, "non-empty"),
        ([[1, 2], []], {}, r"prompts\[1\] is empty"),
        ([[1, VOCAB]], {}, "outside"),
        (["12+3"], {}, "tokenize"),
        ([[1]], dict(n=0), "n=0"),
        ([[1]], dict(max_tokens=0), "max_tokens"),
        ([[1]], dict(temperature=0.0), "temperature"),
        ([[1]], dict(temperature=float("inf")), "temperature"),
        ([[1]], dict(rho=0.0), "rho"),
        ([[1]], dict(rho=1.5), "rho"),
        ([[1]], dict(seed=-1), "seed"),
    ],
)
def test_bad_generate_arguments_raise_value_error(
    model: torch.nn.Module, prompts: list, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        _engine(model).generate(prompts, **kwargs)


def test_rollout_checks_its_shapes() -> None:
    ok = dict(
        sequences=torch.zeros(2, 5, dtype=torch.long),
        attention_mask=torch.ones(2, 5, dtype=torch.long),
        prompt_len=3,
        tokens=torch.zeros(2, 2, dtype=torch.long),
        logprobs=torch.zeros(2, 2),
        mask=torch.ones(2, 2, dtype=torch.bool),
        lengths=torch.full((2,), 2),
        safe_size=None,
        prompt_index=torch.tensor([0, 0]),
    )
    assert Rollout(**ok).to("cpu").num_samples == 2
    with pytest.raises(ValueError, match="logprobs"):
        Rollout(**{**ok, "logprobs": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="sequences"):
        Rollout(**{**ok, "prompt_len": 2})
    with pytest.raises(ValueError, match="bool"):
        Rollout(**{**ok, "mask": torch.ones(2, 2)})


def _bench_rollout() -> types.ModuleType:
    """benchmarks/bench_rollout.py as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rollout.py"
    spec = importlib.util.spec_from_file_location("bench_rollout", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_rollout_benchmark_worker_runs_on_a_tiny_budget() -> None:
    bench = _bench_rollout()
    cfg = dict(
        bench.QUICK, batch=4, prompt_len=3, new_tokens=5, vocab=128, hidden=32, layers=1, inter=64, repeats=1
    )
    for method in ("generate", "engine"):
        out = bench.worker(method, "fp32", cfg, threads=None)
        assert (
            out["tokens"] == 4 * 5
            and out["tokens_per_s"] > 0
            and out["peak_rss_mib"] >= out["rss_model_mib"] > 0
        )


@pytest.mark.vllm
def test_rollout_benchmark_times_real_vllm_on_the_same_batch() -> None:
    bench = _bench_rollout()
    cfg = dict(
        bench.QUICK, batch=4, prompt_len=3, new_tokens=5, vocab=128, hidden=64, heads=2, layers=1, inter=64
    )
    out = bench.worker("vllm", "fp32", {**cfg, "repeats": 1}, threads=None)
    assert 4 <= out["tokens"] <= 4 * 5 and out["tokens_per_s"] > 0  # a row stops early only at eos
