"""The MoE feed-forward layer: router -> capacity -> experts (+ shared experts)."""

from __future__ import annotations

from torch import Tensor, nn

from moe_testbed.model.experts import GroupedExperts
from moe_testbed.model.ffn import SwiGLU
from moe_testbed.routing.base import RoutingContext
from moe_testbed.routing.capacity import capacity_keep
from moe_testbed.routing.registry import build_router
from moe_testbed.routing.scope import scope_unit_len


class MoELayer(nn.Module):
    def __init__(self, cfg, layer: int, moe_index: int, info: dict):
        super().__init__()
        m = cfg.model
        self.layer, self.moe_index = layer, moe_index
        self.n_experts, self.top_k = m.n_experts, cfg.routing.top_k
        self.scope, self.drop_policy = cfg.balance.scope, cfg.balance.drop_policy
        self.router = build_router(cfg, layer, info)
        self.experts = GroupedExperts(m.n_experts, m.d_model, m.expert_hidden, impl=m.expert_impl)
        self.shared = SwiGLU(m.d_model, m.n_shared_experts * m.expert_hidden) if m.n_shared_experts else None
        self.aux_losses: dict[str, Tensor] = {}

    def forward(self, x_BSD: Tensor, ctx: RoutingContext) -> Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        dec = self.router(x_TD, ctx)
        keep_TK = dec.keep_TK
        if keep_TK is None:
            unit = scope_unit_len(x_TD.shape[0], ctx.seq_len, self.scope)
            keep_TK = capacity_keep(
                dec.idx_TK, dec.gate_TK, self.n_experts, ctx.capacity_factor, self.drop_policy, unit
            )
        if ctx.training:
            self.router.balancer.observe(dec.idx_TK, keep_TK, ctx)
        y_TD = self.experts(x_TD, dec.idx_TK, dec.gate_TK, keep_TK)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        if ctx.recorder is not None and ctx.domain_ids_T is not None:
            ctx.recorder.record(
                self.moe_index, dec.idx_TK, keep_TK, dec.gate_TK, ctx.domain_ids_T, dec.unkept_are_drops
            )
        self.aux_losses = dec.aux_losses
        return y_TD.view_as(x_BSD)
