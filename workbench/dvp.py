"""Dynamic vocabulary pruning (DVP): the min-p safe set and log-probs of the pruned policy ``π^mp``.

THEORY.md, Section 5. With trainer logits ``z`` (already divided by the sampling temperature) the safe set
is ``V_S = {a : z_a − max_b z_b ≥ log ρ}`` (equivalently ``π(a) ≥ ρ · max_b π(b)``) and the pruned policy
is ``π^mp(a) = π(a) 1[a ∈ V_S] / Z`` with retained mass ``Z = Σ_{a ∈ V_S} π(a)``. The argmax is always in
``V_S`` (its shifted logit is 0 ≥ log ρ), so ``Z > 0`` and ``π^mp`` is a proper distribution.

The naive way to compute ``log π^mp`` of the sampled tokens is
``log_softmax(where(mask, z, MASK)).gather(tokens)``: it builds a bool ``[N, V]`` mask, a masked ``[N, V]``
copy and an ``[N, V]`` log-softmax (≈ 2.3 fp32 copies of the logits; at ``V = 151,936`` and 4096 rows
that is 5.7 GB on top of the 2.5 GB of logits). This module computes the same numbers in one fused pass
over row chunks that reuses a single ``[chunk, V]`` fp32 workspace: per chunk, the row max, the shifted
logits written into the workspace, the sampled tokens' shifted logits, the safe-set cut (one in-place
``threshold_``), ``exp_`` and a row sum. The backward pass (:class:`_MaskedLogProb`) recomputes the same
chunk from the saved logits and writes ``(onehot − π^mp) · g / T`` straight into the gradient, so with
autograd the only ``[N, V]`` tensor created is the gradient itself. Every fast function has a naive
``*_reference`` twin; the tests check they agree over shapes × dtypes, gradients included.

:func:`lm_head_token_logprobs` / :func:`lm_head_token_stats` go one step further and start from the final
hidden states and the output layer: the same pass runs on row blocks of logits made on the fly, and the
backward pass (:class:`_HeadLogProb`) recomputes the logits over vocabulary tiles, so neither the ``[N, V]``
logits nor their gradient ever exist.

Choices, and why:

1. **The mask value is finite:** masked logits become ``max(z) − MASK_MARGIN`` with ``MASK_MARGIN = 1000``
   (THEORY.md: "``max(z) − C`` with ``C ≫ −log ρ``"). 1000 exceeds ``−log`` of the smallest positive
   float64 (744.4), so every masked logit lies below every kept one for any representable ρ;
   ``exp(−1000)`` is exactly 0 in fp32 and fp64, so in :func:`masked_logits` masked tokens add exactly
   nothing to the normaliser, ``Z`` or the entropy (the fast path gets the same sums, item 5); and a
   masked token's log-prob is ``−1000 − log Σ_{V_S} e^{z − max}``: finite, so downstream
   ``0 · log p`` terms and log-ratio clamps never meet ``−inf`` or NaN. (The paper's fixed ``−50`` is
   wrong for rows whose logits all lie below −50; a row-relative value is shift-invariant.)
2. **The mask is computed without gradient** (it is piecewise constant in θ); gradients flow only
   through the kept logits: ``∂ log π^mp(a) / ∂z_b = (1[a = b, a ∈ V_S] − π^mp(b)) / T`` for ``b ∈ V_S``
   and 0 outside. A pruned token's value ``max − MASK_MARGIN − lse`` follows the row max, but (as in the
   naive ``masked_fill`` with a constant) the fill value is a constant to autograd, so its gradient is
   ``−π^mp / T``: finite and bounded, and such boundary tokens should be masked out of the loss anyway.
3. **Accumulation in fp32** for bf16/fp16 (and any lower precision) logits; fp64 logits are computed in
   fp64. Results are fp32 (fp64 for fp64 logits, which is what ``gradcheck`` needs).
4. **The cut is exact and shared:** every function here (fast or reference) decides membership with the
   same float comparison ``(z / T − max) ≥ log ρ`` in the compute dtype, so :func:`safe_mask`,
   :func:`token_logprobs` and the engines' sampler agree bit for bit on boundary tokens.
5. **``exp`` never sees arguments below ≈ −87** (fp32): pruned logits are parked at, and far-tail logits
   clamped up to, a floor whose ``exp`` is a normal number (:func:`_exp_floor`). CPUs take a 15–40×
   slower path for ``exp`` results that underflow; the floor changes no sum by more than its rounding.
   The backward pass then zeroes ``π^mp`` outside the safe set exactly.
6. **Rows without a finite maximum** (all ``−inf``, or containing ``+inf`` or NaN) raise ``ValueError``:
   ``log π`` is undefined there. ``−inf`` entries in otherwise finite rows are fine.

Run the doctests: ``pytest --doctest-modules workbench/dvp.py``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "DEFAULT_RHO",
    "HEAD_BLOCK_SHARE",
    "HEAD_MAX_ROWS",
    "HEAD_ROW_MULTIPLE",
    "MASK_MARGIN",
    "TokenStats",
    "entropy_scaled_safe_mask",
    "fused_token_logprobs",
    "lm_head_token_logprobs",
    "lm_head_token_logprobs_reference",
    "lm_head_token_stats",
    "log_rho_cut",
    "masked_entropy",
    "masked_entropy_reference",
    "masked_logits",
    "retained_mass",
    "retained_mass_reference",
    "safe_mask",
    "safe_mask_reference",
    "safe_set_size",
    "safe_set_size_reference",
    "token_in_safe_set",
    "token_logprobs",
    "token_logprobs_reference",
    "token_stats",
    "validate_rho",
]

DEFAULT_RHO: float = math.exp(-13)
"""The paper's default min-p threshold ρ = e^−13 ≈ 2.26e-6 (Section 5)."""

MASK_MARGIN: float = 1000.0
"""Masked logits are set to ``max(z) − MASK_MARGIN``: finite, below every kept logit, and ``exp`` of it is 0."""

DEFAULT_BLOCK_BYTES: int = 64 * 2**20
"""With ``chunk_size=None`` the rows per chunk are chosen so one fp32 ``[chunk, V]`` workspace is ≤ 64 MiB.

(110 rows at ``V = 151,936``, 2048 at ``V = 8192``.) Measured on a shared 2-core CPU at V = 151,936:
64–128 MiB blocks were fastest (they stay in the last-level cache between the five passes over a
block); 16–32 row blocks were 1.5–2× slower (per-op threading overhead) and 512-row (311 MB) blocks
~1.3× slower. On a GPU pass an explicit ``chunk_size`` (e.g. 1024) for fewer kernel launches.
"""


# ----------------------------------------------------------------------------------------------------
# input checks


def validate_rho(rho: float | None, name: str = "rho") -> None:
    """Check a min-p threshold: ``None`` (no pruning) or a real number in ``(0, 1]``.

    Args:
        rho: the threshold to check.
        name: how the caller calls it, for the error message (e.g. ``"RLOOConfig.rho"``).

    Raises:
        ValueError: for NaN, ±inf, ρ ≤ 0, ρ > 1, booleans and non-numbers.

    >>> validate_rho(DEFAULT_RHO)
    >>> validate_rho(0.0)
    Traceback (most recent call last):
    ...
    ValueError: rho=0.0 must be in (0, 1] (or None for no pruning); use e.g. rho=math.exp(-13) (the paper's default, 2.26e-06)
    """
    if rho is None:
        return
    ok = isinstance(rho, numbers.Real) and not isinstance(rho, bool) and 0.0 < rho <= 1.0
    if not ok:  # NaN fails the range test too
        raise ValueError(
            f"{name}={rho!r} must be in (0, 1] (or None for no pruning); "
            f"use e.g. {name}=math.exp(-13) (the paper's default, {DEFAULT_RHO:.3g})"
        )


def _check_temperature(temperature: float) -> None:
    ok = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
    if not (ok and math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature={temperature!r} must be a finite number in (0, inf); "
            "use 1.0 for the raw policy, or the sampler's temperature"
        )


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(
            f"chunk_size={chunk_size!r} must be an int >= 1 (rows per chunk) or None; "
            "use None to size chunks automatically"
        )


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating-point tensor [..., V] (got {got}); pass logits.float()")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"logits.shape={tuple(logits.shape)} must be [..., V] with V >= 1 (the vocabulary is the last dim)"
        )


