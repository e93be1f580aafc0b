"""The fused LM head (workbench.dvp.lm_head_token_logprobs / lm_head_token_stats) against the naive reference:
full logits ``F.linear(hidden, W, b)`` → ``token_logprobs_reference`` / ``token_stats``, values and the gradients
of hidden, weight and bias, over dtypes × ρ × temperature × bias × chunk sizes; ties at the cut, ±1e4 logits,
tied and untied heads, memory, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from workbench import dvp
from workbench.dvp import (
    DEFAULT_RHO,
    MASK_MARGIN,
    fused_token_logprobs,
    lm_head_token_logprobs,
    lm_head_token_logprobs_reference,
    lm_head_token_stats,
    log_rho_cut,
    token_logprobs,
    token_logprobs_reference,
    token_stats,
)
from workbench.memory import peak_bytes

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LOW = (torch.bfloat16, torch.float16)


def make_head(
    rows: int,
    hidden: int,
    vocab: int,
    *,
    seed: int,
    dtype: torch.dtype,
    bias: bool = False,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Hidden states, a head whose logits have a heavy tail (ρ = e^-13 really prunes), a bias, tokens."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, dtype=torch.float64)  # (N, H)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * scale  # (V, H)
    w[: vocab // 4] *= 3.0  # a quarter of the ids far above the rest for some rows
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    return h.to(dtype), w.to(dtype), (None if b is None else b.to(dtype)), tokens


def value_and_grads(fn, tensors: list[torch.Tensor], upstream: torch.Tensor) -> tuple[torch.Tensor, list]:
    """(fn(*leaves), d(Σ upstream · value)/d leaves) with fresh leaf copies of ``tensors``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), leaves)
    return out.detach(), list(grads)


