"""Routing statistics accumulated on the device during forwards.

``counts[layer, expert, domain]`` counts kept slots; ``drops[layer, domain]``
counts slots that capacity dropped; ``gate_mass_sum[layer, domain]`` sums each
token's chosen gate weights; ``tokens[layer, domain]`` counts routed tokens.
Padding is never counted. Everything is an ``index_add_`` into device tensors:
no host synchronisation per micro-batch; :meth:`tables` copies them to the
host (the trainer does it once per log step) as one :class:`RoutingTables`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_testbed.routing.decision import RoutingDecision
from moe_testbed.routing.scope import ProcessGroup
from moe_testbed.routing.tables import RoutingTables


class RoutingRecorder:
    def __init__(self, n_layers: int, n_experts: int, n_domains: int, device: torch.device | str = "cpu"):
        self.L, self.E, self.C = n_layers, n_experts, n_domains
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        L, E, C, dev = self.L, self.E, self.C, self.device
        self.counts = torch.zeros(L, E * C, dtype=torch.long, device=dev)
        self.drops = torch.zeros(L, C, dtype=torch.long, device=dev)
        self.gate_mass_sum = torch.zeros(L, C, dtype=torch.float64, device=dev)
        self.tokens = torch.zeros(L, C, dtype=torch.long, device=dev)

    @torch.no_grad()
    def record(self, layer: int, dec: RoutingDecision, domain_T: Tensor, valid_T: Tensor) -> None:
        """Count one layer's decision; ``domain_T`` holds a valid index for padding, ``valid_T`` is 0 there."""
        idx_TK, keep_TK = dec.idx_TK, dec.keep_TK
        real_T = valid_T > 0
        kept_TK = real_T[:, None].expand_as(idx_TK)
        if keep_TK is not None:
            kept_TK = kept_TK & keep_TK
            if dec.unkept_are_drops:
                dropped_T = ((~keep_TK) & real_T[:, None]).sum(1)
                self.drops[layer].index_add_(0, domain_T, dropped_T)
        self.counts[layer].index_add_(0, (idx_TK * self.C + domain_T[:, None]).reshape(-1), kept_TK.reshape(-1).long())
        mass_T = (dec.gate_TK.detach().double() * kept_TK).sum(1)
        self.gate_mass_sum[layer].index_add_(0, domain_T, mass_T * real_T)
        self.tokens[layer].index_add_(0, domain_T, real_T.long())

    def tables(self, group: ProcessGroup | None = None) -> RoutingTables:
        """Host copies, summed over ``group``'s ranks: counts [L, E, C], drops, gate_mass_sum, tokens [L, C]."""

        def host(t: Tensor):
            return (t if group is None else group.all_reduce_sum(t)).cpu().numpy()

        return RoutingTables(
            counts=host(self.counts.view(self.L, self.E, self.C)),
            drops=host(self.drops),
            gate_mass_sum=host(self.gate_mass_sum),
            tokens=host(self.tokens),
        )

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in vars(self).items() if isinstance(v, Tensor)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k, v in state.items():
            setattr(self, k, v.to(self.device))
