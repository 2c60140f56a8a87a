"""Hash routing (Roller et al. 2021, "Hash Layers for Large Sparse Models"), balanced by token frequency.

A fixed table maps each token id to k distinct experts; nothing is learned.
The table is built once, greedily, so that the experts' loads (in training
tokens) are as even as the token frequencies allow:

    visit token ids by descending frequency (ties: lower id first)
    give each one the k currently least-loaded experts (ties: lower expert id)
    add its frequency to their loads

This is the classical longest-processing-time rule: no expert's load exceeds
the mean by more than one token's frequency. Frequencies come from
``info["token_frequencies"]()`` (counts [vocab] from the training mix),
add-one smoothed so that tokens unseen in training are spread too; without
them (a model built outside the trainer) every id counts once, which gives a
round-robin table. Gates are 1/k: there are no scores. The table is a buffer,
saved with the model, so a checkpoint routes as it was trained.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.decision import RoutingDecision
from moe_testbed.routing.registry import register_router
from moe_testbed.routing.router import Router


def greedy_hash_table(freq_V: np.ndarray, n_experts: int, top_k: int) -> np.ndarray:
    """Token id -> k distinct experts [V, k], balancing summed frequency greedily (a loop over the vocabulary)."""
    freq_V = np.asarray(freq_V, dtype=np.float64)
    load_E = np.zeros(n_experts)
    table_VK = np.zeros((len(freq_V), top_k), dtype=np.int64)
    for v in np.argsort(-freq_V, kind="stable"):
        chosen = np.argsort(load_E, kind="stable")[:top_k]
        table_VK[v] = np.sort(chosen)
        load_E[chosen] += freq_V[v]
    return table_VK


@register_router
class HashRouter(Router):
    name = "hash"
    offers = ()
    lacking = {
        "learned": "routes by a fixed token-id table (nothing to train)",
        "scores": "routes by a fixed token-id table (no scores)",
        "any_expert": "routes by a fixed token-id table (no scores)",
    }

    def __init__(self, cfg, balancer, layer, moe_index, info):
        super().__init__(cfg, balancer, layer, moe_index, info)
        vocab, n_experts, top_k = info.get("vocab_size"), self.n_experts, self.top_k
        if vocab is None:
            raise ValueError("routing.router=hash needs the vocabulary size: pass info={'vocab_size': V, ...}")
        # Every MoE layer uses the same table: build it once per model (info is shared).
        cache = info.setdefault("_hash_tables", {})
        if (n_experts, top_k) not in cache:
            freq_fn = info.get("token_frequencies")
            freq_V = np.zeros(vocab) if freq_fn is None else np.asarray(freq_fn(), dtype=np.float64)[:vocab]
            freq_V = np.concatenate([freq_V, np.zeros(vocab - len(freq_V))])
            cache[(n_experts, top_k)] = greedy_hash_table(freq_V + 1.0, n_experts, top_k)
        self.register_buffer("table_VK", torch.from_numpy(cache[(n_experts, top_k)]).clone())

    def uses_weight(self) -> bool:
        return False

    def decide(self, x_TD: Tensor, ctx: RoutingContext) -> RoutingDecision:
        if ctx.token_ids_T is None:
            raise ValueError("routing.router=hash needs the token ids: pass RoutingContext(token_ids_T=...)")
        idx_TK = self.table_VK[ctx.token_ids_T.reshape(-1)]
        gate_TK = torch.full(idx_TK.shape, 1.0 / self.top_k, device=x_TD.device)
        return RoutingDecision(idx_TK=idx_TK, gate_TK=gate_TK)
