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

import torch
from torch import Tensor

from moe_testbed.routing.recorder import RoutingRecorder
from moe_testbed.routing.scope import LocalGroup, ProcessGroup

PADDING = -1  # the domain id of padding tokens (the loaders write it)


@dataclass
class RoutingContext:
    training: bool = False
    seq_len: int = 1  # tokens per sequence: T = B * seq_len
    domain_ids_T: Tensor | None = None  # int64 domain of each token; PADDING marks padding
    token_ids_T: Tensor | None = None
    step: int = 0  # optimizer steps completed
    microbatch: int = 0  # index of the micro-batch inside the optimizer step
    group: ProcessGroup = field(default_factory=LocalGroup)  # data-parallel ranks (global scope)
    recorder: RoutingRecorder | None = None  # counts every layer's slots per domain when set
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
