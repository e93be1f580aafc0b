"""DVP log-probs from hidden states: the fused LM head vs materialised logits, forward and forward+backward.

Three ways to get ``log π(token)`` of ``N`` rows from hidden states ``[N, H]`` and an output layer ``[V, H]``:

- ``fused``: :func:`workbench.dvp.lm_head_token_logprobs` with ``ρ`` (default ``e^-13``): logits made a
  block of rows at a time (forward) and a tile of the vocabulary at a time (backward), never ``[N, V]``.
- ``unfused``: ``F.linear`` → the ``[N, V]`` logits → :func:`workbench.dvp.token_logprobs` with the same ρ:
  our chunked masked kernel on materialised logits (what the trainer does today).
- ``unmasked``: ``F.linear`` → TRL's ``selective_log_softmax`` (``trl.trainer.utils``), the plain
  log-softmax TRL's trainers use, or :func:`workbench.dvp.token_logprobs_reference` with ``ρ = None`` when
  TRL is not installed.

``fwd`` runs under ``no_grad``; ``fwd+bwd`` backpropagates ``Σ g · log π`` (``g`` a fixed random upstream) into
``hidden`` and ``weight``. Time: median of ``--repeats`` timed runs, methods interleaved round-robin so load
from other jobs hits all alike; the first (untimed) run of each is the memory measurement. Memory: the peak of
live torch allocations made inside the call (:func:`workbench.memory.peak_bytes`; inputs not counted). For
``fwd+bwd`` that includes the two gradients every method must return (``weight.grad`` alone is ``V × H``);
``extra`` subtracts them, leaving the working memory the method chooses. The issue-15 targets are checked at
the end: fused extra peak ≤ 0.1× unfused, fused fwd+bwd time ≤ 1.3× unfused.

Run: ``python benchmarks/bench_fused_head.py`` (4096 × 1024 hidden states, V = 151,936, fp32 and bf16;
≈ 9 GB of RAM for the materialised paths in fp32; tens of minutes on 2 cores) or ``--quick``
(1024 × 256, V = 32,768: a few minutes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from bench_logprobs import synced

from workbench.dvp import DEFAULT_RHO, lm_head_token_logprobs, token_logprobs, token_logprobs_reference
from workbench.memory import peak_bytes

try:
    from trl.trainer.utils import selective_log_softmax
except ImportError:  # the unmasked baseline falls back to our reference
    selective_log_softmax = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ("fused", "unfused", "unmasked")
TARGET_MEMORY, TARGET_TIME = 0.1, 1.3


def make_inputs(
    rows: int, hidden: int, vocab: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states, an output layer, tokens and an upstream gradient with an LLM-like logit spread.

    Bulk logits ≈ ``N(0, 2.5²)``; 256 "frequent" ids share a direction with the hidden states and sit ≈ 16
    nats higher, so the e^-13 cut prunes most of the vocabulary, as with a trained model. Tokens are
    mostly frequent ids (kept), one in eight uniform (often pruned).
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(hidden, generator=g)
    u /= u.norm()
    h = torch.randn(rows, hidden, generator=g) + 4.0 * u  # (N, H)
    w = torch.randn(vocab, hidden, generator=g) * (2.5 / hidden**0.5)  # (V, H)
    frequent = torch.randperm(vocab, generator=g)[:256]
    w[frequent] += 4.0 * u
    tokens = frequent[torch.randint(0, 256, (rows,), generator=g)]
    uniform = torch.rand(rows, generator=g) < 0.125
    tokens[uniform] = torch.randint(0, vocab, (int(uniform.sum()),), generator=g)
    upstream = torch.randn(rows, generator=g)
    return h.to(dtype), w.to(dtype), tokens, upstream


def methods(
    h: torch.Tensor, w: torch.Tensor, tokens: torch.Tensor, rho: float, chunk_size: int | None = None
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Each method as ``(hidden, weight) -> log-probs [N]``."""

    def unmasked(hh: torch.Tensor, ww: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hh, ww)  # (N, V)
        if selective_log_softmax is not None:
            return selective_log_softmax(logits, tokens)
        return token_logprobs_reference(logits, tokens, None)

    return {
        "fused": lambda hh, ww: lm_head_token_logprobs(hh, ww, tokens, rho, chunk_size=chunk_size),
        "unfused": lambda hh, ww: token_logprobs(F.linear(hh, ww), tokens, rho),
        "unmasked": unmasked,
    }


