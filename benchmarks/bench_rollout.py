"""Rollout speed: TorchEngine vs Hugging Face ``model.generate`` vs real vLLM, same model, batch and precision.

Both sample fixed-length responses from the same randomly initialised 5.3 M-parameter Qwen2 model
(vocab 8,192, hidden 256, 4 layers, 4 heads, intermediate 688 — the model of MEASUREMENTS.md), a
batch of 64 prompts of 16 tokens, 48 new tokens each, at fp32 and bf16:

- ``generate``: ``do_sample=True, top_k=0, top_p=1.0, eos_token_id=None, min_new_tokens=N,
  max_new_tokens=N`` (plain sampling of exactly N tokens; no log-probs returned).
- ``TorchEngine``: ``generate(prompts, n=1, max_tokens=N, rho=None)`` — which also returns the
  per-token log-probs of the sampled tokens (work ``generate`` does not do).
- ``vLLM`` (when it can run here — the CPU build ``make`` installs, or CUDA): ``VLLMEngine`` on the same
  weights saved to a temporary directory, the same ``generate`` call (processed log-probs returned),
  ``enforce_eager``; its start-up (≈ 15 s) is not timed, only the warm ``generate`` calls. Tokens are the
  ones vLLM returned (it stops a row at eos, which a random model samples about once in 8,192 steps).

Each (method, dtype) runs in its own subprocess so its peak RSS (``ru_maxrss``) is its own; the time
is the best of ``--repeats`` runs after one warm-up (the machine is shared: the best run is the least
disturbed one). Prints a table, the TorchEngine/generate and vLLM/TorchEngine tokens-per-second ratios
per dtype. ``--no-vllm`` leaves vLLM out.

Run: ``python benchmarks/bench_rollout.py`` (≈ 1 min on 2 cores) or ``--quick`` (a few seconds).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from workbench.engines import TorchEngine
from workbench.engines.vllm_engine import vllm_unavailable_reason
from workbench.models import TinyModelConfig, build_tiny_model

FULL = dict(
    batch=64, prompt_len=16, new_tokens=48, vocab=8192, hidden=256, layers=4, heads=4, inter=688, repeats=3
)
QUICK = dict(
    batch=16, prompt_len=8, new_tokens=16, vocab=2048, hidden=128, layers=2, heads=4, inter=344, repeats=1
)


def _rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return 0.0


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(method: str, dtype: str, cfg: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """Time one method at one dtype in this process; return tokens/s, best time and memory."""
    if threads:
        torch.set_num_threads(threads)
    model_cfg = TinyModelConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        num_layers=cfg["layers"],
        num_heads=cfg["heads"],
        intermediate_size=cfg["inter"],
        max_position_embeddings=256,
    )
    model = build_tiny_model(model_cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg["vocab"], (cfg["batch"], cfg["prompt_len"]), generator=g)  # (B, P)
    n_new = cfg["new_tokens"]
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    if method == "generate":
        model = model.to(torch_dtype)
        mask = torch.ones_like(ids)

        def run(seed: int) -> int:
            torch.manual_seed(seed)
            with torch.inference_mode():
                out = model.generate(
                    ids,
                    attention_mask=mask,
                    do_sample=True,
                    top_k=0,
                    top_p=1.0,
                    temperature=1.0,
                    eos_token_id=None,
                    pad_token_id=0,
                    min_new_tokens=n_new,
                    max_new_tokens=n_new,
                )
            return int(out.shape[0] * (out.shape[1] - ids.shape[1]))
    elif method == "vllm":
        from workbench.engines import VLLMEngine
        from workbench.models import build_tokenizer

        # Saves the weights to a temporary directory that goes with the engine.
        engine = VLLMEngine.from_trainer_model(
            model, build_tokenizer(cfg["vocab"]), dtype=dtype, max_model_len=cfg["prompt_len"] + n_new
        )
        del model
        prompts = ids.tolist()

        def run(seed: int) -> int:
            r = engine.generate(prompts, n=1, max_tokens=n_new, rho=None, temperature=1.0, seed=seed)
            return int(r.mask.sum())
    else:
        engine = TorchEngine(model, dtype=dtype, eos_token_id=2, pad_token_id=0)
        del model
        prompts = ids.tolist()

        def run(seed: int) -> int:
            r = engine.generate(prompts, n=1, max_tokens=n_new, rho=None, temperature=1.0, seed=seed)
            # Decode work done: every row is stepped until the last one stops (a rare early eos in a
            # row does not shorten the loop), so count rows × steps.
            return int(r.tokens.shape[0] * r.tokens.shape[1])

    rss_model = _rss_mib()
    run(0)  # warm-up
    times, tokens = [], 0
    for rep in range(cfg["repeats"]):
        t0 = time.perf_counter()
        tokens = run(rep + 1)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {
        "method": method,
        "dtype": dtype,
        "tokens": tokens,
        "best_s": best,
        "tokens_per_s": tokens / best,
        "rss_model_mib": rss_model,
        "peak_rss_mib": _peak_rss_mib(),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16,fp16")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--no-vllm", action="store_true", help="leave real vLLM out")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        cfg["repeats"] = args.repeats
    if args.worker:
        cfg = json.loads(args.cfg) if args.cfg else cfg
        print(json.dumps(worker(args.worker[0], args.worker[1], cfg, args.threads)))
        return 0

    print(
        f"batch {cfg['batch']} × ({cfg['prompt_len']} prompt + {cfg['new_tokens']} new), vocab {cfg['vocab']}, "
        f"hidden {cfg['hidden']}, {cfg['layers']} layers; best of {cfg['repeats']}, one process per row"
    )
    methods = ["generate", "engine"]
    reason = "--no-vllm" if args.no_vllm else vllm_unavailable_reason()
    if reason is None:
        methods.append("vllm")
    else:
        print(f"vLLM left out: {reason}")
    results = []
    for dtype in args.dtypes.split(","):
        for method in methods:
            cmd = [sys.executable, __file__, "--worker", method, dtype, "--cfg", json.dumps(cfg)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    print(f"{'method':<12}{'dtype':<7}{'time s':>9}{'tokens/s':>11}{'model RSS MiB':>15}{'peak RSS MiB':>14}")
    for r in results:
        name = {"engine": "TorchEngine", "vllm": "vLLM"}.get(r["method"], "generate")
        print(
            f"{name:<12}{r['dtype']:<7}{r['best_s']:>9.3f}{r['tokens_per_s']:>11.0f}"
            f"{r['rss_model_mib']:>15.0f}{r['peak_rss_mib']:>14.0f}"
        )
    for dtype in args.dtypes.split(","):
        by = {r["method"]: r for r in results if r["dtype"] == dtype}
        ratio = by["engine"]["tokens_per_s"] / by["generate"]["tokens_per_s"]
        print(f"TorchEngine / generate, {dtype}: {ratio:.2f}× tokens/s (threads={by['engine']['threads']})")
        if "vllm" in by:
            ratio = by["vllm"]["tokens_per_s"] / by["engine"]["tokens_per_s"]
            print(f"vLLM / TorchEngine, {dtype}: {ratio:.2f}× tokens/s")
    if args.json:
        import os
        import tempfile

        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.json)) or ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"config": cfg, "results": results}, f, indent=2)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
