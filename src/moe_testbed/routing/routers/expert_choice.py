"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Experts choose tokens instead of tokens choosing experts. Within each scope
unit of T tokens (a sequence, a micro-batch, or in training the whole optimizer
step, every rank's tokens gathered; in evaluation the global unit is the
forward):

    probs_TE = softmax_e(W x)                            token-to-expert affinity
    C        = min(T, ceil(T * k / E * routing.seq_capacity))
    expert e processes the C tokens with the highest probs[:, e]
    y_t      = sum over experts e that chose t of probs[t, e] * FFN_e(x_t)

A token may be chosen by 0..E experts; the load is perfectly even by
construction, so no balancing method applies (z-loss may). The decision uses
all E experts per token (idx_TK = 0..E-1) with ``keep_TK`` marking the chosen
pairs and ``unkept_are_drops=False``: unchosen pairs are not capacity drops.
Capacity factors do not apply (``routing.seq_capacity`` is the capacity).

NOT CAUSAL: a token's experts depend on every other token of its unit,
including later ones, in training and in evaluation; ``causal = False`` makes
the trainer warn and record this in the run summary. Compare its loss with
causal routers with care.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moe_testbed.knobs import Knob, positive
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.decision import RoutingDecision
from moe_testbed.routing.registry import register_router
from moe_testbed.routing.router import Router
from moe_testbed.routing.scope import gather_step, own_rows, solve_units


@register_router
class ExpertChoice(Router):
    name = "expert_choice"
    causal = False
    knobs = {"seq_capacity": Knob(1.0, float, "expert_choice: experts pick seq_capacity*T*k/E tokens", positive)}
    offers = ("learned",)
    lacking = {
        "scores": "lets experts choose tokens: its load is even by construction",
        "any_expert": "lets experts choose tokens: its load is even by construction",
    }

    @classmethod
    def check(cls, cfg) -> str | None:
        problem = cls.no_capacity(cfg, "each expert's capacity is routing.seq_capacity * T*k/E")
        return problem or super().check(cfg)

    def decide(self, x_TD: Tensor, ctx: RoutingContext) -> RoutingDecision:
        T, E, k = x_TD.shape[0], self.n_experts, self.top_k
        logits_TE = self.score(x_TD, ctx)
        probs_TE = torch.softmax(logits_TE, dim=-1)

        def choose(p_UTE: Tensor, _ids=None) -> Tensor:
            U, Tu, _ = p_UTE.shape
            cap = min(Tu, math.ceil(Tu * k / E * self.cfg.seq_capacity))
            top_UCE = p_UTE.topk(cap, dim=1).indices
            return torch.zeros_like(p_UTE, dtype=torch.bool).scatter_(1, top_UCE, True)

        keep_TE = self._choose(probs_TE.detach(), choose, ctx)
        idx_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        aux = self.balancer.losses(probs_TE, logits_TE, idx_TE, ctx) if ctx.training else {}
        return RoutingDecision(
            idx_TK=idx_TE, gate_TK=probs_TE, probs_TE=probs_TE, logits_TE=logits_TE, keep_TK=keep_TE,
            unkept_are_drops=False, aux_losses=aux,
        )  # fmt: skip

    def _choose(self, probs_TE: Tensor, choose, ctx: RoutingContext) -> Tensor:
        """``choose`` over each unit of the scope; in training at global scope, over the whole step."""
        T, scope = probs_TE.shape[0], self.balancer.scope
        if scope == "global" and ctx.training:
            if not ctx.exact_global():
                raise ValueError(
                    "routing.router=expert_choice at balance.scope=global needs the whole step in one forward: "
                    "set train.forward_microbatches to the micro-batches of a step on one rank"
                )
            n_mb = ctx.n_microbatches(T)
            return own_rows(choose(gather_step(probs_TE, n_mb, ctx.group)[None])[0], n_mb, ctx.group)
        return solve_units(probs_TE, ctx.unit_len(scope, T), ctx.unit_ids(scope, T), choose)