def close_grads(got: list[torch.Tensor], ref: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Gradients in the inputs' dtype: 1e-5 (fp32) / 1e-10 (fp64) relative; bf16/fp16 at their resolution.

    A low-precision gradient is rounded to its dtype once by the reference and, for the hidden states, once
    per vocabulary tile here (the shares are added in fp32), so the tolerance is relative to the largest
    entry.
    """
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape
        scale = float(r.abs().max()) or 1.0
        rtol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)
        torch.testing.assert_close(g, r, rtol=rtol, atol=rtol * scale)


# ----------------------------------------------------------------------------------------------------
# fused == naive reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rho", [None, DEFAULT_RHO, 0.05, 1.0], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_values_and_grads_match_reference(dtype, rho, temperature, bias):
    h, w, b, tokens = make_head(23, 12, 157, seed=7, dtype=dtype, bias=bias, scale=2.0)
    tokens[:4] = F.linear(h, w, b).float().argmax(-1)[:4]  # some certainly kept tokens
    upstream = torch.randn(23, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [h, w] + ([b] if bias else [])

    def ref_fn(hh, ww, bb=None):
        return lm_head_token_logprobs_reference(hh, ww, tokens, rho, bias=bb, temperature=temperature)

    ref_v, ref_g = value_and_grads(ref_fn, leaves, upstream)
    for chunk in (1, 5, None):

        def fn(hh, ww, bb=None, c=chunk):
            return lm_head_token_logprobs(hh, ww, tokens, rho, bias=bb, temperature=temperature, chunk_size=c)

        v, g = value_and_grads(fn, leaves, upstream)
        assert v.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(v, ref_v, rtol=tol, atol=tol)
        close_grads(g, ref_g, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rho", [None, DEFAULT_RHO, 0.2], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_stats_match_token_stats_on_the_logits(dtype, rho, temperature):
    h, w, b, tokens = make_head(3 * 5, 8, 211, seed=3, dtype=dtype, bias=True, scale=2.0)
    h, tokens = h.view(3, 5, 8), tokens.view(3, 5)  # leading dims are kept
    ref = token_stats(F.linear(h, w, b), tokens, rho, temperature=temperature)
    for chunk in (2, None):
        st = lm_head_token_stats(h, w, tokens, rho, bias=b, temperature=temperature, chunk_size=chunk)
        assert st.logp.shape == tokens.shape
        # F.linear on the full batch and on row blocks round alike, so the numbers are the same
        torch.testing.assert_close(st.logp, ref.logp.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st.logz, ref.logz, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st.entropy, ref.entropy, rtol=1e-6, atol=1e-6)
        assert torch.equal(st.safe_size, ref.safe_size)
        assert not (st.logz.requires_grad or st.entropy.requires_grad or st.safe_size.requires_grad)
        same = lm_head_token_logprobs(h, w, tokens, rho, bias=b, temperature=temperature, chunk_size=chunk)
        assert torch.equal(st.logp.detach(), same)


def exact_head(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, weight) whose logits are exactly ``z`` [N, V]: identity hidden states, ``W = zᵀ``.

    Every logit is one product ``z · 1`` plus zeros, exact in every dtype, so ties and cut-edge values
    survive the matmul bit for bit.
    """
    return torch.eye(z.shape[0], dtype=z.dtype), z.t().contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_at_the_threshold_are_kept(dtype):
    rho = math.exp(-2.0)
    cut = log_rho_cut(rho, dtype if dtype == torch.float64 else torch.float32)
    below = float(torch.nextafter(torch.tensor(cut, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)))
    z = torch.tensor(
        [
            [
                0.0,
                cut,
                below,
                cut,
                -30.0,
            ],  # two tokens exactly at max + log ρ: kept; the next float below: not
            [5.0, 5.0, 5.0 + cut, 5.0 + below, 1.0],  # tied maxima; shifted cut-edge values
            [1e4, -1e4, 1e4, 9990.0, 1e4 + cut],  # ±1e4
        ],
        dtype=torch.float64,
    ).to(dtype)
    h, w = exact_head(z)
    tokens = torch.tensor([1, 3, 4])
    for r in (rho, 1.0):
        ref = token_stats(z, tokens, r)
        st = lm_head_token_stats(h, w, tokens, r, chunk_size=1)
        assert torch.equal(st.safe_size, ref.safe_size)
        assert torch.equal(st.logp, ref.logp.detach()) and torch.equal(st.logz, ref.logz)
        up = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
        _, ref_g = value_and_grads(
            lambda hh, ww, r=r: lm_head_token_logprobs_reference(hh, ww, tokens, r), [h, w], up
        )
        _, got_g = value_and_grads(
            lambda hh, ww, r=r: lm_head_token_logprobs(hh, ww, tokens, r, chunk_size=1), [h, w], up
        )
        close_grads(got_g, ref_g, dtype)
    assert st.safe_size[:2].tolist() == [1, 2]  # ρ = 1: only the tied maxima
    assert lm_head_token_stats(h, w, tokens, rho).safe_size[:2].tolist() == [3, 3]  # (row 3 rounds per dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rho", [None, DEFAULT_RHO, 0.2], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_second_rho_membership_and_full_logp_from_the_fused_pass(dtype, rho, temperature):
    """TokenStats.outside(ρ') from the fused pass is metrics.boundary_tokens on the logits, for any ρ' (the
    trainer's tail count at e^-13 whatever ρ it trains with); full_logp is the unpruned log-softmax."""
    from workbench.metrics import boundary_tokens

    h, w, b, tokens = make_head(4 * 6, 8, 211, seed=5, dtype=dtype, bias=True, scale=2.0)
    h, tokens = h.view(4, 6, 8), tokens.view(4, 6)
    tokens[:, 0] = F.linear(h[:, 0], w, b).argmax(-1)  # argmaxes: inside every safe set
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.2
    logits = F.linear(h, w, b)  # (4, 6, V) the same logits the blocks make
    for st in (
        lm_head_token_stats(h, w, tokens, rho, bias=b, temperature=temperature, chunk_size=5),
        token_stats(logits, tokens, rho, temperature=temperature),
    ):
        for other in (None, DEFAULT_RHO, 0.2, 0.9, 1.0):
            want = boundary_tokens(logits, tokens, other, mask=mask, temperature=temperature)
            assert torch.equal(st.outside(other, mask), want), other
        assert st.outside(DEFAULT_RHO).any() and not st.outside(1.0)[:, 0].any()
        ref = torch.log_softmax(logits.to(st.full_logp.dtype) / temperature, -1).gather(-1, tokens[..., None])
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(st.full_logp, ref[..., 0], rtol=tol, atol=tol)
        assert not (st.gap.requires_grad or st.full_logp.requires_grad) and (st.gap <= 0).all()
    with pytest.raises(ValueError, match="no gap"):
        dvp.TokenStats(logp=st.logp, logz=st.logz, entropy=st.entropy, safe_size=st.safe_size).outside(0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rho", [None, DEFAULT_RHO], ids=str)
def test_huge_logits_and_pruned_tokens(dtype, rho):
    """±1e4 logits: finite values and gradients, pruned tokens at −MASK_MARGIN − log S with no own gradient."""
    z = torch.tensor([[1e4, -1e4, 9999.0, 0.0], [-1e4, -1e4, -9990.0, -1e4]], dtype=torch.float64).to(dtype)
    h, w = exact_head(z)
    tokens = torch.tensor([1, 2])
    upstream = torch.tensor([1.0, -2.0], dtype=torch.float64)
    ref_v, ref_g = value_and_grads(
        lambda hh, ww: lm_head_token_logprobs_reference(hh, ww, tokens, rho), [h, w], upstream
    )
    v, g = value_and_grads(lambda hh, ww: lm_head_token_logprobs(hh, ww, tokens, rho), [h, w], upstream)
    assert bool(torch.isfinite(v).all()) and all(bool(torch.isfinite(x.float()).all()) for x in g)
    torch.testing.assert_close(v, ref_v, rtol=1e-6, atol=1e-6)
    close_grads(g, ref_g, dtype)
    if rho is not None:  # token 1 of row 0 is 2e4 below the max: pruned, finite
        assert float(v[0]) < -MASK_MARGIN + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tied_and_untied_heads_in_a_tiny_lm(dtype, tied):
    """A two-layer LM (embedding → tanh MLP → head): every parameter's gradient as with materialised logits.

    With a tied head the embedding gets gradient from both the input lookup and the head.
    """
    vocab, dim, bsz, seq = 97, 16, 3, 6
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(vocab, dim, generator=g).to(dtype)
    mix = (torch.randn(dim, dim, generator=g) / dim**0.5).to(dtype)
    head = emb if tied else torch.randn(vocab, dim, generator=g).to(dtype)
    ids = torch.randint(0, vocab, (bsz, seq + 1), generator=g)
    upstream = torch.randn(bsz, seq, generator=g, dtype=torch.float64)
    params = [emb, mix] + ([] if tied else [head])

    def lm(use_fused: bool):
        def fn(e, m, hd=None):
            hd = e if hd is None else hd
            hidden = torch.tanh(e[ids] @ m)[:, :-1]  # (B, T, H) a non-contiguous slice
            if use_fused:
                return lm_head_token_logprobs(hidden, hd, ids[:, 1:], DEFAULT_RHO, chunk_size=4)
            return token_logprobs_reference(F.linear(hidden, hd), ids[:, 1:], DEFAULT_RHO)

        return fn

    ref_v, ref_g = value_and_grads(lm(False), params, upstream)
    v, grads = value_and_grads(lm(True), params, upstream)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)
    close_grads(grads, ref_g, dtype)


def test_frozen_head_and_no_grad():
    h, w, b, tokens = make_head(9, 6, 50, seed=2, dtype=torch.float32, bias=True)
    x = h.clone().requires_grad_(True)
    lm_head_token_logprobs(x, w, tokens, DEFAULT_RHO, bias=b).sum().backward()  # head and bias frozen
    ref = h.clone().requires_grad_(True)
    lm_head_token_logprobs_reference(ref, w, tokens, DEFAULT_RHO, bias=b).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)
    with torch.no_grad():
        out = lm_head_token_logprobs(h.requires_grad_(True), w, tokens, DEFAULT_RHO)
    assert not out.requires_grad


