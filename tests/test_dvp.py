"""Tests for workbench.dvp: the fused chunked fast paths against their naive references over
shapes × dtypes × ρ × chunk sizes × temperatures (values and gradients), fp64 gradcheck, the
memory bound (measured with torch's CPU memory profiler), non-contiguous inputs, and bad input.

Property-based tests (hypothesis: extreme values, ties, −inf, ρ limits, Prop 4.2) live in
tests/test_dvp_properties.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workbench import dvp
from workbench.dvp import (
    DEFAULT_RHO,
    MASK_MARGIN,
    TokenStats,
    masked_entropy,
    masked_entropy_reference,
    masked_logits,
    retained_mass,
    retained_mass_reference,
    safe_mask,
    safe_mask_reference,
    safe_set_size,
    safe_set_size_reference,
    token_logprobs,
    token_logprobs_reference,
    token_stats,
    validate_rho,
)
from workbench.memory import peak_bytes

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
RHOS = [None, DEFAULT_RHO, 0.05, 1.0]


def make_logits(
    shape: tuple[int, ...], *, seed: int, dtype: torch.dtype = torch.float32, scale: float = 4.0
) -> torch.Tensor:
    """Heavy-tailed logits (so ρ = e^-13 really prunes), with a −inf entry, a tie and a flat row."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    flat = z.view(-1, shape[-1])
    if flat.shape[0] >= 3 and shape[-1] >= 3:
        flat[0, 1] = -math.inf  # a −inf logit
        flat[1, 2] = flat[1].max()  # a tie at the max
        flat[2] = 0.5  # an all-equal row
    return z.to(dtype)


def make_tokens(shape: tuple[int, ...], vocab: int, *, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, shape, generator=g)


def tol(dtype: torch.dtype) -> dict[str, float]:
    """Tolerance for comparing two fp32 (or fp64) computations of the same quantity."""
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}


