"""Sinkhorn balancing of the score matrix before top-k (Clark et al. 2022, S-BASE; Sinkhorn & Knopp 1967).

During training, the token x expert score matrix of each scope unit is scaled
to the transport plan with uniform marginals,

    rows: sum_e plan[t, e] = 1/T       every token carries the same mass
    cols: sum_t plan[t, e] = 1/E       every expert receives the same mass

by ``balance.sinkhorn_iters`` alternating normalisations of ``L = log probs`` in
log space (routing/sinkhorn.py), and each token takes its top-k experts by
the plan. Because ``log plan[t, e] = log probs[t, e] - f_t - g_e``, this is top-k
of the scores shifted by one balancing offset per expert and unit. Gate
weights still come from the router's probs (the plan only selects), so the
router learns through the gates as usual. Evaluation uses plain top-k.

Scope: ``sequence`` solves each sequence, ``microbatch`` each micro-batch,
``global`` the whole optimizer step: every micro-batch of every rank, the
scores gathered in the step's order, so N ranks solve what one process solves.
When the step takes several forwards (carried mode), each forward selects by
``log probs + log v``, the expert offsets of the previous step's whole-step
solve, and the step's scores are solved once after the optimizer step for the
next one (the testbed's fallback, recorded in the run summary). Padding tokens
take part in the solve like other tokens; they are only kept out of the
statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_testbed.knobs import Knob, at_least
from moe_testbed.routing.balancer import Balancer
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import register_balancer
from moe_testbed.routing.scope import gather_step, own_rows, solve_units
from moe_testbed.routing.sinkhorn import sinkhorn_log, sinkhorn_scalings
from moe_testbed.routing.step_scores import StepScores


def log_scores(probs_TE: Tensor) -> Tensor:
    # probs are fp32; the floor only guards log(0) for fully saturated rows.
    return probs_TE.float().clamp_min(1e-30).log()


@register_balancer
class SinkhornBalancing(Balancer):
    """Sinkhorn-normalised scores (uniform expert marginals) before top-k (S-BASE)."""

    name = "sh"
    requires = ("scores", "any_expert")
    knobs = {"sinkhorn_iters": Knob(20, int, "SH Sinkhorn iterations", at_least(1))}
    overhead_budget_pct = 15.0

    def __init__(self, n_experts, top_k, bcfg, layer):
        super().__init__(n_experts, top_k, bcfg, layer)
        self.register_buffer("carried_logv_E", torch.zeros(n_experts))  # global, carried: last step's offsets
        self.step_scores = StepScores()

    @torch.no_grad()
    def selection_scores(self, probs_TE: Tensor, ctx: RoutingContext) -> Tensor:
        if not ctx.training:
            return probs_TE
        L_TE, iters, T = log_scores(probs_TE), self.cfg.sinkhorn_iters, probs_TE.shape[0]
        if self.scope == "global":
            n_mb = ctx.n_microbatches(T)
            if not ctx.exact_global():
                self.step_scores.add(L_TE, ctx)
                return L_TE + self.carried_logv_E.to(L_TE.dtype)
            plan = sinkhorn_log(gather_step(L_TE, n_mb, ctx.group)[None], iters)[0]
            return own_rows(plan, n_mb, ctx.group)
        unit = ctx.unit_len(self.scope, T)
        return solve_units(L_TE, unit, ctx.unit_ids(self.scope, T), lambda L_UTE, _ids: sinkhorn_log(L_UTE, iters))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        step = self.step_scores.take_step()
        if step is not None:  # carried mode: the whole step's expert offsets route the next step
            self.carried_logv_E.copy_(sinkhorn_scalings(step[None], self.cfg.sinkhorn_iters)[2][0].float())
