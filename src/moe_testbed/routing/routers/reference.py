"""The reference router: each domain's tokens go to that domain's fixed expert group (the upper bound).

Domain d owns the experts ``info["groups"][d]`` (routing/groups.py). A token of
domain d is sent to k distinct experts of group d, chosen by ``routing.inner``:

``uniform`` (default): deterministic round-robin, balanced inside the group.
    Token t of sequence b, the r-th token of its domain within the sequence,
    takes experts ``group[(r + b*S) * k + j  mod  g]`` for j = 0..k-1 (g = group
    size >= k, so the k experts are distinct). Consecutive tokens of a domain
    walk around the group, so each expert of the group receives T_d*k/g slots
    (+-1 per sequence). Gates are 1/k; no parameters, no scores. The choice
    depends only on the labels of the token's own sequence prefix.
``learned``: a learned softmax router restricted to the group, exactly the
    domain_guided computation (see domain_guided.py); kept here so that the
    upper bound can also be measured with a learned choice inside the group.

Padding tokens (domain -1) may use any expert (round-robin over all experts
with ``uniform``); the statistics never count them. Forwards without domain
labels fail with a clear error. Balancing methods need scores, so the uniform
reference accepts only ``balance.method=none`` (and no z-loss).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_testbed.knobs import Knob, one_of
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.decision import RoutingDecision
from moe_testbed.routing.groups import check_explicit_groups
from moe_testbed.routing.registry import register_router
from moe_testbed.routing.router import Router
from moe_testbed.routing.routers.domain_guided import DomainGroupsMixin


@register_router
class Reference(DomainGroupsMixin, Router):
    name = "reference"
    knobs = {"inner": Knob("uniform", str, "reference: uniform | learned choice inside the group",
                           one_of("uniform", "learned"))}  # fmt: skip
    variants = (("inner=uniform", {"routing.inner": "uniform"}), ("inner=learned", {"routing.inner": "learned"}))
    lacking = {
        "learned": "with routing.inner=uniform spreads tokens round-robin over their group (nothing to train)",
        "scores": "with routing.inner=uniform spreads tokens round-robin over their group (no scores)",
        "any_expert": "restricts each token to its domain's experts, so uniform load is out of reach",
    }

    def __init__(self, cfg, balancer, layer, moe_index, info):
        super().__init__(cfg, balancer, layer, moe_index, info)
        self._init_groups(info)
        # Padded expert lists per group row [G, g_max] and their sizes [G]; the last row is "all experts".
        rows = [*self.groups, list(range(self.n_experts))]
        g_max = max(len(g) for g in rows)
        table = torch.tensor([g + [0] * (g_max - len(g)) for g in rows], dtype=torch.long)
        self.register_buffer("table_GM", table, persistent=False)
        self.register_buffer("size_G", torch.tensor([len(g) for g in rows]), persistent=False)

    def uses_weight(self) -> bool:
        return self.cfg.inner == "learned"

    @classmethod
    def offered(cls, cfg) -> set[str]:
        return {"learned", "scores"} if cfg.routing.inner == "learned" else set()

    @classmethod
    def check(cls, cfg) -> str | None:
        return check_explicit_groups(cfg) or super().check(cfg)

    def decide(self, x_TD: Tensor, ctx: RoutingContext) -> RoutingDecision:
        if self.cfg.inner == "learned":
            return super().decide(x_TD, ctx)
        row_T = self._domain_rows(ctx)
        T, S, k = row_T.shape[0], ctx.seq_len, self.top_k
        # r: rank of the token among the earlier tokens of its group row in its sequence.
        # (a comparison, not F.one_hot, which validates its input with a device sync)
        onehot_BSG = (row_T.view(-1, S, 1) == torch.arange(self.table_GM.shape[0], device=row_T.device)).long()
        r_T = ((onehot_BSG.cumsum(1) - 1) * onehot_BSG).sum(-1).reshape(-1)
        b_T = torch.arange(T, device=x_TD.device) // S
        size_T = self.size_G[row_T]
        pos_TK = ((r_T + b_T * S)[:, None] * k + torch.arange(k, device=x_TD.device)) % size_T[:, None]
        idx_TK = self.table_GM[row_T[:, None], pos_TK]
        gate_TK = torch.full((T, k), 1.0 / k, device=x_TD.device)
        return RoutingDecision(idx_TK=idx_TK, gate_TK=gate_TK)