def grads(fn, logits: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, d(Σ upstream · value)/d logits) of fn(logits)."""
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach(), x.grad


# ----------------------------------------------------------------------------------------------------
# fast path == reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 13), (2, 5, 33), (3, 1000), (1, 1), (4,)], ids=str)
@pytest.mark.parametrize("rho", RHOS, ids=str)
def test_token_logprobs_matches_reference_values_and_grads(dtype, shape, rho):
    vocab = shape[-1]
    logits = make_logits(shape, seed=len(shape) * 100 + vocab, dtype=dtype)
    tokens = make_tokens(shape[:-1], vocab, seed=vocab)
    upstream = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref_v, ref_g = grads(lambda x: token_logprobs_reference(x, tokens, rho), logits, upstream)
    for chunk in (1, 3, None):
        v, g = grads(lambda x, c=chunk: token_logprobs(x, tokens, rho, chunk_size=c), logits, upstream)
        assert v.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert v.shape == tokens.shape and g.dtype == dtype and g.shape == logits.shape
        torch.testing.assert_close(v, ref_v, **tol(dtype))
        # grads are stored in the logits' dtype: compare at that dtype's precision
        torch.testing.assert_close(
            g, ref_g, **({} if dtype in (torch.bfloat16, torch.float16) else tol(dtype))
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.5])
@pytest.mark.parametrize("rho", [None, DEFAULT_RHO, 0.2], ids=str)
def test_token_stats_matches_references(dtype, temperature, rho):
    shape, vocab = (3, 4, 257), 257
    logits = make_logits(shape, seed=11, dtype=dtype)
    tokens = make_tokens(shape[:-1], vocab, seed=2)
    upstream = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref_v, ref_g = grads(
        lambda x: token_logprobs_reference(x, tokens, rho, temperature=temperature), logits, upstream
    )
    kw = {"temperature": temperature}
    for chunk in (2, None):
        x = logits.detach().clone().requires_grad_(True)
        st = token_stats(x, tokens, rho, chunk_size=chunk, **kw)
        assert isinstance(st, TokenStats)
        (st.logp * upstream.to(st.logp.dtype)).sum().backward()
        t = tol(dtype)
        torch.testing.assert_close(st.logp.detach(), ref_v, **t)
        torch.testing.assert_close(x.grad, ref_g, **({} if dtype in (torch.bfloat16, torch.float16) else t))
        torch.testing.assert_close(st.logz.exp(), retained_mass_reference(logits, rho, **kw), **t)
        torch.testing.assert_close(st.entropy, masked_entropy_reference(logits, rho, **kw), **t)
        assert torch.equal(st.safe_size, safe_set_size_reference(logits, rho, **kw))
        # the standalone functions are the same numbers
        assert torch.equal(st.logp.detach(), token_logprobs(logits, tokens, rho, chunk_size=chunk, **kw))
        assert torch.equal(st.logz.exp(), retained_mass(logits, rho, chunk_size=chunk, **kw))
        assert torch.equal(st.entropy, masked_entropy(logits, rho, chunk_size=chunk, **kw))
        assert torch.equal(st.safe_size, safe_set_size(logits, rho, chunk_size=chunk, **kw))
        assert not (st.logz.requires_grad or st.entropy.requires_grad or st.safe_size.requires_grad)
        assert st.safe_size.dtype == torch.long


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rho", [DEFAULT_RHO, 1e-2, 0.5, 1.0, 1e-300], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_safe_mask_is_bit_identical_to_reference(dtype, rho, temperature):
    logits = make_logits((6, 5, 301), seed=5, dtype=dtype)
    for chunk in (1, 4, None):
        got = safe_mask(logits, rho, temperature=temperature, chunk_size=chunk)
        assert got.dtype == torch.bool and got.shape == logits.shape
        assert torch.equal(got, safe_mask_reference(logits, rho, temperature=temperature))
    # the argmax (every tied max) is always in the safe set
    z = logits.to(torch.float64 if dtype == torch.float64 else torch.float32)
    assert bool(got[z == z.amax(-1, keepdim=True)].all())


def test_large_vocab_matches_reference(monkeypatch):
    """Qwen-sized vocabulary (151,936) with the auto chunk size (made small: several chunks of rows)."""
    monkeypatch.setattr(dvp, "DEFAULT_BLOCK_BYTES", 16 * 2**20)
    vocab = 151_936
    logits = make_logits((2, 36, vocab), seed=7, dtype=torch.bfloat16, scale=3.0)
    tokens = make_tokens((2, 36), vocab, seed=7)
    tokens[0, :5] = logits[0, :5].float().argmax(-1)  # some certainly kept tokens
    upstream = torch.randn(2, 36, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref_v, ref_g = grads(lambda x: token_logprobs_reference(x, tokens, DEFAULT_RHO), logits, upstream)
    v, g = grads(lambda x: token_logprobs(x, tokens, DEFAULT_RHO), logits, upstream)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g)
    assert dvp._auto_chunk(vocab, None) < 36  # really chunked


@pytest.mark.slow  # importing trl (and transformers) takes ~5-10 s
def test_matches_trl_selective_log_softmax_without_pruning():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    logits = make_logits((3, 9, 500), seed=9)
    logits[0, 0, 1] = 0.0  # no −inf here: TRL's reference has no special handling
    tokens = make_tokens((3, 9), 500, seed=9)
    torch.testing.assert_close(
        token_logprobs(logits, tokens, None, temperature=0.8),
        trl_utils.selective_log_softmax(logits, tokens, temperature=0.8),
    )


# ----------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("rho", [None, DEFAULT_RHO, 0.1], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gradcheck_fp64(rho, temperature):
    """Finite differences agree with the chunked backward for tokens in the safe set, and the full
    fp64 Jacobian (pruned tokens included) equals the naive reference's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3
    x[:, -1] -= 40.0  # a clearly pruned token in every row
    x.requires_grad_(True)
    keep = safe_mask(x.detach(), rho, temperature=temperature)
    if rho is not None:  # finite differences must not cross the safe-set boundary
        s = x.detach() / temperature - (x.detach() / temperature).amax(-1, keepdim=True)
        assert bool(((s - math.log(rho)).abs() > 1e-3).all())
        assert not bool(keep.all())  # some tokens are pruned
    kept_tokens = torch.multinomial(keep.double(), 1, generator=g).squeeze(-1)  # (6,) inside V_S
    any_tokens = torch.randint(0, 9, (6,), generator=g)

    def fast(z: torch.Tensor, tokens: torch.Tensor = kept_tokens) -> torch.Tensor:
        return token_logprobs(z, tokens, rho, chunk_size=4, temperature=temperature)

    def stats_logp(z: torch.Tensor) -> torch.Tensor:
        return token_stats(z, kept_tokens, rho, chunk_size=4, temperature=temperature).logp

    assert torch.autograd.gradcheck(fast, (x,))
    assert torch.autograd.gradcheck(stats_logp, (x,))
    # A pruned token's value (max − MASK_MARGIN − lse) follows the row max, but like the naive
    # masked_fill the fill value is a constant to autograd: compare Jacobians with the reference.
    for tokens in (kept_tokens, any_tokens):
        jac = torch.autograd.functional.jacobian(lambda z, t=tokens: fast(z, t), x.detach())
        ref = torch.autograd.functional.jacobian(
            lambda z, t=tokens: token_logprobs_reference(z, t, rho, temperature=temperature), x.detach()
        )
        torch.testing.assert_close(jac, ref, rtol=1e-12, atol=1e-12)


