"""The routing tables: what the recorder counts, what a run saves, what every metric is computed from.

Shape legend: L MoE layers, E routed experts, C domains.

:class:`RoutingTables` is produced by the recorder (training, evaluation), by
``moe-testbed hf`` (a pretrained checkpoint), and read back from a run
directory; the metrics of record (routing/metrics.py) are computed from it.
:class:`Snapshot` is one evaluation's file ``routing/step_NNNNNN.npz``: the
tables plus the labels of their axes. Both are written and read here only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from moe_testbed.io import atomic_write
from moe_testbed.routing.metrics import reference_counts, routing_scalars

TABLE_ARRAYS = ("counts", "drops", "gate_mass_sum", "tokens", "ref_counts")


@dataclass
class RoutingTables:
    counts: np.ndarray  # [L, E, C] kept slots of domain-c tokens at expert e
    drops: np.ndarray | None = None  # [L, C] slots dropped by capacity
    gate_mass_sum: np.ndarray | None = None  # [L, C] summed gate weights of the kept slots
    tokens: np.ndarray | None = None  # [L, C] routed (real) tokens
    ref_counts: np.ndarray | None = None  # [L, E, C] the reference router on the same tokens

    def with_reference(self, groups: Sequence[Sequence[int]], top_k: int) -> RoutingTables:
        """These tables plus the reference router's counts for the same tokens (``tokens * top_k`` slots)."""
        E = self.counts.shape[1]
        ref = np.stack([reference_counts(self.tokens[layer] * top_k, groups, E) for layer in range(len(self.tokens))])
        return replace(self, ref_counts=ref)

    def scalars(self, layer_names: list[str], prefix: str = "") -> dict[str, float]:
        """The metrics of record, ``{prefix}{metric}/{layer}`` and ``/mean`` (routing/metrics.py)."""
        return routing_scalars(
            self.counts, layer_names, drops_LC=self.drops, gate_mass_sum_LC=self.gate_mass_sum,
            tokens_LC=self.tokens, ref_counts_LEC=self.ref_counts, prefix=prefix,
        )  # fmt: skip

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in TABLE_ARRAYS if getattr(self, k) is not None}


@dataclass
class Snapshot:
    """The routing tables of one evaluation (``routing/step_NNNNNN.npz``)."""

    step: int
    layers: list[str]
    domains: list[str]
    tables: RoutingTables  # validation tokens, at the evaluation capacity
    top_k: int | None = None
    train_counts: np.ndarray | None = None  # [L, E, C] training slots since the previous evaluation
    path: Path | None = None

    @property
    def n_experts(self) -> int:
        return int(self.tables.counts.shape[1])

    def scalars(self, prefix: str = "val/") -> dict[str, float]:
        """The metrics of record of this snapshot, as the trainer logs them."""
        return self.tables.scalars(self.layers, prefix)


class SnapshotError(ValueError):
    """A file that is not a readable routing snapshot."""


def snapshot_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "routing" / f"step_{step:06d}.npz"


def save_snapshot(path: Path, snap: Snapshot) -> None:
    """Write ``snap`` atomically as a compressed npz."""
    payload = {**snap.tables.arrays(), "layers": np.array(snap.layers), "domains": np.array(snap.domains),
               "step": np.array(snap.step)}  # fmt: skip
    if snap.train_counts is not None:
        payload["train_counts"] = snap.train_counts
    if snap.top_k is not None:
        payload["top_k"] = np.array(snap.top_k)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **payload)

    atomic_write(path, write)


def load_snapshot(path: Path) -> Snapshot:
    """Read one ``routing/step_NNNNNN.npz``; optional arrays that are absent become None."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise SnapshotError(f"{path} is not a readable routing snapshot: {exc}") from None
    missing = [k for k in ("counts", "layers", "domains") if k not in arrays]
    if missing:
        raise SnapshotError(f"{path} lacks the arrays {', '.join(missing)}")
    counts = arrays["counts"]
    layers = [str(x) for x in arrays["layers"]]
    domains = [str(x) for x in arrays["domains"]]
    if counts.ndim != 3 or counts.shape[0] != len(layers) or counts.shape[2] != len(domains):
        raise SnapshotError(f"{path}: counts has shape {counts.shape}, expected [L={len(layers)}, E, C={len(domains)}]")
    if "step" in arrays:
        step = int(arrays["step"])
    else:
        try:
            step = int(path.stem.split("_")[-1])
        except ValueError:
            raise SnapshotError(f"{path} has no step array and its name is not step_NNNNNN.npz") from None
    tables = RoutingTables(**{k: arrays.get(k) for k in TABLE_ARRAYS})
    top_k = int(arrays["top_k"]) if "top_k" in arrays else None
    return Snapshot(step, layers, domains, tables, top_k, arrays.get("train_counts"), path)