def run_case(
    rows: int,
    hidden: int,
    vocab: int,
    dtype_name: str,
    rho: float,
    repeats: int,
    chunk_size: int | None = None,
    device: str = "cpu",
) -> list[dict]:
    """Time and peak memory of every method in both modes, plus the fused/unfused agreement.

    The inputs are built on the CPU (same numbers on every device) and moved to ``device``; on CUDA every
    timed call ends with a synchronize and memory is the CUDA allocator's peak.
    """
    dev = torch.device(device)
    h, w, tokens, upstream = (
        x.to(dev) for x in make_inputs(rows, hidden, vocab, DTYPES[dtype_name], seed=vocab + hidden)
    )
    fns = methods(h, w, tokens, rho, chunk_size)
    leaves = {"h": h.clone().requires_grad_(True), "w": w.clone().requires_grad_(True)}
    grad_bytes = sum(x.numel() * x.element_size() for x in leaves.values())

    def forward(fn: Callable) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return fn(h, w)

        return run

    def forward_backward(fn: Callable) -> Callable[[], object]:
        def run() -> object:
            for x in leaves.values():
                x.grad = None
            out = fn(leaves["h"], leaves["w"])
            (out * upstream.to(out.dtype)).sum().backward()
            return out.detach()

        return run

    # agreement first: a fast wrong answer is not a result
    with torch.no_grad():
        fused, unfused = fns["fused"](h, w), fns["unfused"](h, w)
    diff = float((fused - unfused).abs().max())
    kept = float((fused > -100).float().mean())

    out = []
    for mode, wrap in (("fwd", forward), ("fwd+bwd", forward_backward)):
        calls = {name: synced(wrap(fn), dev) for name, fn in fns.items()}
        peaks = {name: peak_bytes(call, dev) for name, call in calls.items()}  # also the warm-up
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
        owed = grad_bytes if mode == "fwd+bwd" else 0
        for name in calls:
            out.append(
                {
                    "dtype": dtype_name,
                    "mode": mode,
                    "method": name,
                    "median_s": statistics.median(times[name]),
                    "peak_mib": peaks[name] / 2**20,
                    "extra_mib": (peaks[name] - owed) / 2**20,
                    "diff_unfused": diff,
                    "kept_tokens": kept,
                }
            )
    return out


def ratios(results: list[dict], dtype_name: str, mode: str, base: str) -> tuple[float, float, float]:
    """(time, peak, extra peak) of ``fused`` relative to ``base`` for one dtype and mode."""
    sel = {r["method"]: r for r in results if r["dtype"] == dtype_name and r["mode"] == mode}
    f, b = sel["fused"], sel[base]
    return f["median_s"] / b["median_s"], f["peak_mib"] / b["peak_mib"], f["extra_mib"] / b["extra_mib"]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--rows", type=int, default=None, help="hidden-state rows N (default 4096; 1024 with --quick)"
    )
    ap.add_argument("--hidden", type=int, default=None, help="hidden size H (default 1024; 256 with --quick)")
    ap.add_argument(
        "--vocab", type=int, default=None, help="vocabulary V (default 151936; 32768 with --quick)"
    )
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per method and mode (default 2)")
    ap.add_argument("--rho", type=float, default=DEFAULT_RHO, help="min-p threshold (default e^-13)")
    ap.add_argument("--quick", action="store_true", help="1024 × 256 hidden states, V = 32,768")
    ap.add_argument(
        "--chunk-size", type=int, default=None, help="fused: logits rows per block (default: 64 MiB blocks)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="where the inputs live: cpu (default) or cuda")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = args.rows or (1024 if args.quick else 4096)
    hidden = args.hidden or (256 if args.quick else 1024)
    vocab = args.vocab or (32768 if args.quick else 151_936)
    repeats = args.repeats or 2
    if repeats < 1:
        ap.error(f"--repeats={repeats} must be >= 1")
    base_name = "trl selective_log_softmax" if selective_log_softmax is not None else "reference log_softmax"
    print(
        f"DVP log-probs from hidden states: N={rows}, H={hidden}, V={vocab}, rho={args.rho:.3g}, "
        f"unmasked = {base_name}, torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
        f"repeats={repeats}, load average {os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'dtype':>5} {'mode':>8} {'method':>9} {'median s':>9} {'peak MiB':>9} {'extra MiB':>10} "
        f"{'t/unfused':>9} {'x/unfused':>9} {'t/unmasked':>10}"
    )
    print(header)
    print("-" * len(header))
    results: list[dict] = []
    for dtype_name in args.dtypes:
        case = run_case(rows, hidden, vocab, dtype_name, args.rho, repeats, args.chunk_size, args.device)
        results += case
        for r in case:
            sel = {q["method"]: q for q in case if q["mode"] == r["mode"]}
            print(
                f"{dtype_name:>5} {r['mode']:>8} {r['method']:>9} {r['median_s']:>9.2f} {r['peak_mib']:>9.0f} "
                f"{r['extra_mib']:>10.0f} {r['median_s'] / sel['unfused']['median_s']:>9.2f} "
                f"{r['extra_mib'] / sel['unfused']['extra_mib']:>9.3f} "
                f"{r['median_s'] / sel['unmasked']['median_s']:>10.2f}"
            )
        print(
            f"{'':>5} check: max|fused − unfused| {case[0]['diff_unfused']:.2e}, "
            f"tokens kept {case[0]['kept_tokens']:.1%}, load average {os.getloadavg()[0]:.1f}"
        )
    print()
    for dtype_name in args.dtypes:
        for mode in ("fwd", "fwd+bwd"):
            t_u, _, x_u = ratios(results, dtype_name, mode, "unfused")
            t_m, _, x_m = ratios(results, dtype_name, mode, "unmasked")
            mem_ok = "meets" if x_u <= TARGET_MEMORY else "MISSES"
            line = (
                f"{dtype_name} {mode}: fused/unfused time {t_u:.2f}×, extra memory {x_u:.3f}× "
                f"({mem_ok} ≤ {TARGET_MEMORY}); fused/unmasked time {t_m:.2f}×, extra memory {x_m:.3f}×"
            )
            if mode == "fwd+bwd":
                line += f"; time {'meets' if t_u <= TARGET_TIME else 'MISSES'} ≤ {TARGET_TIME}× unfused"
            print(line)
    return results


if __name__ == "__main__":
    main()
