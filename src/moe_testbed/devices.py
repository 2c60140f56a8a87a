"""Which device a run uses and whether it computes in bf16: shared by training, evaluation, ``hf`` and the bench.

torch is imported inside the functions: the config imports this module's choice
lists, and config must stay cheap to import (study workers parse configs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
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


def uses_bf16(dtype: str, device: torch.device) -> bool:
    """``bfloat16`` always; ``auto`` on CUDA only (on CPU bf16 pays only at large matmuls)."""
    return dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, dtype: str) -> Callable[[], AbstractContextManager]:
    """A factory of the autocast context a forward runs under (a no-op in fp32)."""
    import torch

    if not uses_bf16(dtype, device):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
