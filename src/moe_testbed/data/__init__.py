"""Domain mix: real text from distinguishable domains, every token labelled with its domain.

Public API (used by the trainer)::

    from moe_testbed.data import DataError, TrainLoader, ensure_mix, val_batches
    mix = ensure_mix(cfg.data)             # builds the preset's mix on first use
    loader = TrainLoader(mix, seq_len, batch_size, seed)
    input_ids, targets, domain_ids = loader.next_batch()
    for name, x, y, d in val_batches(mix, seq_len, batch_size, tokens_per_domain): ...

Heavy modules (torch, tokenizers) load on first use of the names that need
them, so that extraction workers and ``data info`` start quickly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moe_testbed.data.errors import DataError

if TYPE_CHECKING:
    from moe_testbed.data.build import BuildOptions, build_mix
    from moe_testbed.data.loader import TrainLoader, val_batches
    from moe_testbed.data.mix import DomainMix, ensure_mix

__all__ = ["DataError", "DomainMix", "TrainLoader", "ensure_mix", "build_mix", "BuildOptions", "val_batches"]

_LAZY = {
    "DomainMix": "moe_testbed.data.mix",
    "ensure_mix": "moe_testbed.data.mix",
    "TrainLoader": "moe_testbed.data.loader",
    "val_batches": "moe_testbed.data.loader",
    "build_mix": "moe_testbed.data.build",
    "BuildOptions": "moe_testbed.data.build",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_testbed.data' has no attribute {name!r}")
