"""Routing statistics accumulated on the device during forwards.

``n[layer, expert, domain]`` counts kept slots; ``drops[layer, domain]`` counts
slots that capacity dropped; ``gate_mass_sum[layer, domain]`` sums each token's
chosen gate weights; ``tokens[layer, domain]`` counts routed tokens. Padding
(domain id -1) is never counted. Everything is an ``index_add_`` into device
tensors: no host synchronisation per micro-batch; the trainer reads the tables
once per log step.
"""

from __future__ import annotations

import torch
from torch import Tensor


class RoutingRecorder:
    def __init__(self, n_layers: int, n_experts: int, n_domains: int, device: torch.device | str = "cpu"):
        self.L, self.E, self.D = n_layers, n_experts, n_domains
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        L, E, D, dev = self.L, self.E, self.D, self.device
        self.counts = torch.zeros(L, E * D, dtype=torch.long, device=dev)
        self.drops = torch.zeros(L, D, dtype=torch.long, device=dev)
        self.gate_mass_sum = torch.zeros(L, D, dtype=torch.float64, device=dev)
        self.tokens = torch.zeros(L, D, dtype=torch.long, device=dev)

    @torch.no_grad()
    def record(
        self,
        layer: int,
        idx_TK: Tensor,
        keep_TK: Tensor | None,
        gate_TK: Tensor,
        domain_ids_T: Tensor,
        unkept_are_drops: bool = True,
    ) -> None:
        valid_T = domain_ids_T >= 0
        d_T = domain_ids_T.clamp_min(0)
        kept_TK = valid_T[:, None].expand_as(idx_TK)
        if keep_TK is not None:
            kept_TK = kept_TK & keep_TK
            if unkept_are_drops:
                dropped_T = ((~keep_TK) & valid_T[:, None]).sum(1)
                self.drops[layer].index_add_(0, d_T, dropped_T)
        self.counts[layer].index_add_(0, (idx_TK * self.D + d_T[:, None]).reshape(-1), kept_TK.reshape(-1).long())
        mass_T = (gate_TK.detach().double() * kept_TK).sum(1)
        self.gate_mass_sum[layer].index_add_(0, d_T, mass_T * valid_T)
        self.tokens[layer].index_add_(0, d_T, valid_T.long())

    def tables(self) -> dict[str, Tensor]:
        """Host copies: counts [L, E, D], drops [L, D], gate_mass_sum [L, D], tokens [L, D]."""
        return {
            "counts": self.counts.view(self.L, self.E, self.D).cpu(),
            "drops": self.drops.cpu(),
            "gate_mass_sum": self.gate_mass_sum.cpu(),
            "tokens": self.tokens.cpu(),
        }

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in vars(self).items() if isinstance(v, Tensor)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k, v in state.items():
            setattr(self, k, v.to(self.device))
