"""The MoE feed-forward layer: route -> routed experts (+ shared experts).

Everything that happens to the routing of a token (the router's decision,
capacity, the balancing method's bookkeeping, the statistics) is the router's
road, in ``moe_testbed.routing`` (router.py); this layer only computes.
"""

from __future__ import annotations

from torch import Tensor, nn

from moe_testbed.model.experts import GroupedExperts
from moe_testbed.model.ffn import SwiGLU
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import build_router


class MoELayer(nn.Module):
    def __init__(self, cfg, layer: int, moe_index: int, info: dict):
        super().__init__()
        m = cfg.model
        self.layer, self.moe_index = layer, moe_index
        self.router = build_router(cfg, layer, moe_index, info)
        self.experts = GroupedExperts(m.n_experts, m.d_model, m.expert_hidden, impl=m.expert_impl)
        self.shared = SwiGLU(m.d_model, m.n_shared_experts * m.expert_hidden) if m.n_shared_experts else None
        self.aux_losses: dict[str, Tensor] = {}

    def forward(self, x_BSD: Tensor, ctx: RoutingContext) -> Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        dec = self.router(x_TD, ctx)
        if self.router.mixes_tokens:  # soft_moe: every expert's input is a mixture of tokens
            y_TD = self.router.combine_experts(x_TD, dec, self.experts, ctx)
        else:
            y_TD = self.experts(x_TD, dec.idx_TK, dec.gate_TK, dec.keep_TK)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        self.aux_losses = dec.aux_losses
        return y_TD.view_as(x_BSD)