def _check_tokens(tokens: torch.Tensor, rows: torch.Tensor, vocab: int, name: str = "logits") -> None:
    """``tokens``: integer ids in ``[0, vocab)``, one per row of ``rows`` (``[..., V]`` logits or ``[..., H]``
    hidden states, called ``name`` in the messages), on its device."""
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.dtype == torch.bool:
        got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an integer tensor of token ids (got {got}); pass tokens.long()")
    if tokens.shape != rows.shape[:-1]:
        raise ValueError(
            f"tokens.shape={tuple(tokens.shape)} must equal {name}.shape[:-1]={tuple(rows.shape[:-1])} "
            f"(one token id per {name} row); for causal LMs pair {name}[:, :-1] with ids[:, 1:]"
        )
    if tokens.device != rows.device:
        raise ValueError(
            f"tokens are on {tokens.device} but {name} on {rows.device}; move both to one device"
        )
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"tokens must be ids in [0, V) = [0, {vocab}) (got min={lo}, max={hi}); replace padding ids "
                "with a valid id (e.g. 0) and mask those positions out of the loss"
            )


def _check_common(
    logits: torch.Tensor, rho: float | None, temperature: float, chunk_size: int | None
) -> None:
    _check_logits(logits)
    validate_rho(rho)
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)


def _raise_nonfinite(n_bad: int) -> None:
    raise ValueError(
        f"logits has {n_bad} row(s) without a finite maximum (all -inf, or containing +inf or NaN); "
        "log π is undefined there: check the model output (overflow?) and mask such rows before calling"
    )


# ----------------------------------------------------------------------------------------------------
# shared building blocks


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else (fp32, bf16, fp16, fp8, …) is accumulated in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_rho_cut(rho: float, dtype: torch.dtype) -> float:
    """``log ρ`` rounded to ``dtype``: the exact cut every safe-set rule compares ``z − max z`` with.

    >>> log_rho_cut(math.exp(-13), torch.float32)
    -13.0
    """
    return float(torch.tensor(math.log(rho), dtype=dtype))


