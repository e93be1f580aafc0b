"""Property-based tests for workbench.dvp (hypothesis): finiteness on hostile logits (±1e4, ties,
all-equal rows, −inf entries, bf16/fp16), the ρ limits (ρ = 1 keeps only the argmax(es), ρ → 0 is
the plain log-softmax), Z ∈ (0, 1], normalisation of π^mp, nested safe sets, fast == reference on
every generated instance, the fused LM head (lm_head_token_stats) equal to token_stats on the logits it
makes, and Proposition 4.2's bound |Δ_a| ≤ 2ε(1 − p_a e^{−2ε}) (THEORY.md)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.dvp import (
    DEFAULT_RHO,
    lm_head_token_logprobs,
    lm_head_token_logprobs_reference,
    lm_head_token_stats,
    masked_entropy_reference,
    retained_mass_reference,
    safe_mask,
    safe_set_size_reference,
    token_logprobs,
    token_logprobs_reference,
    token_stats,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@st.composite
def hostile_logits(draw, *, lo: float = -1e4, hi: float = 1e4, neg_inf: bool = True) -> torch.Tensor:
    """[R, V] logits in [lo, hi] with deliberate ties, all-equal rows and −inf entries (never a whole
    row of −inf: such rows have no distribution and raise), in a random float dtype."""
    rows = draw(st.integers(1, 4))
    vocab = draw(st.integers(1, 24))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    palette = draw(st.lists(st.floats(lo, hi, allow_nan=False, width=32), min_size=1, max_size=6))
    values = st.one_of(st.floats(lo, hi, allow_nan=False, width=32), st.sampled_from(palette))  # ties
    data = [draw(st.lists(values, min_size=vocab, max_size=vocab)) for _ in range(rows)]
    if draw(st.booleans()):
        data[0] = [data[0][0]] * vocab  # an all-equal row
    z = torch.tensor(data, dtype=torch.float64)
    if neg_inf and vocab > 1:
        holes = draw(st.lists(st.tuples(st.integers(0, rows - 1), st.integers(0, vocab - 1)), max_size=8))
        for r, c in holes:
            z[r, c] = -math.inf
        for r in range(rows):  # keep at least one finite entry per row
            if not bool(torch.isfinite(z[r]).any()):
                z[r, 0] = 0.0
    return z.to(dtype)


rhos = st.one_of(
    st.sampled_from([DEFAULT_RHO, 1.0, 1e-300, 5e-324, 0.5]),
    st.floats(1e-30, 1.0, exclude_min=True),
)
temperatures = st.sampled_from([1.0, 0.5, 1.7])


@SETTINGS
@given(z=hostile_logits(), rho=st.one_of(st.none(), rhos), temperature=temperatures, data=st.data())
def test_no_nan_or_inf_and_valid_ranges(z, rho, temperature, data):
    rows, vocab = z.shape
    tokens = torch.tensor(data.draw(st.lists(st.integers(0, vocab - 1), min_size=rows, max_size=rows)))
    x = z.clone().requires_grad_(True)
    stt = token_stats(
        x, tokens, rho, chunk_size=data.draw(st.sampled_from([1, 2, None])), temperature=temperature
    )
    finite_token = torch.isfinite(z.gather(1, tokens[:, None]).squeeze(1))
    if rho is None:  # plain log-softmax: −inf only for a −inf logit, never NaN
        assert bool(torch.isfinite(stt.logp[finite_token]).all())
        assert not bool(stt.logp.isnan().any())
    else:  # DVP: every token, pruned or −inf, gets a finite log-prob
        assert bool(torch.isfinite(stt.logp).all())
    assert bool((stt.logp <= 1e-6).all())
    z_mass = stt.logz.exp()
    assert bool(((z_mass > 0) & (z_mass <= 1)).all())
    assert bool(torch.isfinite(stt.entropy).all())
    assert bool(((stt.entropy >= 0) & (stt.entropy <= math.log(vocab) + 1e-4)).all())
    assert bool(((stt.safe_size >= 1) & (stt.safe_size <= vocab)).all())
    stt.logp[finite_token if rho is None else slice(None)].sum().backward()
    assert bool(torch.isfinite(x.grad.float()).all())


@SETTINGS
@given(z=hostile_logits(), rho=st.one_of(st.none(), rhos), temperature=temperatures, data=st.data())
def test_fast_path_equals_reference(z, rho, temperature, data):
    rows, vocab = z.shape
    tokens = torch.tensor(data.draw(st.lists(st.integers(0, vocab - 1), min_size=rows, max_size=rows)))
    chunk = data.draw(st.sampled_from([1, 3, None]))
    kw = {"temperature": temperature}
    stt = token_stats(z, tokens, rho, chunk_size=chunk, **kw)
    ref = token_logprobs_reference(z, tokens, rho, **kw)
    # |logits| up to 1e4: fp32 rounding of z − max is ~1e-3 absolute there
    scale = 1e-12 if z.dtype == torch.float64 else 1e-6
    atol = scale * max(1.0, float(z[torch.isfinite(z)].abs().max()))
    torch.testing.assert_close(stt.logp, ref, rtol=scale, atol=atol)
    torch.testing.assert_close(
        token_logprobs(z, tokens, rho, chunk_size=chunk, **kw), stt.logp, rtol=0, atol=0
    )
    torch.testing.assert_close(stt.logz.exp(), retained_mass_reference(z, rho, **kw), rtol=scale, atol=atol)
    torch.testing.assert_close(stt.entropy, masked_entropy_reference(z, rho, **kw), rtol=scale, atol=atol)
    assert torch.equal(stt.safe_size, safe_set_size_reference(z, rho, **kw))


@SETTINGS
@given(
    z=hostile_logits(neg_inf=False), rho=st.one_of(st.none(), rhos), temperature=temperatures, data=st.data()
)
def test_lm_head_is_token_stats_on_the_logits_it_makes(z, rho, temperature, data):
    """Hidden states = identity and W = zᵀ make logits exactly z (±1e4, ties, flat rows): the fused head
    then gives token_stats' numbers bit for bit, and d/dW is the logits' gradient transposed."""
    rows, vocab = z.shape
    tokens = torch.tensor(data.draw(st.lists(st.integers(0, vocab - 1), min_size=rows, max_size=rows)))
    chunk = data.draw(st.sampled_from([1, 2, None]))
    kw = {"temperature": temperature, "chunk_size": chunk}
    hidden, w = torch.eye(rows, dtype=z.dtype), z.t().contiguous().requires_grad_(True)  # (R, R), (V, R)
    x = z.clone().requires_grad_(True)
    ref = token_stats(x, tokens, rho, **kw)
    got = lm_head_token_stats(hidden, w, tokens, rho, **kw)
    for name in ("logp", "logz", "entropy", "safe_size"):
        assert torch.equal(getattr(got, name).detach(), getattr(ref, name).detach()), name
    upstream = torch.linspace(-1.0, 2.0, rows, dtype=ref.logp.dtype)
    (ref.logp * upstream).sum().backward()
    (got.logp * upstream).sum().backward()
    assert torch.equal(w.grad, x.grad.t())


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.tuples(st.integers(1, 9), st.integers(1, 12), st.integers(1, 40)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    rho=st.one_of(st.none(), rhos),
    temperature=temperatures,
    chunk=st.sampled_from([1, 3, None]),
)
def test_lm_head_matches_reference_on_random_heads(seed, shape, dtype, scale, rho, temperature, chunk):
    """Dense random heads (logits from a real matmul): values and both gradients as with full logits."""
    rows, dim, vocab = shape
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, dim, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, dim, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g, dtype=torch.float64)
    ref = lm_head_token_logprobs_reference(h, w, tokens, rho, temperature=temperature)
    ref_g = torch.autograd.grad((ref * upstream.to(ref.dtype)).sum(), [h, w])
    got = lm_head_token_logprobs(h, w, tokens, rho, temperature=temperature, chunk_size=chunk)
    got_g = torch.autograd.grad((got * upstream.to(got.dtype)).sum(), [h, w])
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    logit_scale = max(1.0, float(F.linear(h, w).detach().abs().max()) / temperature)
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * logit_scale)
    for a, b in zip(got_g, ref_g, strict=True):
        rtol = tol if dtype in (torch.float32, torch.float64) else 2e-2
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * (float(b.abs().max()) or 1.0) * 4)


@SETTINGS
@given(z=hostile_logits())
def test_rho_one_keeps_only_the_argmaxes(z):
    zc = z.to(compute_dtype(z.dtype))
    is_max = zc == zc.amax(-1, keepdim=True)
    assert torch.equal(safe_mask(z, 1.0), is_max)
    # π^mp is uniform over the tied maxima
    tokens = zc.argmax(-1)
    n_ties = is_max.sum(-1).to(zc.dtype)
    torch.testing.assert_close(token_logprobs(z, tokens, 1.0), -n_ties.log())


@SETTINGS
@given(
    z=hostile_logits(lo=-300.0, hi=300.0, neg_inf=False),
    rho=st.sampled_from([1e-300, 5e-324]),
    data=st.data(),
)
def test_tiny_rho_is_plain_log_softmax(z, rho, data):
    """When every logit is within −log ρ (≥ 690) of the max, nothing is pruned: DVP = log-softmax."""
    rows, vocab = z.shape
    tokens = torch.tensor(data.draw(st.lists(st.integers(0, vocab - 1), min_size=rows, max_size=rows)))
    assert bool(safe_mask(z, rho).all())
    stt = token_stats(z, tokens, rho)
    plain = token_stats(z, tokens, None)
    assert torch.equal(stt.logp, plain.logp)
    assert torch.equal(stt.logz, torch.zeros_like(stt.logz))
    assert torch.equal(stt.safe_size, torch.full_like(stt.safe_size, vocab))
    torch.testing.assert_close(stt.entropy, plain.entropy)


@SETTINGS
@given(z=hostile_logits(lo=-50.0, hi=50.0), rho=st.one_of(st.none(), rhos))
def test_pruned_policy_is_normalised(z, rho):
    """Σ_a π^mp(a) = 1 over the whole vocabulary (pruned tokens contribute exactly 0)."""
    rows, vocab = z.shape
    every = z.unsqueeze(1).expand(rows, vocab, vocab)  # (R, V, V) stride-0 view: the no-copy path
    tokens = torch.arange(vocab).expand(rows, vocab)
    logp = token_logprobs(every, tokens, rho)  # (R, V)
    tol = 1e-12 if z.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(rows, dtype=logp.dtype), rtol=tol, atol=tol)


@SETTINGS
@given(z=hostile_logits(lo=-60.0, hi=60.0), a=rhos, b=rhos)
def test_safe_sets_are_nested_in_rho(z, a, b):
    small, large = min(a, b), max(a, b)
    keep_small, keep_large = safe_mask(z, small), safe_mask(z, large)
    assert bool((keep_small | ~keep_large).all())  # V_S(large ρ) ⊆ V_S(small ρ)


@SETTINGS
@given(
    data=st.data(),
    vocab=st.integers(2, 40),
    eps=st.floats(0.0, 2.0),
    spread=st.floats(0.1, 20.0),
)
def test_prop_4_2_bound_holds(data, vocab, eps, spread):
    """|log softmax(z + δ)_a − log softmax(z)_a| ≤ 2ε(1 − p_a e^{−2ε}) for ‖δ‖∞ ≤ ε (fp64)."""
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(8, vocab, generator=g, dtype=torch.float64) * spread  # (8, V)
    unit = torch.rand(8, vocab, generator=g, dtype=torch.float64) * 2 - 1
    if data.draw(st.booleans()):  # the extreme: δ = ±ε everywhere
        unit = unit.sign()
    delta = eps * unit  # ‖δ‖∞ ≤ ε
    tokens = torch.randint(0, vocab, (8,), generator=g)
    logp = token_logprobs(z, tokens)
    gap = (token_logprobs(z + delta, tokens) - logp).abs()
    bound = 2 * eps * (1 - logp.exp() * math.exp(-2 * eps))
    assert bool((gap <= bound + 1e-12).all()), (gap - bound).max()
    assert bool((gap <= 2 * eps + 1e-12).all())
