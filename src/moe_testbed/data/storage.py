"""On-disk layout of a built mix, and the manifest that marks it complete.

::

    DIR/mix.json              manifest; written last and atomically: its presence
                              (with "complete": true) marks the build complete
    DIR/tokenizer.json        the byte-level BPE tokenizer
    DIR/{train,val}.tokens.npy   token ids, uint16 when the vocabulary fits (else uint32)
    DIR/{train,val}.domains.npy  uint8 domain id of every token
    DIR/{train,val}.docs.npy     int64 start offset of every document, plus the end
    DIR/{train,val}.docs.json    [domain, source, document id] of every document
    DIR/train.freq.npy        int64 token counts over the train split
    DIR/stages/               caches of the build steps (sources, tokenizer, encoded)

Within a split the domains are contiguous, in domain-id order; the manifest
gives each domain's token and document ranges. Every document ends with EOS.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from moe_testbed.data.errors import DataError
from moe_testbed.io import atomic_write, atomic_write_json

T = TypeVar("T")

MANIFEST = "mix.json"
FORMAT = 1
SPLITS = ("train", "val")


def split_file(split: str, what: str) -> str:
    return f"{split}.{what}.npy" if what != "docs_meta" else f"{split}.docs.json"


def guard_disk(what: str, fn: Callable[[], T]) -> T:
    """Run a write; turn a full disk into a DataError (the partial file is already removed)."""
    try:
        return fn()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(
                f"disk full while writing {what}: free space or build with --out on another disk "
                "(the partial output is not marked complete)"
            ) from None
        raise


def _readable(path: Path) -> None:
    """Atomic writes create files private to the user (mkstemp); a data cache may be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_array(path: Path, arr: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)

    guard_disk(str(path), lambda: atomic_write(path, write))
    _readable(path)


def save_json(path: Path, obj: object) -> None:
    guard_disk(str(path), lambda: atomic_write_json(path, obj))
    _readable(path)


def load_array(path: Path, mmap: bool = True) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None)


def read_manifest(path: Path) -> dict | None:
    """The manifest of a complete build in ``path``, or None."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True or manifest.get("format") != FORMAT:
        return None
    return manifest


def write_manifest(path: Path, manifest: dict) -> None:
    save_json(Path(path) / MANIFEST, {**manifest, "format": FORMAT, "complete": True})


def invalidate(path: Path) -> None:
    """Remove the completion marker before anything else in ``path`` is rewritten."""
    (Path(path) / MANIFEST).unlink(missing_ok=True)
