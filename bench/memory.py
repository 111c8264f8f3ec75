"""Peak memory of a piece of work, measured: torch's allocator events on CPU, ``max_memory_allocated`` on CUDA, and
the process's RSS high-water mark.

CPU allocations have no peak counter in torch, but the profiler records every allocation and free with its size
(``profile_memory``): the running sum of those events, in time order, peaks at the most tensor bytes alive at once.
That figure does not depend on the load of the machine or on what malloc keeps for reuse. The RSS high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``; Linux) is what the operating system saw, allocator caches and
fragmentation included.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
from collections.abc import Callable

import torch

__all__ = ["peak_rss_bytes", "peak_tensor_bytes", "reset_rss_peak", "rss_bytes"]


def peak_tensor_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Most bytes of tensors alive at once while ``fn`` runs, above what was alive when it started.

    Args:
        fn: the work (e.g. a forward + backward step).
        device: where the work allocates: on CUDA ``torch.cuda.max_memory_allocated``, elsewhere the profiler's
            allocation events.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev) - base)
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # frees are negative
        peak = max(peak, live)
    return int(peak)


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (``VmRSS``) or its high-water mark (``VmHWM``), from ``/proc/self/status``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (not Linux?)")


def reset_rss_peak() -> int:
    """Return freed memory to the OS and reset the RSS high-water mark to the current RSS; returns that RSS."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: the mark then includes what malloc kept
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def peak_rss_bytes(fn: Callable[[], object]) -> int:
    """RSS high-water mark while ``fn`` runs, above the RSS when it started (Linux)."""
    base = reset_rss_peak()
    fn()
    return rss_bytes("VmHWM") - base
