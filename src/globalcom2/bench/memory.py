"""Peak tensor memory of one call, measured the same way on CPU and CUDA.

The quantity is the high-water mark of tensor bytes allocated *during* the call above what was allocated when it
started (weights and inputs excluded): activations, the KV cache, outputs.

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus ``memory_allocated`` before.
- CPU: torch has no allocator statistics for CPU, and ``tracemalloc`` does not see torch's allocations, so we run the
  call under ``torch.profiler`` with ``profile_memory=True``. Torch's CPU allocator then reports every allocation
  and free together with its running total of live bytes (``total_allocated``); the peak of that total minus its
  value before the first allocation is the same quantity as on CUDA. Memory that kernels allocate outside torch's
  allocator (oneDNN/MKL scratch buffers) is not seen; the process RSS would include the allocator's and Python's
  own overheads, so it is not used.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the C++ profiler's start/stop log lines (written straight to file descriptor 2)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest capture, notebooks
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _cpu_peak_from_profile(prof: Any) -> int:
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            f = node.extra_fields
            events.append(
                (node.start_time_ns, int(f.total_allocated) - int(f.alloc_size), int(f.total_allocated))
            )
    if not events:
        return 0
    first_time = min(e[0] for e in events)
    baseline = min(before for t, before, _ in events if t == first_time)
    return max(max(after for *_, after in events) - baseline, 0)


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """Run ``fn()`` once and return ``(its result, peak bytes allocated during it)``."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, max(torch.cuda.max_memory_allocated(device) - base, 0)
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    return out, _cpu_peak_from_profile(prof)