def _below(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` number below ``value``, so ``x > _below(v) ⇔ x ≥ v`` for ``dtype`` numbers."""
    t = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype)))


_EXP_MIN = {torch.float32: -87.0, torch.float64: -708.0}
"""Smallest arguments whose ``exp`` is still a normal number (fp32: e^-87 = 1.6e-38 > 1.18e-38)."""


def _exp_floor(vocab: int, dtype: torch.dtype) -> float:
    """Where shifted logits are floored (and pruned ones parked) before ``exp``.

    ``exp`` of an argument below ≈ −87.3 (fp32) underflows into denormals or 0, and CPUs take a slow
    path for that: 15–40× slower than ordinary arguments (measured here: an ``exp_`` over
    ``[55, 151936]`` takes 40 ms for values in [−87, 0] and 600–2000 ms for values ≤ −88). Pruned
    tokens are parked at this floor instead, and tail logits are clamped up to it. Both then add at most
    ``V · e^floor`` to a sum that is ≥ 1 (the argmax contributes e^0): ≤ 1e-27 for ``V ≤ 2^24`` in fp32,
    far below its resolution, so the sums are unchanged. ``+ log V + 1`` keeps ``floor − log S`` (the
    backward's ``exp`` argument, ``S ≤ V``) fast too.
    """
    return _EXP_MIN[dtype] + math.log(vocab) + 1.0


def _pruned_fill(rho: float, vocab: int, dtype: torch.dtype) -> float:
    """Value pruned logits take before ``exp``: the fast floor when every kept ``π^mp`` stays above
    ``e^floor`` (``log ρ − log V > floor + 1``, i.e. ρ > ≈1e-26 at V = 151,936 in fp32), else ``−inf``
    (exact zeros the slow way, for astronomically small ρ)."""
    floor = _exp_floor(vocab, dtype)
    return floor if log_rho_cut(rho, dtype) - math.log(vocab) > floor + 1.0 else -math.inf


@dataclass(frozen=True)
class _Cut:
    """The constants of the safe-set cut for one ``(ρ, V, compute dtype)``, shared by forward and backward."""

    rho: float | None
    log_rho: float  # log ρ rounded to the compute dtype (log_rho_cut); unused without ρ
    below: float  # the largest number < log ρ: threshold_(s, below, fill) parks s < log ρ at fill
    fill: float  # where pruned shifted logits are parked before exp (_pruned_fill)
    floor: float  # where tail logits are clamped before exp (_exp_floor)
    zero_below: float  # exp(fill): backward values ≤ this are pruned tokens, zeroed exactly

    @classmethod
    def of(cls, rho: float | None, vocab: int, dtype: torch.dtype) -> _Cut:
        floor = _exp_floor(vocab, dtype)
        if rho is None:
            return cls(rho, -math.inf, -math.inf, floor, floor, 0.0)
        lr, fill = log_rho_cut(rho, dtype), _pruned_fill(rho, vocab, dtype)
        return cls(rho, lr, _below(lr, dtype), fill, floor, float(torch.tensor(fill, dtype=dtype).exp()))

    def park_(self, s: torch.Tensor) -> torch.Tensor:
        """In place: shifted logits ``s`` outside ``V_S`` to ``fill``, the far tail up to ``floor`` (fast ``exp``)."""
        return F.threshold_(s, self.below, self.fill) if self.rho is not None else s.clamp_(min=self.floor)


HEAD_BLOCK_SHARE: int = 10
"""With ``chunk_size=None`` the fused LM head (:func:`lm_head_token_logprobs`) lets a forward block's working
memory grow to ``1/HEAD_BLOCK_SHARE`` of the logits it avoids (``N × V`` in the inputs' dtype), in multiples of
:data:`HEAD_ROW_MULTIPLE` rows up to :data:`HEAD_MAX_ROWS`, where that is more than :data:`DEFAULT_BLOCK_BYTES`
allows. The backward's vocabulary tiles hold as many elements.

Each of its blocks is a matmul against the whole ``[V, H]`` output layer, and a matmul with few rows runs far
below full speed. Measured on 2 CPU cores at N = 4,096, H = 1,024, V = 151,936, fp32 (2026-12-05; unfused
path 26.6–26.8 s forward + backward, 2.4 GB of logits): the fused forward + backward took 44 s in 110-row
blocks (the 64 MiB rule), 35 s in 256-row ones, 33.9 s in 320-row, 33.4 s in 384-row (this rule: 0.09× the
unfused path's forward memory) and 32.2 s in 512-row ones (0.12×, over the 0.1× that issue 15 allows). In bf16
a block element costs 6 bytes (the bf16 block and its fp32 workspace), so the rule gives 128 rows.
"""

CUT_SLICE_ELEMENTS: int = 2**21
"""Elements (8 MiB in fp32) per slice when the fused head's forward finds each row's cut for the backward."""

HEAD_ROW_MULTIPLE: int = 64
"""A grown fused-LM-head block has a multiple of this many rows: measured as for :data:`HEAD_BLOCK_SHARE`, fp32
forward + backward took 35.4 s in 372-row blocks, 33.4 s in 384-row and 33.9 s in 320-row ones."""

HEAD_MAX_ROWS: int = 512
"""The most rows :data:`HEAD_BLOCK_SHARE` grows a fused-LM-head block to (311 MB in fp32 at V = 151,936)."""


def _auto_chunk(vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return int(chunk_size)
    return max(1, DEFAULT_BLOCK_BYTES // (4 * vocab))


def _head_chunk(vocab: int, rows: int, chunk_size: int | None, itemsize: int) -> int:
    """Rows per forward block of the fused LM head: ``chunk_size``; else :func:`_auto_chunk`, grown until a
    block's working memory is ``1/HEAD_BLOCK_SHARE`` of the logits (``rows × V`` elements of ``itemsize``
    bytes), rounded down to a multiple of :data:`HEAD_ROW_MULTIPLE`, up to :data:`HEAD_MAX_ROWS`; never more
    than ``rows``.

    A block's working memory per element is ``itemsize`` for fp32/fp64 (the block is its own workspace)
    and ``itemsize + 4`` for 16-bit inputs (the block plus its fp32 workspace).
    """
    auto = _auto_chunk(vocab, chunk_size)
    if chunk_size is None:
        work = itemsize if itemsize >= 4 else itemsize + 4  # bytes per block element
        share = rows * itemsize // (work * HEAD_BLOCK_SHARE)
        if share >= HEAD_ROW_MULTIPLE:  # matmuls of 64k rows run faster than their neighbours
            share -= share % HEAD_ROW_MULTIPLE
        auto = max(auto, min(share, HEAD_MAX_ROWS))
    return min(auto, max(rows, 1))


def _row_blocks(x: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_row, block)`` with ``block`` a 2-D ``[≤ chunk, V]`` view of ``x``'s rows in C order.

    Never copies: a non-viewable input such as ``logits[:, :-1]`` (a slice of ``[B, T, V]``) is walked
    one leading index at a time instead of being flattened with ``reshape`` (which would copy it).
    """
    vocab = x.shape[-1]
    try:
        flat = x.view(-1, vocab)  # (N, V)
    except RuntimeError:
        offset = 0
        for sub in x.unbind(0):
            for first, block in _row_blocks(sub, chunk):
                yield offset + first, block
            offset += sub.numel() // vocab
        return
    for i in range(0, flat.shape[0], chunk):
        yield i, flat[i : i + chunk]


def _shift_into(
    block: torch.Tensor, temperature: float, out: torch.Tensor, m: torch.Tensor | None = None
) -> torch.Tensor:
    """Write ``block / T − max`` (compute dtype) into ``out`` and return the row max ``[c, 1]``.

    Bit-identical to the references' ``z = logits.to(dtype) / T; z − z.amax()`` (upcasts are exact and
    the max of upcast values is the upcast of the max), so the safe-set cut agrees everywhere. Pass
    ``m`` to reuse a max computed earlier.
    """
    if temperature == 1.0:
        if m is None:
            m = block.amax(-1, keepdim=True).to(out.dtype)  # (c, 1); a bf16 max reads half the bytes
        if block.dtype == out.dtype:
            torch.sub(block, m, out=out)
        else:  # a mixed-dtype sub would allocate an upcast copy of the block: upcast into `out` instead
            out.copy_(block).sub_(m)
    else:
        out.copy_(block).div_(temperature)  # exact upcast, then the same division as the reference
        if m is None:
            m = out.amax(-1, keepdim=True)  # (c, 1)
        out.sub_(m)
    return m


def _scaled_reference(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.to(_compute_dtype(logits.dtype))  # (..., V)
    return z / temperature if temperature != 1.0 else z


# ----------------------------------------------------------------------------------------------------
# the fused chunked pass


@dataclass
class _Pass:
    logp: torch.Tensor  # (N,) log π^mp of the tokens
    m: torch.Tensor  # (N, 1) row max of z / T
    log_s: torch.Tensor  # (N, 1) log Σ_{a ∈ V_S} exp(z_a / T − m)
    keep_tok: torch.Tensor  # (N,) bool: token in V_S
    logz: torch.Tensor | None = None  # (N,) log Z
    entropy: torch.Tensor | None = None  # (N,) H(π^mp)
    safe_size: torch.Tensor | None = None  # (N,) |V_S|
    row_cut: torch.Tensor | None = None  # (N, 1) a cut between the pruned and the kept shifted logits
    gap: torch.Tensor | None = None  # (N,) the token's z / T − max z / T (stats only)
    full_logp: torch.Tensor | None = None  # (N,) log π(token) over the full vocabulary (stats only)


def _fused_pass(
    logits: torch.Tensor,
    tokens: torch.Tensor | None,
    rho: float | None,
    temperature: float,
    chunk_size: int | None,
    *,
    stats: bool,
) -> _Pass:
    """:func:`_blocks_pass` over the rows of ``logits``, with autocast off: every dtype is chosen explicitly."""
    vocab = logits.shape[-1]
    n = logits.numel() // vocab
    chunk = min(_auto_chunk(vocab, chunk_size), max(n, 1))
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _blocks_pass(
            _row_blocks(logits, chunk),
            (n, vocab),
            logits.dtype,
            logits.device,
            chunk,
            tokens,
            rho,
            temperature,
            stats=stats,
        )


def _blocks_pass(
    blocks: Iterable[tuple[int, torch.Tensor]],
    shape: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    chunk: int,
    tokens: torch.Tensor | None,
    rho: float | None,
    temperature: float,
    *,
    stats: bool,
    scratch: bool = False,
    row_cut: bool = False,
) -> _Pass:
    """One pass over ``(first_row, [≤ chunk, V] block)`` pairs covering ``n`` rows of ``dtype`` logits.

    ``tokens`` is ``(N,)`` int64 or None (then token outputs are junk). The blocks come from the logits
    (:func:`_row_blocks`) or are made on the fly from hidden states (:func:`_head_row_blocks`). Per block,
    all in one reused ``[chunk, V]`` workspace ``s`` (plus, for ``stats``, one bool block):
    ``s = z/T − max`` → gather the tokens' ``s`` → cut ``s < log ρ`` (one in-place ``threshold_``) →
    ``exp_`` → row sums. Nothing else of size ``[chunk, V]`` is allocated (the tests check this).
    ``shape`` is ``(N, V)``; ``dtype`` and ``device`` are the blocks'. With ``scratch`` the blocks are
    throwaway buffers the pass may overwrite, and fp32/fp64 ones serve as the workspace themselves.
    With ``row_cut`` (and ρ) each row also gets the midpoint between its largest pruned and smallest kept
    shifted logit, for a backward pass that recomputes the logits (:func:`_grad_logits_into`); that takes
    two buffers of :data:`CUT_SLICE_ELEMENTS`, not two more blocks.
    """
    n, vocab = shape
    cdt = _compute_dtype(dtype)
    k = _Cut.of(rho, vocab, cdt)
    in_place = scratch and dtype == cdt
    work = None if in_place else torch.empty(chunk, vocab, dtype=cdt, device=device)  # (chunk, V)
    pruned_work = (
        torch.empty(chunk, vocab, dtype=torch.bool, device=device) if stats and rho is not None else None
    )
    m_all = torch.empty(n, 1, dtype=cdt, device=device)
    row_cut = row_cut and rho is not None
    if row_cut:
        hi_pruned = torch.empty(n, 1, dtype=cdt, device=device)
        lo_kept = torch.empty(n, 1, dtype=cdt, device=device)
        cut_rows = max(1, min(chunk, CUT_SLICE_ELEMENTS // vocab))
        side = torch.empty(cut_rows, vocab, dtype=cdt, device=device)  # (r, V) one side of the cut
        below_cut = torch.empty(cut_rows, vocab, dtype=torch.bool, device=device)
    s_tok = torch.zeros(n, dtype=cdt, device=device)  # shifted logit of each token
    s_kept = torch.empty(n, 1, dtype=cdt, device=device)  # Σ_{V_S} exp(s)
    if stats:
        s_all = torch.empty(n, 1, dtype=cdt, device=device)  # Σ_V exp(s)
        e_log_e = torch.empty(n, 1, dtype=cdt, device=device)  # Σ_{V_S} exp(s) · s
        size = torch.full((n,), vocab, dtype=torch.long, device=device)
    for i, block in blocks:
        c = block.shape[0]
        s = block if in_place else work[:c]  # (c, V) shifted logits z / T − m
        m_all[i : i + c] = _shift_into(block, temperature, s)
        if tokens is not None:
            s_tok[i : i + c] = s.gather(1, tokens[i : i + c, None]).squeeze(1)
        if row_cut:
            _cut_sides_into(s, k.log_rho, below_cut, side, hi_pruned[i : i + c], lo_kept[i : i + c])
        if not stats:
            # pruned -> fill (≤ floor): exp is ≈ 0 and fast; without ρ the tail is clamped to the floor
            torch.sum(k.park_(s).exp_(), -1, keepdim=True, out=s_kept[i : i + c])
            continue
        # stats: every op is in place or reduces to [c]; the bool block marks pruned tokens exactly
        if rho is not None:
            pruned = pruned_work[:c]  # (c, V) bool
            torch.lt(s, k.log_rho, out=pruned)
        e = s.clamp_(min=k.floor).exp_()  # (c, V) exp(z/T − m), in place
        torch.sum(e, -1, keepdim=True, out=s_all[i : i + c])
        if rho is not None:
            e.masked_fill_(pruned, 0.0)  # exactly zero outside V_S
            torch.sum(e, -1, keepdim=True, out=s_kept[i : i + c])
        else:
            s_kept[i : i + c] = s_all[i : i + c]
        torch.sum(e.xlogy_(e), -1, keepdim=True, out=e_log_e[i : i + c])  # e · log e = e · s
        if rho is not None:  # |V_S| = V − #pruned; summing a bool tensor would allocate [c, V] int64
            size[i : i + c] = vocab - s.copy_(pruned).sum(-1).long()  # fp32 sums of 0/1 are exact < 2^24
    n_bad = int((~torch.isfinite(m_all)).sum())
    if n_bad:
        _raise_nonfinite(n_bad)
    log_s = s_kept.log_()  # (N, 1)
    if rho is None:
        keep_tok = torch.ones(n, dtype=torch.bool, device=device)
        logp = s_tok - log_s.squeeze(1)
    else:
        keep_tok = s_tok >= k.log_rho
        logp = torch.where(keep_tok, s_tok, -MASK_MARGIN) - log_s.squeeze(1)
    out = _Pass(logp=logp, m=m_all, log_s=log_s, keep_tok=keep_tok)
    if row_cut:  # nothing pruned: hi = −inf, and so is the cut
        out.row_cut = torch.where(hi_pruned > -math.inf, (hi_pruned + lo_kept) / 2, -math.inf)
    if stats:
        log_s_all = s_all.log_()
        out.logz = (
            (log_s - log_s_all).clamp_(max=0.0).squeeze(1) if rho is not None else torch.zeros_like(logp)
        )
        # H(π^mp) = log S − Σ e·s / S
        out.entropy = (log_s - e_log_e / log_s.exp()).clamp_(min=0.0).squeeze(1)
        out.safe_size = size
        out.gap = s_tok
        out.full_logp = s_tok - log_s_all.squeeze(1)
    return out


def _cut_sides_into(
    s: torch.Tensor,
    log_rho: float,
    below: torch.Tensor,
    side: torch.Tensor,
    hi_pruned: torch.Tensor,
    lo_kept: torch.Tensor,
) -> None:
    """Each row's largest pruned (``s < log ρ``) and smallest kept shifted logit of ``s [c, V]`` into
    ``hi_pruned`` / ``lo_kept [c, 1]`` (``−inf`` / ``inf`` where a side is empty), through the ``[r, V]``
    buffers ``below`` (bool) and ``side`` a slice of ``r`` rows at a time: a full ``[c, V]`` pair of
    buffers would be as large as the block itself (the fused head's memory bound) for the same five passes.
    """
    r = side.shape[0]
    inf = torch.tensor(math.inf, dtype=s.dtype, device=s.device)
    for j in range(0, s.shape[0], r):
        x = s[j : j + r]
        b, y = below[: x.shape[0]], side[: x.shape[0]]
        torch.lt(x, log_rho, out=b)
        torch.amax(torch.where(b, x, -inf, out=y), -1, keepdim=True, out=hi_pruned[j : j + r])
        torch.amin(torch.where(b, inf, x, out=y), -1, keepdim=True, out=lo_kept[j : j + r])


def _grad_logits_into(
    block: torch.Tensor,
    out: torch.Tensor,
    m: torch.Tensor,
    log_s: torch.Tensor,
    coef: torch.Tensor,
    tok_idx: torch.Tensor,
    tok_coef: torch.Tensor,
    temperature: float,
    k: _Cut,
    row_cut: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ``d(Σ g · log π^mp(tokens)) / d block`` into ``out``: ``coef · (onehot − π^mp)``, ``coef = g / T``.

    ``block`` is any ``[r, c]`` piece of the logits (full rows, or a column tile of every row): ``m`` and
    ``log_s`` are its rows' max and ``log Σ_{V_S}`` from the forward pass (``[r, 1]``), ``coef`` is
    ``[r, 1]``, and the one-hot part adds ``tok_coef [r, 1]`` at column ``tok_idx [r, 1]`` of each row
    (zero weight where the token is pruned or, for a tile, lies outside it). Recomputes ``π^mp`` in place.

    ``row_cut`` (``[r, 1]``, from the forward pass) replaces ``log ρ`` as the cut when ``block`` is
    recomputed rather than the very logits the forward pass saw: a matmul of another shape may round a
    logit differently (by an ulp or so), which must not move it across the cut — least of all the
    argmax, which sits exactly on the cut when ρ = 1. A cut halfway between the row's largest pruned and
    smallest kept shifted logit gives the forward pass's safe set unless rounding moves a logit by half
    that gap.
    """
    _shift_into(block, temperature, out, m)
    if row_cut is None:
        k.park_(out)
    else:
        out.masked_fill_(out < row_cut, k.fill)
    out.sub_(log_s).exp_()  # π^mp
    if k.zero_below > 0:
        F.threshold_(out, k.zero_below, 0.0)  # exactly 0 outside V_S: no gradient leaks there
    out.mul_(-coef)
    return out.scatter_add_(1, tok_idx, tok_coef)


class _MaskedLogProb(torch.autograd.Function):
    """``log π^mp(token)`` with a chunked, recomputing backward (no ``[N, V]`` activations are saved).

    Saves only the logits (which autograd keeps alive anyway), the tokens and two ``[N]`` row statistics;
    the backward pass recomputes ``π^mp`` chunk by chunk directly into the gradient buffer.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        rho: float | None,
        temperature: float,
        chunk_size: int | None,
        stats: bool,
    ) -> tuple[torch.Tensor, ...]:
        res = _fused_pass(logits, tokens, rho, temperature, chunk_size, stats=stats)
        ctx.save_for_backward(logits, tokens, res.m, res.log_s, res.keep_tok)
        ctx.rho, ctx.temperature, ctx.chunk_size = rho, temperature, chunk_size
        return _outputs(ctx, res, stats)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, g_logp: torch.Tensor, *_: torch.Tensor) -> tuple:  # type: ignore[override]
        logits, tokens, m_all, log_s, keep_tok = ctx.saved_tensors
        with torch.autocast(device_type=logits.device.type, enabled=False):
            grad = _backward_impl(
                logits, tokens, m_all, log_s, keep_tok, g_logp, ctx.rho, ctx.temperature, ctx.chunk_size
            )
        return grad, None, None, None, None, None


def _outputs(ctx: torch.autograd.function.FunctionCtx, res: _Pass, stats: bool) -> tuple[torch.Tensor, ...]:
    """A forward's outputs: ``(logp,)``, or ``(logp, log Z, entropy, |V_S|, gap, full log π)`` with only ``logp``
    differentiable."""
    if not stats:
        return (res.logp,)
    extra = (res.logz, res.entropy, res.safe_size, res.gap, res.full_logp)
    ctx.mark_non_differentiable(*extra)
    return (res.logp, *extra)


def _backward_impl(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    m_all: torch.Tensor,
    log_s: torch.Tensor,
    keep_tok: torch.Tensor,
    g_logp: torch.Tensor,
    rho: float | None,
    temperature: float,
    chunk_size: int | None,
) -> torch.Tensor:
    """``d/d logits Σ g · log π^mp(tokens)``, recomputed chunk by chunk into the gradient buffer."""
    vocab = logits.shape[-1]
    n = logits.numel() // vocab
    cdt = _compute_dtype(logits.dtype)
    chunk = min(_auto_chunk(vocab, chunk_size), max(n, 1))
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # (..., V)
    gflat = grad.view(-1, vocab)  # (N, V)
    direct = logits.dtype == cdt  # fp32/fp64: compute straight into the gradient
    work = None if direct else torch.empty(chunk, vocab, dtype=cdt, device=logits.device)
    k = _Cut.of(rho, vocab, cdt)
    coef_all = (g_logp.to(cdt) / temperature)[:, None]  # (N, 1)
    tok_coef = coef_all * keep_tok[:, None]  # (N, 1) the one-hot's weight: 0 for pruned tokens
    for i, block in _row_blocks(logits, chunk):
        rows = slice(i, i + block.shape[0])
        p = gflat[rows] if direct else work[: block.shape[0]]  # (c, V)
        _grad_logits_into(
            block,
            p,
            m_all[rows],
            log_s[rows],
            coef_all[rows],
            tokens[rows, None],
            tok_coef[rows],
            temperature,
            k,
        )
        if not direct:
            gflat[rows].copy_(p)
    return grad


# ----------------------------------------------------------------------------------------------------
# public fast functions


@torch.no_grad()
def safe_mask(
    logits: torch.Tensor, rho: float | None, *, temperature: float = 1.0, chunk_size: int | None = None
) -> torch.Tensor:
    """The min-p safe set ``V_S``: ``z_a / T − max_b z_b / T ≥ log ρ`` (the argmax is always kept).

    Computed without gradient, chunked over rows so only a ``[chunk, V]`` fp32 scratch block is used on
    top of the ``[..., V]`` bool result.

    Args:
        logits: ``[..., V]`` logits, any float dtype.
        rho: threshold in (0, 1]; ``None`` keeps everything. ρ = 1 keeps only the argmax(es).
        temperature: logits are divided by this first, as the sampler does.
        chunk_size: rows per chunk; ``None`` sizes chunks to :data:`DEFAULT_BLOCK_BYTES`.

    Returns:
        ``[..., V]`` bool, True for tokens in the safe set.

    >>> z = torch.tensor([[0.0, -1.0, -20.0], [3.0, 3.0, -9.0]])
    >>> safe_mask(z, rho=1e-3)  # log ρ = -6.9
    tensor([[ True,  True, False],
            [ True,  True, False]])
    >>> safe_mask(z, rho=1.0)  # ties at the max are all kept
    tensor([[ True, False, False],
            [ True,  True, False]])
    """
    _check_common(logits, rho, temperature, chunk_size)
    if rho is None:
        return torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    vocab = logits.shape[-1]
    n = logits.numel() // vocab
    cdt = _compute_dtype(logits.dtype)
    chunk = min(_auto_chunk(vocab, chunk_size), max(n, 1))
    lr = log_rho_cut(rho, cdt)
    out = torch.empty(logits.shape, dtype=torch.bool, device=logits.device)  # (..., V)
    oflat = out.view(-1, vocab)  # (N, V)
    work = torch.empty(chunk, vocab, dtype=cdt, device=logits.device)  # (chunk, V)
    m_all = torch.empty(n, 1, dtype=cdt, device=logits.device)
    for i, block in _row_blocks(logits, chunk):
        c = block.shape[0]
        m_all[i : i + c] = _shift_into(block, temperature, work[:c])
        torch.ge(work[:c], lr, out=oflat[i : i + c])
    n_bad = int((~torch.isfinite(m_all)).sum())
    if n_bad:
        _raise_nonfinite(n_bad)
    return out


@torch.no_grad()
def token_in_safe_set(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    rho: float | None,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Whether each given token lies in ``V_S``: ``safe_mask(logits, rho).gather(-1, tokens)`` without the mask.

    Only the row max and the token's own logit are needed, so nothing of size ``[..., V]`` is allocated; the
    arithmetic is the one :func:`safe_mask` does (upcast, divide by ``T``, subtract the max, compare with the
    same rounded ``log ρ``), so the answer is bit-identical to it.

    Args:
        logits: ``[..., V]`` logits, any float dtype.
        tokens: ``[...]`` integer token ids in ``[0, V)``.
        rho: min-p threshold in (0, 1]; ``None`` keeps everything.
        temperature: logits are divided by this first, as the sampler does.
        mask: optional ``[...]`` bool; rows where it is False are reported True and not checked (padding
            rows may hold NaN logits and any id).

    Returns:
        ``[...]`` bool.

    >>> z = torch.tensor([[0.0, -1.0, -20.0], [3.0, 3.0, -9.0]])
    >>> token_in_safe_set(z, torch.tensor([1, 2]), rho=1e-3)
    tensor([ True, False])
    """
    _check_common(logits, rho, temperature, None)
    if rho is None:
        return torch.ones(tokens.shape, dtype=torch.bool, device=logits.device)
    ok = torch.ones(tokens.shape, dtype=torch.bool, device=logits.device) if mask is None else mask
    cdt = _compute_dtype(logits.dtype)
    ids = torch.where(ok, tokens, 0).long()
    m = logits.amax(-1).to(cdt)  # (...,) the max of the upcast values is the upcast of the max
    z = logits.gather(-1, ids[..., None]).squeeze(-1).to(cdt)  # (...,)
    if temperature != 1.0:  # x ↦ x / T is monotone, so max(z / T) = max(z) / T exactly
        m, z = m / temperature, z / temperature
    n_bad = int((~torch.isfinite(m) & ok).sum())
    if n_bad:
        _raise_nonfinite(n_bad)
    return ((z - m) >= log_rho_cut(rho, cdt)) | ~ok


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    rho: float | None = None,
    *,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``log π^mp(token)`` for each row: the DVP log-prob of the given tokens (memory-lean, chunked).

    Equivalent to :func:`token_logprobs_reference`, i.e.
    ``log_softmax(where(safe_mask, z / T, max − MASK_MARGIN)).gather(tokens)``, and to plain
    ``log_softmax(z / T).gather(tokens)`` when ``rho`` is None, but never builds an ``[N, V]`` tensor
    beyond the logits (and, with autograd, their gradient): one ``[chunk, V]`` fp32 workspace is reused.
    A token outside the safe set gets ``−MASK_MARGIN − log Σ_{V_S} e^{z/T − max}`` (finite), and its own
    logit gets no gradient (module docstring, item 2).

    Args:
        logits: ``[..., V]`` logits (fp32/bf16/fp16/fp64; non-contiguous slices such as
            ``logits[:, :-1]`` are read in place, not copied).
        tokens: ``[...]`` integer token ids in ``[0, V)``, same leading shape as ``logits``.
        rho: min-p threshold in (0, 1]; ``None`` gives the plain log-softmax.
        chunk_size: rows per chunk (peak extra memory ≈ ``chunk_size × V × 4`` bytes); ``None`` sizes
            chunks to :data:`DEFAULT_BLOCK_BYTES`.
        temperature: logits are divided by this before masking and softmax (as the sampler does).

    Returns:
        ``[...]`` fp32 log-probs (fp64 for fp64 logits), differentiable w.r.t. ``logits``.

    >>> z = torch.tensor([[2.0, 1.0, -30.0]])
    >>> token_logprobs(z, torch.tensor([1]))  # plain log-softmax
    tensor([-1.3133])
    >>> token_logprobs(z, torch.tensor([1]), rho=1e-3)  # -30 is pruned: renormalised over {0, 1}
    tensor([-1.3133])
    >>> token_logprobs(z, torch.tensor([2]), rho=1e-3)  # pruned: finite, -MASK_MARGIN - log S
    tensor([-1000.3132])
    """
    _check_common(logits, rho, temperature, chunk_size)
    _check_tokens(tokens, logits, logits.shape[-1])
    flat_tokens = tokens.reshape(-1).long()  # (N,)
    (logp,) = _MaskedLogProb.apply(logits, flat_tokens, rho, float(temperature), chunk_size, False)
    return logp.view(tokens.shape)


@dataclass
class TokenStats:
    """Per-position DVP statistics from one pass over the logits (:func:`token_stats`).

    All tensors have the tokens' shape.
    """

    logp: torch.Tensor
    """``log π^mp(token)``, fp32, differentiable w.r.t. the logits (the loss uses it)."""
    logz: torch.Tensor
    """``log Z``, the log of the π-mass kept by the safe set (≤ 0; 0 when ρ is None), detached."""
    entropy: torch.Tensor
    """Entropy of ``π^mp`` in nats (plain entropy when ρ is None), detached."""
    safe_size: torch.Tensor
    """``|V_S|`` as int64 (``V`` when ρ is None), detached."""
    gap: torch.Tensor | None = None
    """The token's ``z / T − max_b z_b / T`` (≤ 0) in the compute dtype, detached: safe-set membership for any
    other ρ (:meth:`outside`) without the logits. ``None`` when the stats were assembled by hand."""
    full_logp: torch.Tensor | None = None
    """``log π(token)`` over the full vocabulary (no pruning), detached; ``None`` when assembled by hand."""

    def outside(self, rho: float | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens outside the safe set of ``rho`` (any ρ, not only the one the stats were computed with).

        The same comparison as :func:`token_in_safe_set` (``gap ≥ log ρ`` rounded to the compute dtype), so on
        the same logits it equals :func:`workbench.metrics.boundary_tokens` bit for bit; positions where
        ``mask`` is False are reported False.

        >>> st = token_stats(torch.tensor([[0.0, -1.0, -20.0], [0.0, -1.0, -20.0]]), torch.tensor([1, 2]))
        >>> st.outside(1e-3)
        tensor([False,  True])
        """
        if self.gap is None:
            raise ValueError(
                "these TokenStats carry no gap; compute them with token_stats / lm_head_token_stats"
            )
        if rho is None:
            out = torch.zeros(self.gap.shape, dtype=torch.bool, device=self.gap.device)
        else:
            validate_rho(rho)
            out = self.gap < log_rho_cut(rho, self.gap.dtype)
        return out if mask is None else out & mask


def token_stats(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    rho: float | None = None,
    *,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> TokenStats:
    """``log π^mp`` of the tokens plus ``log Z``, entropy and ``|V_S|``, all from one chunked pass.

    Same values as :func:`token_logprobs`, :func:`retained_mass` (as ``log Z``), :func:`masked_entropy`
    and :func:`safe_set_size`. Uses one ``[chunk, V]`` fp32 workspace plus (with ρ) one ``[chunk, V]``
    bool block. Only ``logp`` carries gradient.

    Args:
        logits: ``[..., V]`` logits.
        tokens: ``[...]`` token ids in ``[0, V)``.
        rho: min-p threshold in (0, 1], or ``None`` for no pruning.
        chunk_size: rows per chunk; ``None`` sizes chunks to :data:`DEFAULT_BLOCK_BYTES`.
        temperature: logits are divided by this first.

    Returns:
        A :class:`TokenStats`.

    >>> st = token_stats(torch.tensor([[2.0, 1.0, -6.0]]), torch.tensor([0]), rho=1e-3)
    >>> st.logp, st.logz.exp(), st.entropy, st.safe_size  # -6 is 8 nats below the max: pruned
    (tensor([-0.3133]), tensor([0.9998]), tensor([0.5822]), tensor([2]))
    """
    _check_common(logits, rho, temperature, chunk_size)
    _check_tokens(tokens, logits, logits.shape[-1])
    flat_tokens = tokens.reshape(-1).long()  # (N,)
    outs = _MaskedLogProb.apply(logits, flat_tokens, rho, float(temperature), chunk_size, True)
    return _token_stats_of(outs, tokens.shape)


def _token_stats_of(outs: tuple[torch.Tensor, ...], shape: torch.Size) -> TokenStats:
    logp, logz, ent, size, gap, full = (x.view(shape) for x in outs)
    return TokenStats(logp=logp, logz=logz, entropy=ent, safe_size=size, gap=gap, full_logp=full)


@torch.no_grad()
def _row_stats(logits: torch.Tensor, rho: float | None, temperature: float, chunk_size: int | None) -> _Pass:
    _check_common(logits, rho, temperature, chunk_size)
    return _fused_pass(logits, None, rho, float(temperature), chunk_size, stats=True)


def retained_mass(
    logits: torch.Tensor, rho: float | None, *, chunk_size: int | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """Retained mass ``Z = Σ_{a ∈ V_S} π(a)`` per row, in (0, 1]; ``1 − Z = D_TV(π, π^mp)`` (Prop 5.4).

    Args:
        logits: ``[..., V]`` logits.
        rho: min-p threshold in (0, 1]; ``None`` gives ones.
        chunk_size: rows per chunk; ``None`` sizes chunks automatically.
        temperature: logits are divided by this first.

    Returns:
        ``[...]`` fp32 (fp64 for fp64 logits), no gradient.

    >>> retained_mass(torch.tensor([[0.0, 0.0, -20.0]]), rho=None)
    tensor([1.])
    >>> retained_mass(torch.tensor([[0.0, -5.0]]), rho=0.01)  # drops e^-5 / (1 + e^-5)
    tensor([0.9933])
    """
    res = _row_stats(logits, rho, temperature, chunk_size)
    return res.logz.exp().view(logits.shape[:-1])


def masked_entropy(
    logits: torch.Tensor, rho: float | None = None, *, chunk_size: int | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """Entropy (nats) of ``π^mp`` per row; the plain softmax entropy when ``rho`` is None.

    Args:
        logits: ``[..., V]`` logits.
        rho: min-p threshold in (0, 1], or ``None``.
        chunk_size: rows per chunk; ``None`` sizes chunks automatically.
        temperature: logits are divided by this first.

    Returns:
        ``[...]`` fp32 (fp64 for fp64 logits), ≥ 0, no gradient.

    >>> masked_entropy(torch.zeros(1, 4))  # uniform over 4: log 4
    tensor([1.3863])
    >>> masked_entropy(torch.tensor([[0.0, 0.0, -20.0, -20.0]]), rho=1e-3)  # uniform over 2
    tensor([0.6931])
    """
    res = _row_stats(logits, rho, temperature, chunk_size)
    return res.entropy.view(logits.shape[:-1])


def safe_set_size(
    logits: torch.Tensor, rho: float | None, *, chunk_size: int | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """``|V_S|`` per row (int64, ≥ 1); ``V`` when ``rho`` is None.

    Args:
        logits: ``[..., V]`` logits.
        rho: min-p threshold in (0, 1], or ``None``.
        chunk_size: rows per chunk; ``None`` sizes chunks automatically.
        temperature: logits are divided by this first.

    Returns:
        ``[...]`` int64.

    >>> safe_set_size(torch.tensor([[0.0, -1.0, -20.0], [0.0, 0.0, 0.0]]), rho=1e-3)
    tensor([2, 3])
    """
    res = _row_stats(logits, rho, temperature, chunk_size)
    return res.safe_size.view(logits.shape[:-1])


# ----------------------------------------------------------------------------------------------------
# the LM head fused in: DVP log-probs from hidden states, the [N, V] logits never materialised


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        got = hidden.dtype if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a floating-point tensor [..., H] (got {got}); pass hidden.float()")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] < 1:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"weight must be the output layer's [V, H] matrix with V >= 1 (got {got}); "
            "pass model.get_output_embeddings().weight"
        )
    if weight.shape[1] != hidden.shape[-1] or weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"weight {tuple(weight.shape)} {weight.dtype} on {weight.device} does not fit hidden "
            f"{tuple(hidden.shape)} {hidden.dtype} on {hidden.device}: H, dtype and device must match; "
            "pass the final hidden states (after the last norm) with hidden.to(weight.dtype)"
        )
    if bias is not None and (
        bias.shape != weight.shape[:1] or bias.dtype != weight.dtype or bias.device != weight.device
    ):
        raise ValueError(
            f"bias {tuple(bias.shape)} {bias.dtype} on {bias.device} must be [V] = [{weight.shape[0]}] "
            f"{weight.dtype} on {weight.device} like the weight; pass the output layer's own bias (or None)"
        )


def _linear_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = x @ weight.T (+ bias)``: the call ``F.linear`` makes for 2-D input (``addmm`` with a bias)."""
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


def _head_row_blocks(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_row, logits of rows first_row…)`` for ``[N, H]`` hidden states, ``chunk`` rows at a time.

    Every block is computed into one reused ``[chunk, V]`` buffer of the inputs' dtype (the logits
    ``F.linear`` would give, as the model computes them), so only that block of logits ever exists.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    buf = torch.empty(min(chunk, n) * vocab, dtype=hidden.dtype, device=hidden.device)
    for i in range(0, n, chunk):
        h = hidden[i : i + chunk]  # (c, H)
        z = buf[: h.shape[0] * vocab].view(h.shape[0], vocab)  # (c, V)
        _linear_into(h, weight, bias, z)
        yield i, z


def _head_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    m_all: torch.Tensor,
    log_s: torch.Tensor,
    keep_tok: torch.Tensor,
    row_cut: torch.Tensor | None,
    g_logp: torch.Tensor,
    rho: float | None,
    temperature: float,
    chunk: int,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``Σ g · log π^mp(tokens)`` w.r.t. ``(hidden, weight, bias)``, over vocabulary tiles.

    The forward pass left each row's max, ``log Σ_{V_S}`` and a cut between its pruned and kept logits
    (``row_cut``), so ``π^mp`` of any column tile of every row can be recomputed: per tile of ``cols`` vocabulary entries (``N × cols ≈ chunk × V``
    elements, the forward block's size), recompute the ``[N, cols]`` logits, turn them into
    ``G = d/d logits`` (:func:`_grad_logits_into`), then ``grad_W[tile] = Gᵀ h`` (complete in one matmul,
    so rounded once) and ``grad_h += G W[tile]`` (accumulated in fp32 across tiles; a low-precision
    tile's share is computed in the inputs' dtype first, as autograd on materialised logits would).
    Tiles keep every matmul large (``h`` stays in cache, ``W`` is read once); row blocks would re-read
    ``W`` per block.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    dtype, cdt, dev = hidden.dtype, _compute_dtype(hidden.dtype), hidden.device
    cols = max(1, min(vocab, chunk * vocab // max(n, 1)))
    k = _Cut.of(rho, vocab, cdt)
    coef = (g_logp.to(cdt) / temperature)[:, None]  # (N, 1)
    tok_coef = coef * keep_tok[:, None]  # (N, 1) the one-hot's weight: 0 for pruned tokens
    need_h, need_w, need_b = needs
    g_h = torch.zeros(hidden.shape, dtype=cdt, device=dev) if need_h else None  # (N, H) fp32 accumulator
    share = torch.empty(hidden.shape, dtype=dtype, device=dev) if need_h and dtype != cdt else None
    g_w = torch.empty(weight.shape, dtype=dtype, device=dev) if need_w else None  # (V, H)
    g_b = torch.empty(vocab, dtype=dtype, device=dev) if need_b else None
    z_buf = torch.empty(n * cols, dtype=dtype, device=dev)
    p_buf = z_buf if dtype == cdt else torch.empty(n * cols, dtype=cdt, device=dev)
    for v0 in range(0, vocab, cols):
        w = weight[v0 : v0 + cols]  # (c, H)
        c = w.shape[0]
        z = z_buf[: n * c].view(n, c)  # (N, c) logits of this tile
        _linear_into(hidden, w, None if bias is None else bias[v0 : v0 + c], z)
        local = tokens[:, None] - v0  # (N, 1) the token's column in this tile, if it is in it
        inside = (local >= 0) & (local < c)
        p = p_buf[: n * c].view(n, c)  # (N, c)
        idx, hit = local.clamp(0, c - 1), tok_coef * inside
        _grad_logits_into(z, p, m_all, log_s, coef, idx, hit, temperature, k, row_cut)
        g_z = p if dtype == cdt else z.copy_(p)  # (N, c) d/d logits, in the inputs' dtype
        if g_h is not None:
            if share is None:
                g_h.addmm_(g_z, w)
            else:
                g_h.add_(torch.mm(g_z, w, out=share))
        if g_w is not None:
            torch.mm(g_z.t(), hidden, out=g_w[v0 : v0 + c])
        if g_b is not None:
            g_b[v0 : v0 + c] = p.sum(0)
    return (None if g_h is None else g_h.to(dtype)), g_w, g_b


class _HeadLogProb(torch.autograd.Function):
    """``log π^mp(token)`` from ``[N, H]`` hidden states and the ``[V, H]`` output layer, logits never kept.

    Forward: :func:`_blocks_pass` over row blocks of logits made on the fly (:func:`_head_row_blocks`),
    the same arithmetic as :func:`token_logprobs` on each block. Saves the inputs (alive anyway), the
    tokens and four ``[N]`` row statistics; the backward (:func:`_head_backward`) recomputes the logits.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        tokens: torch.Tensor,
        rho: float | None,
        temperature: float,
        chunk_size: int | None,
        stats: bool,
    ) -> tuple[torch.Tensor, ...]:
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = _head_chunk(vocab, n, chunk_size, hidden.element_size())
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            blocks = _head_row_blocks(hidden, weight, bias, chunk)
            res = _blocks_pass(
                blocks,
                (n, vocab),
                hidden.dtype,
                hidden.device,
                chunk,
                tokens,
                rho,
                temperature,
                stats=stats,
                scratch=True,
                row_cut=any(ctx.needs_input_grad[:3]),
            )
        ctx.save_for_backward(hidden, weight, bias, tokens, res.m, res.log_s, res.keep_tok, res.row_cut)
        ctx.rho, ctx.temperature, ctx.chunk = rho, temperature, chunk
        return _outputs(ctx, res, stats)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, g_logp: torch.Tensor, *_: torch.Tensor) -> tuple:  # type: ignore[override]
        hidden, weight, bias, tokens, m_all, log_s, keep_tok, row_cut = ctx.saved_tensors
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            grads = _head_backward(
                hidden,
                weight,
                bias,
                tokens,
                m_all,
                log_s,
                keep_tok,
                row_cut,
                g_logp,
                ctx.rho,
                ctx.temperature,
                ctx.chunk,
                tuple(ctx.needs_input_grad[:3]),
            )
        return (*grads, None, None, None, None, None)


def _head_apply(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    rho: float | None,
    temperature: float,
    chunk_size: int | None,
    stats: bool,
) -> tuple[torch.Tensor, ...]:
    """Check the inputs, flatten ``[..., H]`` to ``[N, H]`` and run :class:`_HeadLogProb`; outputs are ``[N]``."""
    _check_head(hidden, weight, bias)
    validate_rho(rho)
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    _check_tokens(tokens, hidden, weight.shape[0], "hidden")
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H); copies only a non-viewable slice, N × H
    return _HeadLogProb.apply(
        flat, weight, bias, tokens.reshape(-1).long(), rho, float(temperature), chunk_size, stats
    )


def lm_head_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    rho: float | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`token_logprobs` of ``F.linear(hidden, weight, bias)`` without ever holding those logits.

    At LLM vocabularies the logits are the memory wall (8,192 tokens × 151,936 ids are 5 GB in fp32, and
    autograd keeps them and their gradient); the unmasked losses of TRL/Liger avoid them with a fused LM
    head, and this is the same for DVP. The forward pass computes ``chunk`` rows of logits at a time into
    one buffer and runs :func:`token_logprobs`' arithmetic on them (the safe set needs the row max, so
    blocks are whole rows); the backward pass recomputes the logits over vocabulary tiles and sends the
    gradient to ``hidden``, ``weight`` (and ``bias``). Extra memory is a few ``[chunk, V]``-sized
    buffers plus ``[N, H]``, independent of how many rows there are. Same mask, mask value, ties,
    temperature and fp32 accumulation as :func:`token_logprobs`; the logits themselves are computed in
    the inputs' dtype, as the model's ``lm_head`` computes them.

    Args:
        hidden: ``[..., H]`` final hidden states (after the last norm), fp32/bf16/fp16/fp64.
        weight: ``[V, H]`` output layer (``model.get_output_embeddings().weight``; a tied head is the
            embedding matrix), same dtype and device as ``hidden``.
        tokens: ``[...]`` integer token ids in ``[0, V)``, ``hidden``'s leading shape.
        rho: min-p threshold in (0, 1]; ``None`` gives the plain log-softmax.
        bias: optional ``[V]`` output bias.
        temperature: logits are divided by this before masking and softmax (as the sampler does).
        chunk_size: logits rows per forward block (the backward's tiles hold as many elements);
            ``None`` sizes blocks to :data:`DEFAULT_BLOCK_BYTES`, grown to 1/:data:`HEAD_BLOCK_SHARE` of
            the logits (up to :data:`HEAD_MAX_ROWS` rows): the matmul against the whole output layer needs
            rows to run at full speed.

    Returns:
        ``[...]`` fp32 log-probs (fp64 for fp64 inputs), differentiable w.r.t. ``hidden``, ``weight``
        and ``bias``.

    >>> w = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-30.0, 0.0]])  # [V=3, H=2]
    >>> h = torch.tensor([[1.0, 5.0]])  # logits [2, 1, -30], as in token_logprobs' example
    >>> lm_head_token_logprobs(h, w, torch.tensor([1]), rho=1e-3)
    tensor([-1.3133])
    """
    (logp,) = _head_apply(hidden, weight, bias, tokens, rho, temperature, chunk_size, False)
    return logp.view(tokens.shape)


def lm_head_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    rho: float | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> TokenStats:
    """:func:`token_stats` (``log π^mp``, ``log Z``, entropy, ``|V_S|``) from hidden states, logits never held.

    Arguments as :func:`lm_head_token_logprobs`; only ``logp`` carries gradient.

    >>> w = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-6.0, 0.0]])
    >>> st = lm_head_token_stats(torch.tensor([[1.0, 5.0]]), w, torch.tensor([0]), rho=1e-3)
    >>> st.logp, st.logz.exp(), st.entropy, st.safe_size  # as token_stats on logits [2, 1, -6]
    (tensor([-0.3133]), tensor([0.9998]), tensor([0.5822]), tensor([2]))
    """
    outs = _head_apply(hidden, weight, bias, tokens, rho, temperature, chunk_size, True)
    return _token_stats_of(outs, tokens.shape)


fused_token_logprobs = lm_head_token_logprobs
"""The name issue 15 asked for: :func:`lm_head_token_logprobs`."""


# ----------------------------------------------------------------------------------------------------
# naive references (full [..., V] tensors; the definitions the fast paths are tested against)


def masked_logits(logits: torch.Tensor, rho: float | None, *, temperature: float = 1.0) -> torch.Tensor:
    """``z / T`` with tokens outside the safe set replaced by ``max(z / T) − MASK_MARGIN`` (full tensor).

    ``softmax`` of the result is ``π^mp``. The mask and the mask value carry no gradient. Builds
    ``[..., V]`` tensors: fine for notebooks and small vocabularies, use :func:`token_logprobs` in training.

    Args:
        logits: ``[..., V]`` logits.
        rho: min-p threshold in (0, 1], or ``None`` (then just ``z / T``).
        temperature: logits are divided by this first.

    Returns:
        ``[..., V]`` fp32 (fp64 for fp64 logits).

    >>> masked_logits(torch.tensor([[1.0, 0.0, -20.0]]), rho=1e-3)
    tensor([[   1.,    0., -999.]])
    """
    _check_common(logits, rho, temperature, None)
    z = _scaled_reference(logits, temperature)  # (..., V)
    if rho is None:
        return z
    with torch.no_grad():
        m = z.amax(-1, keepdim=True)  # (..., 1)
        keep = (z - m) >= log_rho_cut(rho, z.dtype)  # (..., V)
    return torch.where(keep, z, m - MASK_MARGIN)


def safe_mask_reference(logits: torch.Tensor, rho: float | None, *, temperature: float = 1.0) -> torch.Tensor:
    """Naive :func:`safe_mask`: ``(z / T − max) ≥ log ρ`` on the full tensor.

    >>> safe_mask_reference(torch.tensor([[0.0, -1.0, -20.0]]), 1e-3)
    tensor([[ True,  True, False]])
    """
    _check_common(logits, rho, temperature, None)
    z = _scaled_reference(logits, temperature).detach()  # (..., V)
    if rho is None:
        return torch.ones(z.shape, dtype=torch.bool, device=z.device)
    return (z - z.amax(-1, keepdim=True)) >= log_rho_cut(rho, z.dtype)


def token_logprobs_reference(
    logits: torch.Tensor, tokens: torch.Tensor, rho: float | None = None, *, temperature: float = 1.0
) -> torch.Tensor:
    """Naive :func:`token_logprobs`: ``log_softmax(masked_logits(z)).gather(tokens)``.

    >>> token_logprobs_reference(torch.tensor([[2.0, 1.0, -30.0]]), torch.tensor([1]), rho=1e-3)
    tensor([-1.3133])
    """
    _check_tokens(tokens, logits, logits.shape[-1])
    logp = torch.log_softmax(masked_logits(logits, rho, temperature=temperature), dim=-1)  # (..., V)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def retained_mass_reference(
    logits: torch.Tensor, rho: float | None, *, temperature: float = 1.0
) -> torch.Tensor:
    """Naive :func:`retained_mass`: ``Σ softmax(z / T) · mask``.

    >>> retained_mass_reference(torch.tensor([[0.0, -5.0]]), 0.01)
    tensor([0.9933])
    """
    _check_common(logits, rho, temperature, None)
    with torch.no_grad():
        p = torch.softmax(_scaled_reference(logits, temperature), dim=-1)  # (..., V)
        return (p * safe_mask_reference(logits, rho, temperature=temperature)).sum(-1)


def masked_entropy_reference(
    logits: torch.Tensor, rho: float | None = None, *, temperature: float = 1.0
) -> torch.Tensor:
    """Naive :func:`masked_entropy`: ``−Σ p log p`` of ``softmax(masked_logits)`` (0 · log 0 = 0).

    >>> masked_entropy_reference(torch.tensor([[0.0, 0.0, -20.0, -20.0]]), 1e-3)
    tensor([0.6931])
    """
    with torch.no_grad():
        logp = torch.log_softmax(masked_logits(logits, rho, temperature=temperature), dim=-1)  # (..., V)
        p = logp.exp()
        return -torch.where(p > 0, p * logp, 0.0).sum(-1)


def safe_set_size_reference(
    logits: torch.Tensor, rho: float | None, *, temperature: float = 1.0
) -> torch.Tensor:
    """Naive :func:`safe_set_size`: the number of True entries of the safe mask.

    >>> safe_set_size_reference(torch.tensor([[0.0, -1.0, -20.0]]), 1e-3)
    tensor([2])
    """
    return safe_mask_reference(logits, rho, temperature=temperature).sum(-1)


def lm_head_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    rho: float | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Naive :func:`lm_head_token_logprobs`: the full logits ``F.linear(hidden, weight, bias)``, then
    :func:`token_logprobs_reference`.

    >>> w = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-30.0, 0.0]])
    >>> lm_head_token_logprobs_reference(torch.tensor([[1.0, 5.0]]), w, torch.tensor([1]), rho=1e-3)
    tensor([-1.3133])
    """
    logits = F.linear(hidden, weight, bias)  # (..., V)
    return token_logprobs_reference(logits, tokens, rho, temperature=temperature)


def entropy_scaled_safe_mask(
    logits: torch.Tensor, log_rho: float, kappa: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-state safe set with ``log ρ(s) = log_rho · (1 + κ H(s))``, ``H`` the entropy of ``softmax(logits)``.

    Args:
        logits: ``(..., V)`` processed logits (temperature applied).
        log_rho: base ``log ρ`` (< 0 prunes; e.g. −13).
        kappa: entropy scale κ ≥ 0 (0: the fixed-ρ safe set of :func:`workbench.dvp.safe_mask`).

    Returns:
        ``keep (..., V)`` bool (the argmax always kept) and ``log ρ(s) (...)``.

    >>> z = torch.tensor([[0.0, -5.0, -12.0], [0.0, 0.0, -12.0]])
    >>> keep, lr = entropy_scaled_safe_mask(z, -10.0, 0.5)
    >>> keep.tolist(), [round(x, 2) for x in lr.tolist()]
    ([[True, True, False], [True, True, True]], [-10.2, -13.47])
    """
    z = logits.float()
    logp = torch.log_softmax(z, -1)  # (..., V)
    entropy = -(logp.exp() * logp).sum(-1)  # (...,)
    lr = log_rho * (1 + kappa * entropy)  # (...,)
    keep = z >= z.amax(-1, keepdim=True) + lr[..., None]  # (..., V)
    return keep, lr
