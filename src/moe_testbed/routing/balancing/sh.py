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

Scope: ``sequence`` solves each sequence, ``microbatch`` the micro-batch,
``global`` every rank's current micro-batch gathered (in one process: the
micro-batch). Padding tokens take part in the solve like other tokens; they
are only kept out of the statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_testbed.knobs import Knob, at_least
from moe_testbed.routing.balancer import Balancer
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import register_balancer
from moe_testbed.routing.scope import solve_in_units
from moe_testbed.routing.sinkhorn import sinkhorn_log


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

    @torch.no_grad()
    def selection_scores(self, probs_TE: Tensor, ctx: RoutingContext) -> Tensor:
        if not ctx.training:
            return probs_TE
        iters = self.cfg.sinkhorn_iters
        return solve_in_units(
            log_scores(probs_TE), ctx.seq_len, self.scope, ctx.group, lambda L_UTE: sinkhorn_log(L_UTE, iters)
        )
