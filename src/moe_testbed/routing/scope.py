"""Balancing scope: the set of tokens whose statistics drive the balancing, fixed by the config alone.

| scope        | the tokens                                                      |
|--------------|-----------------------------------------------------------------|
| `sequence`   | each sequence                                                   |
| `microbatch` | each group of ``train.micro_batch_size`` sequences on one rank  |
| `global`     | every token of the optimizer step: every micro-batch, every rank |

The same set for every method (docs/routing.md has each method's definition at
each scope) and however the step is executed: the trainer may forward several
micro-batches at once (``train.forward_microbatches``), and the units stay
logical (``RoutingContext.microbatch_size``). At ``global`` scope a forward that
holds this rank's whole share of the step sees the step exactly: counts are
all-reduced and scores gathered from every rank, in the step's micro-batch order
(:func:`gather_step`), so that N ranks solve the very problem one process
solves. When a step takes several forwards, global-scope methods fall back to
statistics carried from the previous step (see each method), and the run
records it.

Ranks are reached through :class:`ProcessGroup`, a two-method interface that is
the identity in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor


class ProcessGroup(Protocol):
    world_size: int
    rank: int

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks (returns a new tensor; no autograd)."""

    def all_gather_cat(self, t: Tensor) -> Tensor:
        """Concatenate every rank's ``t`` along dim 0, in rank order (no autograd)."""


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


def gather_step(x_TX: Tensor, n_microbatches: int, group: ProcessGroup) -> Tensor:
    """Every rank's rows of this forward, ordered as one process holds the step: [W * T, ...].

    Rank r's j-th micro-batch is the step's micro-batch ``j * W + r`` (the
    loader's order), so the step's order is the rank-major gather with its
    (rank, micro-batch) blocks transposed.
    """
    W = group.world_size
    if W == 1:
        return x_TX
    gathered = group.all_gather_cat(x_TX)
    blocks = gathered.view(W, n_microbatches, -1, *x_TX.shape[1:]).transpose(0, 1)
    return blocks.reshape(-1, *x_TX.shape[1:])


def own_rows(x_all: Tensor, n_microbatches: int, group: ProcessGroup) -> Tensor:
    """This rank's rows of a step-ordered tensor (the inverse of :func:`gather_step`)."""
    W = group.world_size
    if W == 1:
        return x_all
    blocks = x_all.view(n_microbatches, W, -1, *x_all.shape[1:])[:, group.rank]
    return blocks.reshape(-1, *x_all.shape[1:])


def unit_spans(n_tokens: int, unit_len: int) -> list[tuple[int, int, int]]:
    """(start, number of units, unit length) of the full units, then the shorter last unit if any."""
    full, tail = divmod(n_tokens, unit_len)
    spans = [(0, full, unit_len)] if full else []
    if tail:
        spans.append((full * unit_len, 1, tail))
    return spans


def solve_units(x_TX: Tensor, unit_len: int, unit_ids: Tensor, solve: Callable) -> Tensor:
    """Apply ``solve(x_UTX, ids_U)`` to consecutive units of ``unit_len`` tokens (a shorter last one alone)."""
    outs = []
    for start, n_units, length in unit_spans(x_TX.shape[0], unit_len):
        part = x_TX[start : start + n_units * length].reshape(n_units, length, *x_TX.shape[1:])
        first = start // unit_len
        out = solve(part, unit_ids[first : first + n_units])
        outs.append(out.reshape(n_units * length, *out.shape[2:]))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def unit_counts(idx_TK: Tensor, n_experts: int, unit_len: int, weight_T: Tensor | None = None) -> Tensor:
    """Slots per expert in each unit of ``unit_len`` consecutive tokens (a shorter last one too): float [U, E].

    ``weight_T`` (1 = real token, 0 = padding) keeps padding out of the counts.
    An ``index_add_`` instead of ``bincount``: no host synchronisation on CUDA.
    """
    T, K = idx_TK.shape
    U = -(-T // unit_len)
    unit_T = torch.arange(T, device=idx_TK.device) // unit_len
    flat_N = (unit_T[:, None] * n_experts + idx_TK).reshape(-1)
    w_N = torch.ones(T * K, device=idx_TK.device) if weight_T is None else weight_T.float().repeat_interleave(K)
    return torch.zeros(U * n_experts, device=idx_TK.device).index_add_(0, flat_N, w_N).view(U, n_experts)


def unit_sums(x_TX: Tensor, unit_len: int) -> Tensor:
    """Sums of ``x`` over each unit of ``unit_len`` consecutive tokens (a shorter last one too): [U, X]."""
    T = x_TX.shape[0]
    unit_T = torch.arange(T, device=x_TX.device) // unit_len
    return x_TX.new_zeros(-(-T // unit_len), x_TX.shape[1]).index_add_(0, unit_T, x_TX)
