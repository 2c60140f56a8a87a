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

Scope: as for Sinkhorn. ``sequence`` and ``microbatch`` solve each unit, the
remainder rotating by the unit's step-wide id (so 1 and N ranks agree);
``global`` solves the whole optimizer step, every rank's scores gathered in the
step's order. When the step takes several forwards (carried mode), each token
takes top-k of ``a - p`` with ``p`` the expert prices of the previous step's
whole-step problem (the dual prices of its LP, by the same best-response
iteration), which balances approximately, not exactly: the testbed's fallback,
recorded in the run summary. Padding tokens take slots like other tokens (they
are only kept out of the statistics), so with padding the real tokens see
slightly less than T*k/E.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_testbed.knobs import Knob, at_least
from moe_testbed.routing.assignment import balanced_assignment, equilibrium_prices, unit_capacities
from moe_testbed.routing.balancer import Balancer
from moe_testbed.routing.balancing.sh import log_scores
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import register_balancer
from moe_testbed.routing.scope import gather_step, own_rows, solve_units
from moe_testbed.routing.step_scores import StepScores

AUCTION_EPS = 1e-3  # in log-probability units (used by the auction solver only)
PRICE_ITERS = 16  # best-response price iterations before the exact repair (fewer: more augmentations)


@register_balancer
class BalancedAssignment(Balancer):
    """Balanced linear assignment: every expert gets exactly its capacity (BASE layers)."""

    name = "ba"
    requires = ("scores", "any_expert")
    knobs = {"ba_iters": Knob(50, int, "BA: cap on repair augmentations (then a greedy completion)", at_least(1))}
    overhead_budget_pct = 30.0

    def __init__(self, n_experts, top_k, bcfg, layer):
        super().__init__(n_experts, top_k, bcfg, layer)
        self.register_buffer("carried_price_E", torch.zeros(n_experts))  # global, carried: last step's prices
        self.step_scores = StepScores()

    @torch.no_grad()
    def selection_scores(self, probs_TE: Tensor, ctx: RoutingContext) -> Tensor:
        return log_scores(probs_TE) if ctx.training else probs_TE

    @torch.no_grad()
    def select(self, sel_TE: Tensor, k: int, ctx: RoutingContext) -> Tensor:
        if not ctx.training:
            return super().select(sel_TE, k, ctx)
        T = sel_TE.shape[0]
        offset = ctx.step + self.layer  # plus the unit's id: the remainder rotates over units, steps, layers
        if self.scope == "global":
            n_mb = ctx.n_microbatches(T)
            if not ctx.exact_global():
                self.step_scores.add(sel_TE, ctx)
                return (sel_TE - self.carried_price_E.to(sel_TE.dtype)).topk(k, dim=-1).indices
            idx_TK = self._solve(gather_step(sel_TE, n_mb, ctx.group)[None], torch.tensor([offset]), k)[0]
            return own_rows(idx_TK, n_mb, ctx.group)
        unit = ctx.unit_len(self.scope, T)
        return solve_units(sel_TE, unit, ctx.unit_ids(self.scope, T), lambda a, ids: self._solve(a, ids + offset, k))

    def _solve(self, a_UTE: Tensor, unit_ids_U: Tensor, k: int) -> Tensor:
        U, T, E = a_UTE.shape
        cap_UE = unit_capacities(unit_ids_U.to(a_UTE.device), T, k, E)
        res = balanced_assignment(a_UTE, k, cap_UE, AUCTION_EPS, self.cfg.ba_iters, PRICE_ITERS, solver="repair")
        return res.idx_UTK

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        step = self.step_scores.take_step()
        if step is not None:  # carried mode: the whole step's dual prices route the next step
            T, E = step.shape
            cap_1E = unit_capacities(torch.zeros(1, dtype=torch.long, device=step.device), T, self.top_k, E)
            self.carried_price_E.copy_(equilibrium_prices(step[None].float(), self.top_k, cap_1E, PRICE_ITERS)[0])
