"""Balanced assignment (BASE layers, Lewis et al. 2021), generalised to top-k.

During training each scope unit of T tokens solves the linear assignment

    max  sum_{t,e} a[t,e] x[t,e]      a = log probs (for softmax: the logits up to
                                      a per-token constant, which a fixed row sum
                                      makes irrelevant -- BASE's objective)
    s.t. sum_e x[t,e] = k             each token gets k distinct experts
         sum_t x[t,e] = c_e           each expert gets exactly its capacity
         x[t,e] in {0, 1}

with ``c_e = T*k/E``; when E does not divide T*k, the remainder r goes to r
experts that rotate from unit to unit and step to step (routing/assignment.py,
``unit_capacities``). Solver: expert prices from a damped best-response
iteration on the LP dual, top-k of ``a - price`` (optimal for the loads it
gives), then successive shortest paths on the E x E expert graph move single
slots until every expert holds exactly its capacity (routing/repair.py). The
result is the exact optimum (tests compare with SciPy). ``balance.ba_iters``
caps the augmentations, after which a greedy completion fills the slots left.
(``balanced_assignment(..., solver="auction")`` is the eps-optimal auction of
Bertsekas, kept as a cross-check.)

Gate weights come from the router's probs at the assigned experts, so the router
learns through the gates. Evaluation uses plain (greedy) top-k: at inference
a balanced assignment would make a token's expert depend on other tokens.
Scope: as for Sinkhorn (sequence / micro-batch / every rank's micro-batch).
Padding tokens take slots like other tokens (they are only kept out of the
statistics), so with padding the real tokens see slightly less than T*k/E.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_testbed.knobs import Knob, at_least
from moe_testbed.routing.assignment import balanced_assignment, unit_capacities
from moe_testbed.routing.balancer import Balancer
from moe_testbed.routing.balancing.sh import log_scores
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import register_balancer
from moe_testbed.routing.scope import solve_in_units

AUCTION_EPS = 1e-3  # in log-probability units (used by the auction solver only)
PRICE_ITERS = 16  # best-response price iterations before the exact repair (fewer: more augmentations)


@register_balancer
class BalancedAssignment(Balancer):
    """Balanced linear assignment: every expert gets exactly its capacity (BASE layers)."""

    name = "ba"
    requires = ("scores", "any_expert")
    knobs = {"ba_iters": Knob(50, int, "BA: cap on repair augmentations (then a greedy completion)", at_least(1))}
    overhead_budget_pct = 30.0

    @torch.no_grad()
    def selection_scores(self, probs_TE: Tensor, ctx: RoutingContext) -> Tensor:
        return log_scores(probs_TE) if ctx.training else probs_TE

    @torch.no_grad()
    def select(self, sel_TE: Tensor, k: int, ctx: RoutingContext) -> Tensor:
        if not ctx.training:
            return super().select(sel_TE, k, ctx)
        offset = ctx.step + ctx.microbatch + self.layer

        def solve(a_UTE: Tensor) -> Tensor:
            U, T, E = a_UTE.shape
            cap_UE = unit_capacities(U, T, k, E, a_UTE.device, offset=offset)
            res = balanced_assignment(a_UTE, k, cap_UE, AUCTION_EPS, self.cfg.ba_iters, PRICE_ITERS, solver="repair")
            return res.idx_UTK

        return solve_in_units(sel_TE, ctx.seq_len, self.scope, ctx.group, solve)