def test_autocast_does_not_change_results():
    h, w, _, tokens = make_head(10, 8, 64, seed=4, dtype=torch.float32)
    plain = lm_head_token_logprobs(h, w, tokens, DEFAULT_RHO)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = lm_head_token_logprobs(h, w, tokens, DEFAULT_RHO)
    assert cast.dtype == torch.float32 and torch.equal(cast, plain)


def test_alias_scalar_and_empty_shapes():
    assert fused_token_logprobs is lm_head_token_logprobs
    h, w, _, tokens = make_head(1, 4, 10, seed=0, dtype=torch.float32)
    one = lm_head_token_logprobs(h[0], w, tokens[0], DEFAULT_RHO)  # [H] hidden, scalar token
    assert one.shape == () and torch.equal(one, token_logprobs(F.linear(h[0], w), tokens[0], DEFAULT_RHO))
    empty = lm_head_token_stats(torch.zeros(0, 3, 4), w, torch.zeros(0, 3, dtype=torch.long), DEFAULT_RHO)
    assert empty.logp.shape == (0, 3) and empty.safe_size.shape == (0, 3)


# ----------------------------------------------------------------------------------------------------
# memory: a few [chunk, V]-sized buffers, never [N, V]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_memory_is_a_few_blocks_not_the_logits(dtype):
    rows, dim, vocab, chunk = 256, 32, 4096, 8
    block = chunk * vocab * 4  # one fp32 [chunk, V] block; the backward's [N, cols] tiles hold as many
    h, w, _, tokens = make_head(rows, dim, vocab, seed=0, dtype=dtype)
    small = 4 * rows * dim * 4 + rows * 64 + 64 * 1024  # [N, H] accumulators, [N] statistics, bookkeeping

    fwd = peak_bytes(lambda: lm_head_token_logprobs(h, w, tokens, DEFAULT_RHO, chunk_size=chunk))
    # fp32: the logits block is its own workspace; bf16: a bf16 block + the fp32 workspace
    assert fwd <= (block if dtype == torch.float32 else block * 3 // 2) + small

    x, wx = h.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def fwd_bwd() -> None:
        lm_head_token_logprobs(x, wx, tokens, DEFAULT_RHO, chunk_size=chunk).sum().backward()

    grads = w.numel() * w.element_size() + h.numel() * h.element_size()  # .grad of weight and hidden
    assert peak_bytes(fwd_bwd) <= grads + 2 * block + small

    logits_bytes = rows * vocab * torch.finfo(dtype).bits // 8
    naive = peak_bytes(lambda: token_logprobs(F.linear(h, w), tokens, DEFAULT_RHO, chunk_size=chunk))
    assert naive >= logits_bytes  # the unfused path holds the [N, V] logits
    assert fwd * 5 < naive


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rho", [DEFAULT_RHO, 1.0], ids=str)
def test_cut_found_in_row_slices(monkeypatch, dtype, rho):
    """The forward finds each row's cut (for the recomputing backward) a few rows at a time: with 2-row slices
    of 5-row blocks (slices 2, 2, 1) values and gradients still equal the reference, and with grad-requiring
    inputs the forward's peak is the block plus two one-row slices, not two more blocks. ρ = 1 puts the
    argmax exactly on the cut, where a wrong cut would drop it."""
    h, w, _, tokens = make_head(23, 12, 157, seed=3, dtype=dtype, scale=2.0)
    tokens[:5] = F.linear(h, w).float().argmax(-1)[:5]
    upstream = torch.randn(23, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref_v, ref_g = value_and_grads(
        lambda hh, ww: lm_head_token_logprobs_reference(hh, ww, tokens, rho), [h, w], upstream
    )
    monkeypatch.setattr(dvp, "CUT_SLICE_ELEMENTS", 2 * 157)
    v, g = value_and_grads(
        lambda hh, ww: lm_head_token_logprobs(hh, ww, tokens, rho, chunk_size=5), [h, w], upstream
    )
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)
    close_grads(g, ref_g, dtype)

    rows, dim, vocab, chunk = 64, 8, 8192, 16
    block = chunk * vocab * 4  # fp32 [chunk, V]
    monkeypatch.setattr(dvp, "CUT_SLICE_ELEMENTS", vocab)  # one-row slices: 5 bytes an element
    x, wx, _, tok = make_head(rows, dim, vocab, seed=0, dtype=dtype)
    x.requires_grad_(True)
    wx.requires_grad_(True)
    small = 4 * rows * dim * 4 + rows * 64 + 64 * 1024
    fwd = peak_bytes(lambda: lm_head_token_logprobs(x, wx, tok, DEFAULT_RHO, chunk_size=chunk))
    assert fwd <= (block if dtype == torch.float32 else block * 3 // 2) + 5 * vocab + small


# ----------------------------------------------------------------------------------------------------
# bad input: ValueError naming the argument, the value and the fix


def test_bad_inputs():
    h, w, b, tokens = make_head(4, 6, 20, seed=0, dtype=torch.float32, bias=True)
    with pytest.raises(ValueError, match="hidden must be a floating-point tensor"):
        lm_head_token_logprobs(h.long(), w, tokens)
    with pytest.raises(ValueError, match=r"weight must be the output layer's \[V, H\] matrix"):
        lm_head_token_logprobs(h, w[0], tokens)
    with pytest.raises(ValueError, match=r"H, dtype and device must match; .*hidden\.to\(weight\.dtype\)"):
        lm_head_token_logprobs(h.bfloat16(), w, tokens)
    with pytest.raises(ValueError, match=r"H, dtype and device must match"):
        lm_head_token_logprobs(h[:, :5], w, tokens)
    with pytest.raises(ValueError, match=r"bias \(19,\) torch.float32 on cpu must be \[V\] = \[20\]"):
        lm_head_token_logprobs(h, w, tokens, bias=b[:19])
    with pytest.raises(ValueError, match=r"tokens\.shape=\(3,\) must equal hidden\.shape\[:-1\]=\(4,\)"):
        lm_head_token_logprobs(h, w, tokens[:3])
    with pytest.raises(ValueError, match=r"ids in \[0, V\) = \[0, 20\) \(got min=0, max=20\)"):
        lm_head_token_logprobs(h, w, torch.tensor([0, 1, 2, 20]))
    with pytest.raises(ValueError, match=r"rho=0\.0 must be in \(0, 1\]"):
        lm_head_token_logprobs(h, w, tokens, 0.0)
    with pytest.raises(ValueError, match=r"temperature=0 must be a finite number"):
        lm_head_token_stats(h, w, tokens, temperature=0)
    with pytest.raises(ValueError, match=r"chunk_size=0 must be an int >= 1"):
        lm_head_token_stats(h, w, tokens, chunk_size=0)


def test_rows_without_finite_max_raise():
    h, w, _, tokens = make_head(3, 4, 10, seed=0, dtype=torch.float32)
    h[1, 0] = math.nan
    with pytest.raises(ValueError, match=r"1 row\(s\) without a finite maximum"):
        lm_head_token_logprobs(h, w, tokens, DEFAULT_RHO)


def test_auto_chunk_grows_to_a_share_of_the_logits():
    """No chunk_size: DEFAULT_BLOCK_BYTES blocks as token_logprobs', grown to 1/HEAD_BLOCK_SHARE of the logits
    the head avoids (each block is a matmul against the whole output layer) up to HEAD_MAX_ROWS; never more
    rows than there are; an explicit chunk_size is obeyed."""
    vocab = 151_936
    assert dvp._auto_chunk(vocab, None) == 110  # the 64 MiB rule alone
    # fp32: 1/10 of N × V (409 rows), rounded down to a multiple of 64 rows
    assert dvp._head_chunk(vocab, 4096, None, 4) == 384 and 4096 // dvp.HEAD_BLOCK_SHARE == 409
    # bf16: the logits are half the bytes and a block needs 6 bytes an element (bf16 block + fp32 workspace)
    assert dvp._head_chunk(vocab, 4096, None, 2) == 128 and 4096 * 2 // (6 * dvp.HEAD_BLOCK_SHARE) == 136
    assert dvp._head_chunk(vocab, 600, None, 4) == 110  # 60 rows: below one multiple, the 64 MiB rule wins
    assert dvp._head_chunk(vocab, 1400, None, 4) == 128  # 140 rows → 128
    assert dvp._head_chunk(vocab, 1 << 20, None, 4) == dvp.HEAD_MAX_ROWS
    assert dvp._head_chunk(vocab, 512, None, 4) == 110  # few rows: the 64 MiB rule
    assert dvp._head_chunk(vocab, 100, None, 4) == 100  # never more rows than there are
    assert dvp._head_chunk(8192, 4096, None, 4) == dvp._auto_chunk(8192, None) == 2048  # small V: 64 MiB rule
    assert dvp._head_chunk(vocab, 4096, 7, 4) == 7
    h, w, _, tokens = make_head(300, 4, vocab, seed=1, dtype=torch.bfloat16, scale=3.0)
    got = lm_head_token_logprobs(h, w, tokens, DEFAULT_RHO)
    torch.testing.assert_close(got, lm_head_token_logprobs_reference(h, w, tokens, DEFAULT_RHO))
