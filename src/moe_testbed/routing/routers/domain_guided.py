"""Domain-guided routing (the "language-guided" router of Fan et al. 2024).

The domain label of a token picks its group of experts (routing/groups.py:
``reference_groups``, passed by the trainer as ``info["groups"]``); a learned
router chooses the top-k *inside* that group:

    logits[t, e] = (W x_t)_e    if e in group(domain_t)   else -inf
    probs = softmax(logits),  idx = topk(probs),  gates = probs[idx]

The same mask also applies to the selection scores, so that a balancing bias
(EB) can never move a token out of its group. Padding tokens (domain -1) may
use every expert. Each group needs at least top_k experts. Forwards without
domain labels fail with a clear error.

Balancing: LBL, EB and z-loss act inside the groups. SH and BA are rejected:
they force uniform load over *all* experts, which is out of reach when a scope
unit holds only a few domains (a micro-batch of single-domain sequences).
"""

from __future__ import annotations

from torch import Tensor

from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.groups import check_explicit_groups, group_members, groups_from_info
from moe_testbed.routing.registry import register_router
from moe_testbed.routing.router import Router


class DomainGroupsMixin:
    """Loads the domain groups and turns domain ids into masks over experts."""

    uses_domain_groups = True

    def _init_groups(self, info: dict) -> None:
        groups = groups_from_info(info, self.n_experts, self.top_k, self.name, self.cfg.groups)
        small = [g for g in groups if len(set(g)) < self.top_k]
        if small:
            raise ValueError(f"routing.router={self.name}: group {small[0]} has fewer than top_k={self.top_k} experts")
        self.groups = [sorted(set(g)) for g in groups]
        # Not persistent: derived from the data's domains, not learned.
        self.register_buffer("member_GE", group_members(self.groups, self.n_experts), persistent=False)

    def _domain_rows(self, ctx: RoutingContext) -> Tensor:
        """Row of member_GE for each token: its domain, or the last row (all experts) for padding."""
        if ctx.domain_ids_T is None:
            raise ValueError(
                f"routing.router={self.name} routes by domain label, but the forward got no domain ids: "
                "pass RoutingContext(domain_ids_T=...) (the trainer and evaluation do)"
            )
        return ctx.domains_or(self.member_GE.shape[0] - 1)

    def allowed(self, ctx: RoutingContext) -> Tensor | None:
        return self.member_GE[self._domain_rows(ctx)]


@register_router
class DomainGuided(DomainGroupsMixin, Router):
    name = "domain_guided"
    offers = ("learned", "scores")
    lacking = {"any_expert": "restricts each token to its domain's experts, so uniform load is out of reach"}

    def __init__(self, cfg, balancer, layer, moe_index, info):
        super().__init__(cfg, balancer, layer, moe_index, info)
        self._init_groups(info)

    @classmethod
    def check(cls, cfg) -> str | None:
        return check_explicit_groups(cfg) or super().check(cfg)
