"""What a router may know besides the hidden states of its layer.

Tensor legend: T tokens of the forward on this rank (batch x sequence, flattened).

A token's domain label travels from the loader (``domain_ids`` of the batch)
through the trainer, which puts it here, to every MoE layer's road
(``Router.forward``): the domain routers read it, LBL, EB and z-loss weight
tokens by ``valid_T``, and the :class:`RoutingRecorder` counts slots per
domain into the tables that become ``metrics.jsonl`` and ``routing/*.npz``.
Padding (domain id -1) is decoded here once, into ``valid_T``; nothing else
compares domain ids with -1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moe_testbed.routing.recorder import RoutingRecorder
from moe_testbed.routing.scope import LocalGroup, ProcessGroup

if TYPE_CHECKING:  # pyarrow loads only where a trace is made
    from moe_testbed.routing.trace import RoutingTrace

PADDING = -1  # the domain id of padding tokens (the loaders write it)


@dataclass
class RoutingContext:
    training: bool = False
    seq_len: int = 1  # tokens per sequence: T = B * seq_len
    domain_ids_T: Tensor | None = None  # int64 domain of each token; PADDING marks padding
    token_ids_T: Tensor | None = None
    step: int = 0  # optimizer steps completed
    # The forward holds consecutive micro-batches of this rank (the trainer may forward several at
    # once): `microbatch_size` sequences each (None: the forward is one micro-batch), the first being
    # this rank's `microbatch`-th of the step. They stay the units of `microbatch` scope.
    microbatch: int = 0
    microbatch_size: int | None = None
    whole_step: bool = False  # the forward holds this rank's whole share of the step: global scope is exact
    group: ProcessGroup = field(default_factory=LocalGroup)  # data-parallel ranks (global scope)
    recorder: RoutingRecorder | None = None  # counts every layer's slots per domain when set
    trace: RoutingTrace | None = None  # keeps every layer's per-token routing when set (evaluation)
    _valid: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def valid_T(self) -> Tensor | None:
        """Float mask [T]: 1 for a real token, 0 for padding; None when no labels are known."""
        if self.domain_ids_T is None:
            return None
        if self._valid is None or self._valid[0] is not self.domain_ids_T:
            self._valid = (self.domain_ids_T, (self.domain_ids_T != PADDING).float())
        return self._valid[1]

    def domains_or(self, fill: int) -> Tensor:
        """Domain ids with padding replaced by ``fill`` (a valid index for tables and masks)."""
        if self.domain_ids_T is None:
            raise ValueError("the forward got no domain ids: pass RoutingContext(domain_ids_T=...)")
        return torch.where(self.valid_T > 0, self.domain_ids_T, fill)

    # -- the scope's units in this forward ------------------------------------------------
    def sequences_per_microbatch(self, n_tokens: int) -> int:
        return self.microbatch_size or max(n_tokens // self.seq_len, 1)

    def n_microbatches(self, n_tokens: int) -> int:
        return -(-n_tokens // (self.sequences_per_microbatch(n_tokens) * self.seq_len))

    def unit_len(self, scope: str, n_tokens: int) -> int:
        """Tokens per unit of ``scope`` in this forward (``global``: the whole forward of this rank)."""
        if scope == "sequence":
            return self.seq_len
        if scope == "microbatch":
            return self.sequences_per_microbatch(n_tokens) * self.seq_len
        return n_tokens

    def unit_ids(self, scope: str, n_tokens: int) -> Tensor:
        """Step-wide ids of this forward's units (the same whatever the rank count or the forward's size).

        Micro-batch b of this forward is the step's micro-batch ``(microbatch + b) * W + rank``;
        its sequences s have ids ``that * microbatch_size + s``; the global unit is 0.
        """
        W, rank = self.group.world_size, self.group.rank
        mb_B = (self.microbatch + torch.arange(self.n_microbatches(n_tokens))) * W + rank
        if scope == "microbatch":
            return mb_B
        if scope == "sequence":
            per = self.sequences_per_microbatch(n_tokens)
            return (mb_B[:, None] * per + torch.arange(per)).reshape(-1)[: -(-n_tokens // self.seq_len)]
        return torch.zeros(1, dtype=torch.long)

    def exact_global(self) -> bool:
        """A training forward that holds this rank's whole step: global scope sees every token of the step."""
        return self.training and self.whole_step
