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
