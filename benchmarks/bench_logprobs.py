"""Token log-probs at LLM vocabulary sizes: DVP's fused chunked pass vs the naive masked version vs TRL.

Four ways to get per-token log-probs from ``[rows, V]`` logits (shaped ``[rows / seq, seq, V]`` as a
trainer sees them), forward only:

- ``dvp``: :func:`workbench.dvp.token_logprobs` with ``ρ`` (default ``e^-13``): ``log π^mp``, chunked over
  rows with one reused ``[chunk, V]`` fp32 workspace.
- ``naive``: the textbook masked version, ``log_softmax(z.masked_fill(~keep, fill)).gather(tokens)`` with
  ``keep = z ≥ max z + log ρ`` (fp32 accumulation, like DVP): same numbers on kept tokens, built from
  full ``[rows, V]`` tensors.
- ``unmasked``: :func:`workbench.dvp.token_logprobs_reference` with ``ρ = None``, i.e.
  ``log_softmax(z).gather(tokens)`` in fp32: the unmasked reference, needing nothing beyond torch.
- ``trl``: TRL's ``selective_log_softmax`` (``trl.trainer.utils``), the *unmasked* log-softmax that TRL's
  trainers use: the speed bar a masked version should meet (it loops over the leading dimension).

Time: median (and best) of ``--repeats`` runs after one warm-up, methods interleaved round-robin so a
burst of load from other jobs on a shared machine hits all three alike. On an oversubscribed machine
``--threads 1`` gives steadier numbers: every multi-threaded op then waits for a descheduled partner
thread, which penalises pipelines of several ops (DVP, naive) more than single fused kernels. Peak memory: the peak of live
torch CPU allocations made inside the call, replayed from ``torch.profiler``'s ``profile_memory`` alloc/free
events (which see every tensor the CPU allocator hands out; the input logits are not counted); with
``--device cuda`` the inputs are moved to the GPU, every timed call ends with a ``torch.cuda.synchronize``
and the peak is the CUDA allocator's (:func:`workbench.memory.peak_bytes`). The table
shows each method's time relative to TRL and memory relative to ``naive``; a final line checks the
targets at the largest vocabulary (DVP time ≤ 1.0× TRL, DVP peak memory ≤ 0.5× naive).

Run: ``python benchmarks/bench_logprobs.py`` (4096 rows × V ∈ {8192, 32768, 151936}, fp32 and bf16;
needs ≈ 9 GB of RAM for the naive version at V = 151,936 in fp32) or ``--quick`` (512 rows, < 3 min).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from workbench.dvp import DEFAULT_RHO, MASK_MARGIN, safe_set_size, token_logprobs, token_logprobs_reference
from workbench.memory import peak_bytes

try:
    from trl.trainer.utils import selective_log_softmax
except ImportError:  # the benchmark still runs dvp vs naive
    selective_log_softmax = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def naive_masked(logits: torch.Tensor, tokens: torch.Tensor, rho: float) -> torch.Tensor:
    """``log_softmax(masked_fill(z, z < max + log ρ, fill)).gather(tokens)`` in fp32.

    ``fill`` is one scalar below every row's cut (``min over rows of max − MASK_MARGIN``), so kept
    tokens get exactly ``log π^mp``; pruned ones get some very negative number.
    """
    z = logits.float()  # (B, T, V); a no-op for fp32
    m = z.amax(-1, keepdim=True)  # (B, T, 1)
    keep = z >= m + math.log(rho)  # (B, T, V) bool
    fill = float(m.min()) - MASK_MARGIN
    logp = torch.log_softmax(z.masked_fill(~keep, fill), dim=-1)  # (B, T, V)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def make_inputs(
    rows: int, seq: int, vocab: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM-like logits and tokens sampled from them.

    A bulk of ``N(0, 2.5²)`` logits plus 64 "plausible" tokens per row lifted by ``U(0, 16)``, so the
    e^-13 cut prunes most of the vocabulary (as with a trained model) and the tail spans ~30 nats.
    Built in place and chunk by chunk so setup never holds more than the logits plus small blocks.
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.empty(rows // seq, seq, vocab, dtype=dtype).normal_(0.0, 2.5, generator=g)  # (B, T, V)
    tokens = torch.empty(rows // seq, seq, dtype=torch.long)  # (B, T)
    flat, tflat = logits.view(-1, vocab), tokens.view(-1)
    for i in range(0, flat.shape[0], 64):
        block = flat[i : i + 64]  # (b, V)
        top = torch.randint(0, vocab, (block.shape[0], 64), generator=g)
        lift = torch.rand(top.shape, generator=g) * 16.0
        block.scatter_add_(1, top, lift.to(dtype))
        u = torch.rand(block.shape, generator=g).clamp_(min=1e-20)  # Gumbel-max: tokens ~ softmax(logits)
        tflat[i : i + 64] = (block.float() - u.log_().neg_().log_()).argmax(-1)
    return logits, tokens


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by ``torch.cuda.synchronize`` on a CUDA device, else ``fn`` itself.

    CUDA kernels run asynchronously: without the synchronize a timer measures only their launch.
    """
    if device.type != "cuda":
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def run_case(
    rows: int, seq: int, vocab: int, dtype_name: str, rho: float, repeats: int, device: str = "cpu"
) -> list[dict]:
    dev = torch.device(device)
    logits, tokens = make_inputs(rows, seq, vocab, DTYPES[dtype_name], seed=vocab)
    logits, tokens = logits.to(dev), tokens.to(dev)
    fns: dict[str, Callable[[], object]] = {
        "dvp": lambda: token_logprobs(logits, tokens, rho),
        "naive": lambda: naive_masked(logits, tokens, rho),
        "unmasked": lambda: token_logprobs_reference(logits, tokens, None),
    }
    if selective_log_softmax is not None:
        fns["trl"] = lambda: selective_log_softmax(logits, tokens)

    # agreement first: a fast wrong answer is not a result
    dvp_v, naive_v = token_logprobs(logits, tokens, rho), naive_masked(logits, tokens, rho)
    kept = dvp_v > -MASK_MARGIN / 2
    diff_naive = float((dvp_v - naive_v)[kept].abs().max()) if bool(kept.any()) else 0.0
    diff_unmasked = float(
        (token_logprobs(logits, tokens, None) - token_logprobs_reference(logits, tokens)).abs().max()
    )
    diff_trl = math.nan
    if selective_log_softmax is not None:
        ref = selective_log_softmax(logits, tokens).float()
        diff_trl = float((token_logprobs(logits, tokens, None) - ref).abs().max())
    del dvp_v, naive_v
    kept_frac = float(safe_set_size(logits, rho).double().mean()) / vocab

    times = time_interleaved({name: synced(fn, dev) for name, fn in fns.items()}, repeats)
    out = []
    for name, fn in fns.items():
        out.append(
            {
                "vocab": vocab,
                "dtype": dtype_name,
                "method": name,
                "median_s": statistics.median(times[name]),
                "best_s": min(times[name]),
                "peak_mib": peak_bytes(fn, dev) / 2**20,
                "pruned_frac": float((~kept).float().mean()),
                "kept_frac": kept_frac,
                "diff_naive": diff_naive,
                "diff_unmasked": diff_unmasked,
                "diff_trl": diff_trl,
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=None, help="logits rows (default 4096; 512 with --quick)")
    ap.add_argument("--seq", type=int, default=512, help="rows per sequence: logits are [rows/seq, seq, V]")
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768, 151936], help="vocabulary sizes")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed runs per method (default 5; 3 with --quick)"
    )
    ap.add_argument("--rho", type=float, default=DEFAULT_RHO, help="min-p threshold (default e^-13)")
    ap.add_argument("--quick", action="store_true", help="512 rows, 3 repeats: under 3 minutes")
    ap.add_argument("--device", default="cpu", help="where the logits live: cpu (default) or cuda")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = args.rows or (512 if args.quick else 4096)
    repeats = args.repeats or (3 if args.quick else 5)
    seq = min(args.seq, rows)
    if rows % seq:
        ap.error(f"--rows={rows} must be a multiple of --seq={seq}; pick e.g. --rows {rows - rows % seq}")
    if selective_log_softmax is None:
        print("trl is not installed (pip install -e '.[bench]'): comparing dvp with naive only")

    print(
        f"token log-probs, forward: {rows} rows as [{rows // seq}, {seq}, V], rho={args.rho:.3g}, "
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, repeats={repeats}"
    )
    header = (
        f"{'V':>7} {'dtype':>5} {'method':>8} {'median ms':>10} {'best ms':>9} {'peak MiB':>9} "
        f"{'time/trl':>9} {'mem/naive':>9}"
    )
    print(header)
    print("-" * len(header))
    results = []
    for vocab in args.vocab:
        for dtype_name in args.dtypes:
            case = run_case(rows, seq, vocab, dtype_name, args.rho, repeats, args.device)
            base_t = {r["method"]: r["median_s"] for r in case}
            base_m = {r["method"]: r["peak_mib"] for r in case}
            for r in case:
                t_ratio = r["median_s"] / base_t["trl"] if "trl" in base_t else math.nan
                m_ratio = r["peak_mib"] / base_m["naive"]
                print(
                    f"{vocab:>7} {dtype_name:>5} {r['method']:>8} {1e3 * r['median_s']:>10.1f} "
                    f"{1e3 * r['best_s']:>9.1f} {r['peak_mib']:>9.1f} {t_ratio:>9.2f} {m_ratio:>9.3f}"
                )
            r0 = case[0]
            print(
                f"{'':>7} {'':>5} check: max|dvp − naive| on kept tokens {r0['diff_naive']:.2e}, "
                f"max|dvp(ρ=None) − unmasked| {r0['diff_unmasked']:.2e}, "
                f"max|dvp(ρ=None) − trl| {r0['diff_trl']:.2e}, |V_S|/V {r0['kept_frac']:.2%}, "
                f"sampled tokens pruned {r0['pruned_frac']:.2%}"
            )
            results += case

    largest = max(args.vocab)
    print()
    for dtype_name in args.dtypes:
        sel = {r["method"]: r for r in results if r["vocab"] == largest and r["dtype"] == dtype_name}
        m_ratio = sel["dvp"]["peak_mib"] / sel["naive"]["peak_mib"]
        verdict = [f"memory dvp/naive = {m_ratio:.3f} ({'meets' if m_ratio <= 0.5 else 'MISSES'} ≤ 0.5)"]
        if "trl" in sel:
            t_ratio = sel["dvp"]["median_s"] / sel["trl"]["median_s"]
            verdict.insert(
                0, f"time dvp/trl = {t_ratio:.2f} ({'meets' if t_ratio <= 1.0 else 'MISSES'} ≤ 1.0)"
            )
        print(f"targets at V={largest}, {dtype_name}: " + "; ".join(verdict))


if __name__ == "__main__":
    main()
