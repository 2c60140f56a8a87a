"""A built domain mix on disk, and :func:`ensure_mix`, the trainer's entry point."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from moe_testbed.data.errors import DataError
from moe_testbed.data.paths import preset_dir
from moe_testbed.data.sampling import parse_weights
from moe_testbed.data.storage import SPLITS, load_array, read_manifest


class DomainMix:
    """Read-only view of a complete build: arrays are memory-mapped on first use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        manifest = read_manifest(self.path)
        if manifest is None:
            raise DataError(
                f"{self.path} holds no complete mix (no complete mix.json): "
                f"build it with `moe-testbed data build --out {self.path}`"
            )
        self.manifest = manifest
        self.domains: list[str] = [d["name"] for d in manifest["domains"]]
        self.vocab_size: int = int(manifest["vocab_size"])
        self.eos_id: int = int(manifest["eos_id"])
        self._info = {d["name"]: d for d in manifest["domains"]}
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self._tokenizer = None

    @property
    def fingerprint(self) -> str:
        """The mix's identity: a hash of its token arrays and tokenizer (the sha256 digests in mix.json).

        Two mixes with the same fingerprint hold the same tokens, documents, domain
        labels and tokenizer, whatever machine built them; a run's numbers are
        comparable across labs only when this matches. (``mix.json``'s own
        ``fingerprint`` is of the build's settings, which decide whether to rebuild.)
        """
        return content_fingerprint(self.manifest)

    def __repr__(self) -> str:
        return f"DomainMix({str(self.path)!r}, domains={self.domains}, vocab_size={self.vocab_size})"

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        return self._tokenizer

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    # ---- lookup -----------------------------------------------------------
    def domain_id(self, name: str) -> int:
        try:
            return self.domains.index(name)
        except ValueError:
            raise DataError(
                f"{name!r} is not a domain of the mix in {self.path}: its domains are {', '.join(self.domains)}"
            ) from None

    def select(self, domains: list[str] | None) -> list[str]:
        """The named domains (checked), or all of them; in the mix's order."""
        if not domains:
            return list(self.domains)
        for name in domains:
            self.domain_id(name)
        return [d for d in self.domains if d in set(domains)]

    def domain_range(self, split: str, name: str) -> tuple[int, int]:
        """``[start, end)`` of a domain's tokens in the split's arrays."""
        self._check_split(split)
        a, b = self._info[self.domains[self.domain_id(name)]]["ranges"][split]["tokens"]
        return int(a), int(b)

    def tokens(self, split: str, domain: str) -> int:
        a, b = self.domain_range(split, domain)
        return b - a

    def documents(self, split: str, domain: str) -> int:
        self._check_split(split)
        return int(self._info[self.domains[self.domain_id(domain)]]["documents"][split])

    def array(self, split: str, what: str) -> np.ndarray:
        """``tokens`` | ``domains`` | ``docs`` of a split, memory-mapped."""
        self._check_split(split)
        key = (split, what)
        if key not in self._arrays:
            self._arrays[key] = load_array(self.path / f"{split}.{what}.npy")
        return self._arrays[key]

    def token_frequencies(self) -> np.ndarray:
        """Counts of every token id over the train split, int64 [vocab_size]."""
        return np.asarray(load_array(self.path / "train.freq.npy", mmap=False), dtype=np.int64)

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise DataError(f"split {split!r} does not exist: choose one of {', '.join(SPLITS)}")


def content_fingerprint(manifest: dict) -> str:
    files = sorted((manifest.get("files") or {}).items())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def ensure_mix(data_cfg: Any) -> DomainMix:
    """The mix a config names; builds the preset's mix first when it is missing and allowed."""
    from moe_testbed.data.presets import get_preset

    if data_cfg.dir:
        path = Path(data_cfg.dir).expanduser()
        if read_manifest(path) is None:
            raise DataError(
                f"data.dir={data_cfg.dir} holds no complete mix (no complete mix.json): "
                f"build it with `moe-testbed data build --out {data_cfg.dir}`"
            )
    else:
        preset = get_preset(data_cfg.preset).name
        path = preset_dir(preset)
        if read_manifest(path) is None:
            if not data_cfg.auto_build:
                raise DataError(
                    f"the {preset} mix is not built in {path}: run `moe-testbed data build --preset {preset}` "
                    "or set data.auto_build=true"
                )
            from moe_testbed.data.build import BuildOptions, build_mix

            build_mix(BuildOptions(preset=preset), out=path)
    mix = DomainMix(path)
    selected = mix.select(getattr(data_cfg, "domains", None))
    parse_weights(getattr(data_cfg, "weights", None), selected)  # fail before training starts
    return mix