def test_gradient_structure():
    """∂ log π^mp(a)/∂z = (onehot(a)·1[a ∈ V_S] − π^mp) / T: rows sum to 0 for kept tokens, −1/T for
    pruned ones, nothing flows into pruned logits, and a pruned token gets no gradient of its own."""
    temperature = 2.0
    z = torch.tensor([[4.0, 3.0, 2.0, -40.0, -50.0]] * 2)
    tokens = torch.tensor([1, 3])  # kept, pruned
    x = z.clone().requires_grad_(True)
    token_logprobs(x, tokens, 1e-3, temperature=temperature).sum().backward()
    p = torch.softmax(z[0, :3] / temperature, -1)
    torch.testing.assert_close(x.grad[0, :3], (torch.eye(3)[1] - p) / temperature)
    torch.testing.assert_close(x.grad[1, :3], -p / temperature)
    assert torch.equal(x.grad[:, 3:], torch.zeros(2, 2))
    torch.testing.assert_close(x.grad.sum(-1), torch.tensor([0.0, -1 / temperature]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rho", [DEFAULT_RHO, 0.3, 1e-300], ids=str)
def test_no_gradient_reaches_pruned_logits(dtype, rho):
    """Exactly zero gradient outside the safe set, for every dtype and for the tiny-ρ (−inf fill) path."""
    logits = make_logits((5, 300), seed=4, dtype=dtype, scale=4.0)
    if rho == 1e-300:  # a tail beyond −log ρ ≈ 690 so something is pruned (fp16 cannot hold it)
        logits[:, 100:] = -900.0 if dtype != torch.float16 else -60000.0
    tokens = make_tokens((5,), 300, seed=4)
    x = logits.clone().requires_grad_(True)
    token_logprobs(x, tokens, rho, chunk_size=2).sum().backward()
    pruned = ~safe_mask(logits, rho)
    assert bool(pruned.any())
    assert bool((x.grad[pruned] == 0).all())
    assert bool((x.grad[~pruned] != 0).any())
    _, ref_g = grads(lambda y: token_logprobs_reference(y, tokens, rho), logits, torch.ones(5))
    torch.testing.assert_close(
        x.grad, ref_g, **({} if dtype in (torch.bfloat16, torch.float16) else tol(dtype))
    )


def test_autocast_does_not_change_results():
    logits = make_logits((4, 6, 70), seed=6)
    tokens = make_tokens((4, 6), 70, seed=6)
    plain = token_stats(logits, tokens, DEFAULT_RHO)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = logits.clone().requires_grad_(True)
        cast = token_stats(x, tokens, DEFAULT_RHO)
        cast.logp.sum().backward()
    assert cast.logp.dtype == torch.float32
    assert torch.equal(cast.logp.detach(), plain.logp) and torch.equal(cast.entropy, plain.entropy)
    _, ref_g = grads(lambda y: token_logprobs_reference(y, tokens, DEFAULT_RHO), logits, torch.ones(4, 6))
    torch.testing.assert_close(x.grad, ref_g, **tol(torch.float32))


def test_masked_token_value_is_finite_and_documented():
    z = torch.tensor([[2.0, 1.0, -30.0, -math.inf]])
    logp = token_logprobs(z.expand(4, 4), torch.arange(4), 1e-3)
    log_s = torch.logsumexp(torch.tensor([0.0, -1.0]), 0)
    torch.testing.assert_close(logp[2:], torch.full((2,), -MASK_MARGIN) - log_s)
    assert bool(torch.isfinite(logp).all())
    assert masked_logits(z, 1e-3)[0, 2] == 2.0 - MASK_MARGIN
    # MASK_MARGIN beats −log of the smallest positive float64, so pruned < kept for every valid ρ
    assert MASK_MARGIN > -math.log(5e-324)
    assert math.exp(-MASK_MARGIN) == 0.0 and torch.tensor(-MASK_MARGIN).exp().item() == 0.0


def test_mask_carries_no_gradient_in_reference():
    x = torch.tensor([[1.0, 0.0, -20.0]], requires_grad=True)
    masked_logits(x, 1e-3).sum().backward()  # the masked entry is a constant
    assert torch.equal(x.grad, torch.tensor([[1.0, 1.0, 0.0]]))


def test_no_grad_and_detached_inputs():
    z = make_logits((4, 50), seed=1)
    tokens = make_tokens((4,), 50, seed=1)
    with torch.no_grad():
        out = token_logprobs(z.requires_grad_(True), tokens, DEFAULT_RHO)
    assert not out.requires_grad
    st = token_stats(z, tokens, DEFAULT_RHO)
    assert st.logp.requires_grad and st.logp.grad_fn is not None


# ----------------------------------------------------------------------------------------------------
# layout: non-contiguous, scalar, empty, temperature


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_slice_is_read_in_place(dtype):
    """``logits[:, :-1]`` (what causal-LM trainers pass) cannot be flattened without a copy."""
    full = make_logits((3, 8, 64), seed=3, dtype=dtype)
    sliced = full[:, :-1]
    assert not sliced.is_contiguous()
    with pytest.raises(RuntimeError):
        sliced.view(-1, 64)
    tokens = make_tokens((3, 7), 64, seed=3)
    upstream = torch.randn(3, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = full.detach().clone().requires_grad_(True)
    out = token_logprobs(x[:, :-1], tokens, DEFAULT_RHO, chunk_size=2)
    (out * upstream.float()).sum().backward()
    ref_v, ref_g = grads(
        lambda y: token_logprobs_reference(y, tokens, DEFAULT_RHO), sliced.contiguous(), upstream
    )
    torch.testing.assert_close(out.detach(), ref_v)
    torch.testing.assert_close(x.grad[:, :-1], ref_g)
    assert torch.equal(x.grad[:, -1], torch.zeros_like(x.grad[:, -1]))
    assert torch.equal(safe_mask(sliced, 0.01, chunk_size=3), safe_mask_reference(sliced, 0.01))
    st = token_stats(sliced, tokens, 0.01, chunk_size=5)
    assert torch.equal(st.safe_size, safe_set_size_reference(sliced, 0.01))


def test_scalar_and_empty_shapes():
    z = torch.tensor([0.0, 1.0, -3.0])
    out = token_logprobs(z, torch.tensor(1), 0.1)
    assert out.shape == () and out.item() == pytest.approx(-math.log1p(math.exp(-1.0)), abs=1e-6)
    for shape in [(0, 5), (2, 0, 5)]:
        empty = torch.zeros(shape, requires_grad=True)
        tok = torch.zeros(shape[:-1], dtype=torch.long)
        out = token_logprobs(empty, tok, DEFAULT_RHO)
        assert out.shape == shape[:-1]
        out.sum().backward()
        assert empty.grad.shape == shape
        st = token_stats(empty, tok, DEFAULT_RHO)
        assert st.entropy.shape == st.safe_size.shape == shape[:-1]
        assert safe_mask(empty, DEFAULT_RHO).shape == shape


def test_temperature_divides_before_masking():
    z = make_logits((5, 40), seed=8)
    tokens = make_tokens((5,), 40, seed=8)
    for t in (0.3, 1.7):
        assert torch.equal(
            token_logprobs(z, tokens, 0.01, temperature=t), token_logprobs(z / t, tokens, 0.01)
        )
        assert torch.equal(safe_mask(z, 0.01, temperature=t), safe_mask(z / t, 0.01))
    # a higher temperature flattens the distribution, so the safe set can only grow
    assert bool((safe_set_size(z, 0.01, temperature=2.0) >= safe_set_size(z, 0.01)).all())


def test_int32_tokens_and_int_temperature():
    z = make_logits((3, 20), seed=2)
    t64 = make_tokens((3,), 20, seed=2)
    assert torch.equal(
        token_logprobs(z, t64.int(), 0.1, temperature=2), token_logprobs(z, t64, 0.1, temperature=2.0)
    )


# ----------------------------------------------------------------------------------------------------
# memory: torch's CPU memory profiler sees every tensor allocation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_memory_one_block_forward_and_backward(dtype):
    rows, vocab, chunk = 64, 4096, 8
    block = chunk * vocab * 4  # one fp32 [chunk, V] workspace
    small = rows * 64 + 64 * 1024  # [N] row statistics and bookkeeping
    logits = make_logits((rows, vocab), seed=0, dtype=dtype)
    tokens = make_tokens((rows,), vocab, seed=0)
    x = logits.clone().requires_grad_(True)

    fwd = peak_bytes(lambda: token_logprobs(logits, tokens, DEFAULT_RHO, chunk_size=chunk))
    assert block <= fwd <= block + small

    def fwd_bwd() -> None:
        token_logprobs(x, tokens, DEFAULT_RHO, chunk_size=chunk).sum().backward()

    grad_bytes = logits.numel() * logits.element_size()
    extra = 0 if dtype == torch.float32 else block  # fp32 logits: computed straight into the gradient
    assert peak_bytes(fwd_bwd) <= grad_bytes + extra + small

    stats = peak_bytes(lambda: token_stats(logits, tokens, DEFAULT_RHO, chunk_size=chunk))
    assert stats <= block + block // 4 + small  # + one bool [chunk, V] block

    naive = peak_bytes(lambda: token_logprobs_reference(logits, tokens, DEFAULT_RHO))
    assert naive >= 2 * rows * vocab * 4  # the naive version holds several [N, V] fp32 tensors
    assert fwd * 10 < naive


def test_auto_chunk_size_bounds_the_workspace():
    assert dvp._auto_chunk(151_936, None) * 151_936 * 4 <= dvp.DEFAULT_BLOCK_BYTES
    assert dvp._auto_chunk(10**9, None) == 1
    assert dvp._auto_chunk(100, 7) == 7


# ----------------------------------------------------------------------------------------------------
# bad input: ValueError naming the argument, the value and the allowed range


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.5, math.nan, math.inf, -math.inf, True, "0.1"])
def test_validate_rho_rejects(rho):
    with pytest.raises(ValueError, match=r"rho=.* must be in \(0, 1\]"):
        validate_rho(rho)
    with pytest.raises(ValueError, match=r"cfg\.rho="):
        validate_rho(rho, "cfg.rho")


@pytest.mark.parametrize("rho", [None, 1.0, 1, DEFAULT_RHO, 5e-324, np.float32(0.25)], ids=str)
def test_validate_rho_accepts(rho):
    validate_rho(rho)


def test_numpy_scalars_are_accepted():
    z, t = make_logits((3, 12), seed=1), make_tokens((3,), 12, seed=1)
    got = token_logprobs(z, t, np.float64(0.01), chunk_size=np.int64(2), temperature=np.float32(0.5))
    assert torch.equal(got, token_logprobs(z, t, 0.01, chunk_size=2, temperature=0.5))


ALL_FUNCTIONS = {
    "token_logprobs": lambda z, t, **kw: token_logprobs(z, t, **kw),
    "token_stats": lambda z, t, **kw: token_stats(z, t, **kw),
    "safe_mask": lambda z, t, rho=0.1, **kw: safe_mask(z, rho, **kw),
    "retained_mass": lambda z, t, rho=0.1, **kw: retained_mass(z, rho, **kw),
    "masked_entropy": lambda z, t, **kw: masked_entropy(z, **kw),
    "safe_set_size": lambda z, t, rho=0.1, **kw: safe_set_size(z, rho, **kw),
}


@pytest.mark.parametrize("fn", ALL_FUNCTIONS.values(), ids=ALL_FUNCTIONS.keys())
@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"rho": 0.0}, r"rho=0\.0 must be in \(0, 1\]"),
        ({"rho": math.nan}, r"rho=nan must be in \(0, 1\]"),
        ({"rho": 2.0}, r"rho=2\.0 must be in \(0, 1\]"),
        ({"chunk_size": 0}, r"chunk_size=0 must be an int >= 1"),
        ({"chunk_size": -3}, r"chunk_size=-3 must be an int >= 1"),
        ({"chunk_size": 2.5}, r"chunk_size=2\.5 must be an int >= 1"),
        ({"temperature": 0.0}, r"temperature=0\.0 must be a finite number in \(0, inf\)"),
        ({"temperature": -1.0}, r"temperature=-1\.0 must be a finite number in \(0, inf\)"),
        ({"temperature": math.inf}, r"temperature=inf must be a finite number"),
    ],
)
def test_bad_arguments(fn, kwargs, pattern):
    z, t = make_logits((2, 10), seed=0), make_tokens((2,), 10, seed=0)
    with pytest.raises(ValueError, match=pattern):
        fn(z, t, **kwargs)


