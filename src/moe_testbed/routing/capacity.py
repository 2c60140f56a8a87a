"""Expert capacity and token dropping: the road's second station, after the router decides.

capacity = ceil(T_unit * k / E * capacity_factor) slots per expert per
capacity unit. The unit is ``balance.capacity_scope``, independent of the
balancing scope: ``microbatch`` (default: ``train.micro_batch_size`` sequences,
what a real expert buffer on one rank holds) or ``sequence``; a shorter last
unit (an evaluation batch's tail) gets its own, smaller capacity. Slots beyond
an expert's capacity are dropped: they contribute nothing (the token keeps its
residual path) and are counted as drops. Training uses
``balance.capacity_factor``, evaluation ``balance.eval_capacity_factor``
(``None``: dropless).

Priority inside an expert:
  ``probs``    highest gate weight first (Megatron-Core's default),
  ``position`` first choices before second choices, then earlier tokens first
               (Switch / GShard).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Capacity:
    """The capacity rule of one MoE layer, from the ``balance`` section."""

    n_experts: int
    train_factor: float | None
    eval_factor: float | None
    policy: str  # probs | position
    scope: str  # the capacity unit: microbatch | sequence

    @classmethod
    def from_config(cls, cfg) -> Capacity:
        b = cfg.balance
        return cls(cfg.model.n_experts, b.capacity_factor, b.eval_capacity_factor, b.drop_policy, b.capacity_scope)

    def keep(self, idx_TK: Tensor, gate_TK: Tensor, ctx) -> Tensor | None:
        """Bool mask [T, K] of the slots that fit; None when dropless."""
        factor = self.train_factor if ctx.training else self.eval_factor
        unit = ctx.unit_len(self.scope, idx_TK.shape[0])
        return capacity_keep(idx_TK, gate_TK, self.n_experts, factor, self.policy, unit)


def capacity(unit_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    return math.ceil(unit_tokens * top_k / n_experts * factor)


def capacity_keep(
    idx_TK: Tensor, gate_TK: Tensor, n_experts: int, factor: float | None, policy: str, unit_len: int
) -> Tensor | None:
    """Bool mask [T, K] of the slots that fit; None when dropless."""
    if factor is None:
        return None
    T, K = idx_TK.shape
    n_units = math.ceil(T / unit_len)
    unit_T = torch.arange(T, device=idx_TK.device) // unit_len
    tail = T - (n_units - 1) * unit_len
    cap_U = torch.full((n_units,), capacity(unit_len, K, n_experts, factor), device=idx_TK.device)
    cap_U[-1] = capacity(tail, K, n_experts, factor)
    group_N = (unit_T[:, None] * n_experts + idx_TK).reshape(-1)
    if policy == "probs":
        priority_N = -gate_TK.detach().reshape(-1).float()
    else:  # position: slot rank major, token position minor
        slot_rank = torch.arange(K, device=idx_TK.device)[None, :] * T + torch.arange(T, device=idx_TK.device)[:, None]
        priority_N = slot_rank.reshape(-1).float()
    # Sort by priority, then stably by group: ranks inside each group follow priority.
    order = torch.argsort(priority_N, stable=True)
    order = order[torch.argsort(group_N[order], stable=True)]
    sorted_groups = group_N[order]
    n_groups = n_units * n_experts
    group_start = torch.zeros(n_groups + 1, dtype=torch.long, device=idx_TK.device)
    # index_add_ rather than bincount, which synchronises with the host on CUDA.
    sizes = torch.zeros(n_groups, dtype=torch.long, device=idx_TK.device)
    sizes.index_add_(0, sorted_groups, torch.ones_like(sorted_groups))
    group_start[1:] = torch.cumsum(sizes, 0)
    rank_sorted = torch.arange(order.numel(), device=idx_TK.device) - group_start[sorted_groups]
    keep_N = torch.empty_like(rank_sorted, dtype=torch.bool)
    keep_N[order] = rank_sorted < cap_U[sorted_groups // n_experts]
    return keep_N.view(T, K)
