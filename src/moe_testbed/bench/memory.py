"""Peak memory of one call, as the tensor allocator sees it.

What is measured: the peak, during one call of a variant, of the bytes held by
tensors allocated during that call, above what was live when the call started
(parameters, inputs and optimizer state that already exist are not counted;
gradients and activations created by the call are).

- CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak, minus the
  bytes allocated at the start.
- CPU: torch has no allocator statistics for the CPU, and ``tracemalloc`` does
  not see torch's allocations. ``torch.profiler`` with ``profile_memory=True``
  records every CPU tensor allocation and free with its size and time stamp; the
  running sum of those events, in time order, is the live-bytes curve and its
  maximum is the peak. This excludes malloc's own overhead, freed-but-cached
  pages and the scratch buffers that MKL/oneDNN allocate outside torch's
  allocator, so it is a lower bound on the resident-set growth, but it is exact
  for tensors and identical in meaning for every variant. The profiled call is
  not timed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

import torch

_CPU = torch._C._autograd.DeviceType.CPU  # kineto tags CPU memory events with this


def peak_bytes(fn: Callable[[], None], device: torch.device | str = "cpu") -> int:
    """Peak tensor bytes allocated by one call of ``fn`` above those live before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == _CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # positive for an allocation, negative for a free
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 while profiling: kineto logs two lines per session
    from C++ (and warns about blocks allocated before it started), which would
    bury the bench's own output."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
