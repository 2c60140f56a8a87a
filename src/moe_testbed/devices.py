"""Which device a run uses and whether it computes in bf16: shared by training, evaluation, ``hf`` and the bench.

torch is imported inside the functions: the config imports this module's choice
lists, and config must stay cheap to import (study workers parse configs).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from moe_testbed.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")


def resolve_device(name: str, option: str = "train.device=") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``option`` names the setting in the error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}cuda but no CUDA device is available: use {option}auto or {option}cpu")
    return torch.device(name)


# bf16 on a CPU must beat fp32 by this much at the run's smallest matmul before ``auto`` picks it:
# the probe's noise is a few per cent, and a tie is not worth the rounding.
CPU_BF16_MIN_SPEEDUP = 1.2
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 dot products; without them bf16 is emulated (slower)


def uses_bf16(dtype: str, device: torch.device, probe_shape: tuple[int, int, int] | None = None) -> bool:
    """``bfloat16`` always; ``auto`` on CUDA, and on a CPU where bf16 is measured faster at ``probe_shape``.

    ``probe_shape`` = (rows, inner, cols) of the run's smallest hot matmul (one
    expert's share of a forward): bf16 on a CPU wins at large matmuls and loses
    at small ones (docs/benchmarks.md#bf16-on-a-cpu). Without a shape, ``auto``
    means fp32 on CPU.
    """
    if dtype != "auto":
        return dtype == "bfloat16"
    if device.type == "cuda":
        return True
    return probe_shape is not None and cpu_bf16_speedup(*probe_shape) >= CPU_BF16_MIN_SPEEDUP


def cpu_bf16_flags() -> list[str]:
    """The native-bf16 instruction sets this CPU reports (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in CPU_BF16_FLAGS if f in flags]


@functools.lru_cache(maxsize=16)
def cpu_bf16_speedup(rows: int, inner: int, cols: int, repeats: int = 7) -> float:
    """fp32 time / bf16 time of a (rows x inner) @ (inner x cols) matmul on this CPU (median of ``repeats``).

    0.0 without native bf16 instructions: emulated bf16 is never faster, and
    not timing it keeps ``auto`` deterministic on such CPUs.
    """
    import torch

    if not cpu_bf16_flags():
        return 0.0
    a, b = torch.randn(max(rows, 1), inner), torch.randn(inner, cols)

    def median_time(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up: first calls pick kernels
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return sorted(times)[repeats // 2]

    return median_time(a, b) / median_time(a.bfloat16(), b.bfloat16())


def autocast_for(
    device: torch.device, dtype: str, probe_shape: tuple[int, int, int] | None = None
) -> Callable[[], AbstractContextManager]:
    """A factory of the autocast context a forward runs under (a no-op in fp32)."""
    import torch

    if not uses_bf16(dtype, device, probe_shape):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
