"""Peak memory of a torch call, from torch's own allocator: CPU via profiler events, CUDA via its counters.

``resource.getrusage`` only ever grows and counts the whole process; the profiler's ``profile_memory`` records
every tensor allocation and free, so replaying them gives the peak of *live* tensors made inside one call —
what the DVP log-prob tests and ``benchmarks/bench_logprobs.py`` compare against the naive masked version.
On a CUDA device the caching allocator keeps the same peak itself (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["peak_bytes"]


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak of live torch allocations on ``device`` made inside ``fn`` (bytes; tensors alive before excluded).

    >>> import torch
    >>> peak_bytes(lambda: torch.ones(1024, dtype=torch.float32)) >= 4096
    True
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - before
    if dev.type != "cpu":
        raise ValueError(f"peak_bytes: device={device!r} is not supported; use 'cpu' or a CUDA device")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak
