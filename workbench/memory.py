"""Peak memory of a torch call on the CPU, from torch's own allocation events.

``resource.getrusage`` only ever grows and counts the whole process; the profiler's ``profile_memory`` records
every tensor allocation and free, so replaying them gives the peak of *live* tensors made inside one call —
what the DVP log-prob tests and ``benchmarks/bench_logprobs.py`` compare against the naive masked version.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile

__all__ = ["peak_bytes"]


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of live torch CPU allocations made inside ``fn`` (bytes; tensors alive before the call excluded).

    >>> import torch
    >>> peak_bytes(lambda: torch.ones(1024, dtype=torch.float32)) >= 4096
    True
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak
