"""Balancing scope: which tokens' statistics drive the balancing.

| scope      | LBL f_e over                         | EB update uses         | SH / BA solve over          |
|------------|--------------------------------------|------------------------|-----------------------------|
| sequence   | each sequence (loss averaged)        | each sequence, averaged| each sequence               |
| microbatch | one micro-batch on one rank          | one micro-batch        | one micro-batch             |
| global     | every micro-batch of the optimizer   | the whole step         | every rank's micro-batch    |
|            | step and every data-parallel rank    |                        | (gathered)                  |

Global statistics go through :class:`ProcessGroup`, a two-method interface that
is a no-op in one process; multi-process training passes a torch.distributed
implementation without touching any balancing method.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class ProcessGroup(Protocol):
    world_size: int
    rank: int

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks (returns a new tensor; no autograd)."""

    def all_gather_cat(self, t: Tensor) -> Tensor:
        """Concatenate every rank's ``t`` along dim 0 (no autograd)."""


class LocalGroup:
    """One process: reductions are the identity."""

    world_size = 1
    rank = 0

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        return t

    def all_gather_cat(self, t: Tensor) -> Tensor:
        return t


class TorchDistributedGroup:
    """torch.distributed implementation (gloo or NCCL)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        out = t.detach().clone()
        self._dist.all_reduce(out, group=self.group)
        return out

    def all_gather_cat(self, t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self._dist.all_gather(parts, t.detach().contiguous(), group=self.group)
        return torch.cat(parts, dim=0)


def scope_unit_len(n_tokens: int, seq_len: int, scope: str) -> int:
    """Tokens per balancing unit in one micro-batch on one rank."""
    return seq_len if scope == "sequence" else n_tokens


def solve_in_units(x_TX: Tensor, seq_len: int, scope: str, group: ProcessGroup, solve) -> Tensor:
    """Apply ``solve`` ([U, T_unit, X] -> [U, T_unit, ...]) to the scope's units; return this rank's rows.

    sequence: one unit per sequence; microbatch: the micro-batch; global: every
    rank's current micro-batch, gathered (equal micro-batch sizes on every rank),
    solved as one unit, of which this rank keeps its own rows. No autograd.
    """
    T = x_TX.shape[0]
    start = 0
    if scope == "global" and group.world_size > 1:
        x_TX = group.all_gather_cat(x_TX)
        start = getattr(group, "rank", 0) * T
    unit = scope_unit_len(x_TX.shape[0], seq_len, scope)
    out = solve(x_TX.reshape(-1, unit, *x_TX.shape[1:]))
    return out.reshape(x_TX.shape[0], *out.shape[2:])[start : start + T]


def unit_counts(idx_TK: Tensor, n_experts: int, unit_len: int, weight_T: Tensor | None = None) -> Tensor:
    """Slots per expert in each unit of ``unit_len`` consecutive tokens: float [U, E].

    ``weight_T`` (1 = real token, 0 = padding) keeps padding out of the counts.
    An ``index_add_`` instead of ``bincount``: no host synchronisation on CUDA.
    """
    T, K = idx_TK.shape
    U = T // unit_len
    unit_T = torch.arange(T, device=idx_TK.device) // unit_len
    flat_N = (unit_T[:, None] * n_experts + idx_TK).reshape(-1)
    w_N = torch.ones(T * K, device=idx_TK.device) if weight_T is None else weight_T.float().repeat_interleave(K)
    return torch.zeros(U * n_experts, device=idx_TK.device).index_add_(0, flat_N, w_N).view(U, n_experts)
