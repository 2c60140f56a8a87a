"""Host memory allocator settings for training and benchmarking on CPU.

PyTorch's CPU tensors come from glibc's malloc. By default glibc serves blocks
above its mmap threshold (128 KiB, rising dynamically up to 32 MiB) with fresh
``mmap`` calls and hands the top of the heap back to the kernel whenever more
than the trim threshold is free. A training step allocates and frees the same
few-MiB activation and gradient buffers thousands of times, so by default many
of them are faulted in afresh on every use: on this project's machines the
quick model took 3-4x more minor page faults per step than with the settings
below, and its step ran 7-27% slower (the MoE model more than the dense one,
because its per-expert buffers are more numerous).

``keep_freed_memory()`` fixes both thresholds, so freed buffers stay in the
process and are reused. It is what PyTorch's performance guide gets from
swapping in jemalloc or tcmalloc, without the extra dependency. The cost is that
the process keeps its peak resident memory until it exits, which a training or
benchmark process does anyway. Set ``MOE_TESTBED_MALLOC=default`` to leave
glibc's defaults alone (for example, to measure the difference).
"""

from __future__ import annotations

import ctypes
import os

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at 32 MiB on 64-bit: larger blocks are still mapped.
_MMAP_THRESHOLD = 32 << 20
_TRIM_THRESHOLD = (1 << 31) - 1  # an int: in effect, never trim

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True if they are in effect (glibc only)."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("MOE_TESTBED_MALLOC", "").lower() == "default":
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it; musl, macOS: leave alone
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
