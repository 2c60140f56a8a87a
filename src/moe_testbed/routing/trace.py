"""Per-token routing of evaluation forwards, kept for offline analyses (a Parquet file a person opens with pandas).

Tensor legend: T tokens of a forward, K experts per token, E experts, L MoE layers, N traced tokens.

The marginal tables (routing/recorder.py) answer "how many slots of domain d did
expert e take"; questions about *which* tokens an expert takes (vocabulary,
token classes, co-activation, layer-to-layer consistency, the router's
confidence) need every token. :class:`RoutingTrace` keeps, for the first
``budget`` real tokens of the evaluation forwards (padding is skipped):

    seq, pos, token, domain                    where the token is, what it is
    L{l}.experts  int16[K]                     its K experts at MoE layer l, in the router's order
    L{l}.gates    float32[K]                   their gate weights
    L{l}.kept     bool[K]                      False where evaluation capacity dropped the slot
    L{l}.entropy  float32                      entropy of the router's score distribution (nats;
                                               sigmoid scores normalised to sum 1 first)
    L{l}.margin   float32                      k-th minus (k+1)-th largest score: how close the
                                               token was to another choice (NaN when K = E)
    token_class   int8 (optional)              the token's class, where the token ids are not the
                                               mix's (``moe-testbed hf`` traces, analysis/hf_trace.py)

The evaluation loop calls :meth:`begin` with a forward's token ids and domains,
the routers call :meth:`record` once per MoE layer (``RoutingContext.trace``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from moe_testbed.io import atomic_write
from moe_testbed.routing.decision import RoutingDecision

TRACE_VERSION = 1


class RoutingTrace:
    def __init__(self, n_layers: int, top_k: int, budget: int):
        self.L, self.K, self.budget = n_layers, top_k, budget
        self.meta: list[dict[str, np.ndarray]] = []  # one per traced forward
        self.layers: list[list[dict[str, np.ndarray]]] = []
        self.n = 0
        self._keep: np.ndarray | None = None  # this forward's traced rows (real tokens within the budget)

    @property
    def full(self) -> bool:
        return self.n >= self.budget

    def begin(self, token_ids_BS: Tensor, domain_ids_BS: Tensor, first_seq: int) -> None:
        """A forward of B sequences starts (``first_seq``: the first one's index in the evaluation set)."""
        if self.full:
            self._keep = None
            return
        B, S = token_ids_BS.shape
        dom = domain_ids_BS.reshape(-1).cpu().numpy()
        rows = np.flatnonzero(dom >= 0)[: self.budget - self.n]  # padding is not traced
        self._keep = rows
        self.meta.append({
            "seq": (first_seq + rows // S).astype(np.int32), "pos": (rows % S).astype(np.int32),
            "token": token_ids_BS.reshape(-1).cpu().numpy()[rows].astype(np.int32), "domain": dom[rows].astype(np.int16),
        })  # fmt: skip
        self.layers.append([{} for _ in range(self.L)])
        self.n += len(rows)

    @torch.no_grad()
    def record(self, layer: int, dec: RoutingDecision) -> None:
        if self._keep is None:
            return
        rows = torch.as_tensor(self._keep, device=dec.idx_TK.device)
        kept = dec.keep_TK if dec.keep_TK is not None else torch.ones_like(dec.idx_TK, dtype=torch.bool)
        out = {"experts": dec.idx_TK[rows].to(torch.int16), "gates": dec.gate_TK[rows].float(), "kept": kept[rows]}
        if dec.probs_TE is not None:
            p_TE = dec.probs_TE[rows].float()
            p_TE = p_TE / p_TE.sum(-1, keepdim=True).clamp_min(1e-30)
            out["entropy"] = -(p_TE * p_TE.clamp_min(1e-30).log()).sum(-1)
            E = p_TE.shape[1]
            if self.K < E:
                top = dec.probs_TE[rows].float().topk(self.K + 1, dim=-1).values
                out["margin"] = top[:, self.K - 1] - top[:, self.K]
        self.layers[-1][layer] = {k: v.cpu().numpy() for k, v in out.items()}

    def table(self, layer_names: list[str], domains: list[str], extra: dict | None = None) -> pa.Table:
        """The trace as one Arrow table (one row per traced token), its meaning in the schema's metadata."""
        cols: dict[str, pa.Array] = {}
        for key in ("seq", "pos", "token", "domain"):
            cols[key] = pa.array(np.concatenate([m[key] for m in self.meta]) if self.meta else np.zeros(0, np.int32))
        for l in range(len(layer_names)):
            parts = [f[l] for f in self.layers]
            for key, width in (("experts", self.K), ("gates", self.K), ("kept", self.K)):
                flat = np.concatenate([p[key] for p in parts]).reshape(-1) if parts else np.zeros(0)
                cols[f"L{l}.{key}"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), width)
            for key in ("entropy", "margin"):
                vals = [p.get(key) for p in parts]
                n = [len(m["seq"]) for m in self.meta]
                filled = [v if v is not None else np.full(k, np.nan, np.float32) for v, k in zip(vals, n)]
                cols[f"L{l}.{key}"] = pa.array(np.concatenate(filled).astype(np.float32) if filled else np.zeros(0))
        meta = {"version": TRACE_VERSION, "layers": layer_names, "domains": domains, "top_k": self.K, **(extra or {})}
        return pa.table(cols).replace_schema_metadata({"moe_testbed": json.dumps(meta)})


def trace_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "traces" / f"step_{step:06d}.parquet"


def save_trace(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


@dataclass
class Trace:
    """A saved trace as arrays: ``experts`` / ``gates`` / ``kept`` [L, N, K], ``entropy`` / ``margin`` [L, N]."""

    seq: np.ndarray
    pos: np.ndarray
    token: np.ndarray
    domain: np.ndarray
    experts: np.ndarray
    gates: np.ndarray
    kept: np.ndarray
    entropy: np.ndarray
    margin: np.ndarray
    meta: dict
    # Each token's class (analysis/token_routing.py TOKEN_CLASSES), stored where the trace's token ids are
    # not the mix's (``moe-testbed hf``: the checkpoint's tokenizer); None: classes come from the mix.
    token_class: np.ndarray | None = None

    @property
    def layers(self) -> list[str]:
        return list(self.meta["layers"])

    @property
    def domains(self) -> list[str]:
        return list(self.meta["domains"])


def load_trace(path: Path) -> Trace:
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"moe_testbed"])
    L, K = len(meta["layers"]), int(meta["top_k"])

    def stack(key: str, width: int | None) -> np.ndarray:
        arrs = [table.column(f"L{l}.{key}").combine_chunks() for l in range(L)]
        if width is None:
            return np.stack([a.to_numpy(zero_copy_only=False) for a in arrs])
        return np.stack([a.flatten().to_numpy(zero_copy_only=False).reshape(-1, width) for a in arrs])

    col = {k: table.column(k).to_numpy() for k in ("seq", "pos", "token", "domain")}
    if "token_class" in table.column_names:
        col["token_class"] = table.column("token_class").to_numpy().astype(np.int64)
    return Trace(**col, experts=stack("experts", K).astype(np.int64), gates=stack("gates", K),
                 kept=stack("kept", K).astype(bool), entropy=stack("entropy", None), margin=stack("margin", None),
                 meta=meta)  # fmt: skip