@pytest.mark.parametrize("fn", [token_logprobs, token_stats, token_logprobs_reference])
def test_bad_tokens(fn):
    z = make_logits((2, 3, 10), seed=0)
    with pytest.raises(ValueError, match=r"tokens\.shape=\(2, 4\) must equal logits\.shape\[:-1\]=\(2, 3\)"):
        fn(z, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens\.shape=\(6,\) must equal"):
        fn(z, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids in \[0, V\) = \[0, 10\) \(got min=10, max=10\)"):
        fn(z, torch.full((2, 3), 10))
    with pytest.raises(ValueError, match=r"got min=-1, max=3"):
        fn(z, torch.tensor([[0, -1, 3], [1, 1, 1]]))
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        fn(z, torch.zeros(2, 3))


def test_bad_logits():
    with pytest.raises(ValueError, match="logits must be a floating-point tensor"):
        token_logprobs(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits\.shape=\(2, 0\) must be \[\.\.\., V\] with V >= 1"):
        safe_mask(torch.zeros(2, 0), 0.1)


@pytest.mark.parametrize("bad", [-math.inf, math.inf, math.nan])
def test_rows_without_finite_max_raise(bad):
    z = torch.zeros(3, 4)
    if bad == -math.inf:
        z[1] = bad  # all −inf: no distribution at all
    else:
        z[1, 2] = bad
    tokens = torch.zeros(3, dtype=torch.long)
    for call in (
        lambda: token_logprobs(z, tokens, DEFAULT_RHO),
        lambda: token_logprobs(z, tokens),
        lambda: token_stats(z, tokens, DEFAULT_RHO),
        lambda: safe_mask(z, DEFAULT_RHO),
        lambda: masked_entropy(z),
    ):
        with pytest.raises(ValueError, match=r"1 row\(s\) without a finite maximum"):
            call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_token_in_safe_set_equals_the_gathered_safe_mask(dtype, temperature):
    z = (make_logits((6, 9, 80), seed=31) * 6).to(dtype)
    z[0, 0, :5] = z[0, 0].max()  # ties at the max
    z[1, 2, 7] = -math.inf  # -inf entries are fine in a finite row
    tok = make_tokens((6, 9), 80, seed=31)
    tok[0, 0], tok[1, 2] = 3, 7
    for rho in (1e-1, 1e-3, math.exp(-13), 1.0, None):
        want = safe_mask(z, rho, temperature=temperature).gather(-1, tok[..., None]).squeeze(-1)
        assert torch.equal(dvp.token_in_safe_set(z, tok, rho, temperature=temperature), want), rho


def test_token_in_safe_set_skips_masked_rows_and_rejects_nonfinite_valid_rows():
    z = make_logits((3, 10), seed=4)
    z[1] = math.nan  # a padding row
    tok = torch.tensor([0, 99, 2])  # padding may hold any id
    valid = torch.tensor([True, False, True])
    got = dvp.token_in_safe_set(z, tok, 1e-3, mask=valid)
    assert bool(got[1]) and torch.equal(
        got[[0, 2]], safe_mask(z[[0, 2]], 1e-3).gather(-1, tok[[0, 2], None]).squeeze(-1)
    )
    with pytest.raises(ValueError, match="without a finite maximum"):
        dvp.token_in_safe_set(z, torch.tensor([0, 1, 2]), 1e-3)
