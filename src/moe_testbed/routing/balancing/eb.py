"""Auxiliary-loss-free balancing by an expert bias (DeepSeek-V3; Wang et al. 2024, "Loss-Free Balancing").

A persistent buffer ``b_E`` is added to the scores for *selection only*:

    idx_TK  = topk_e(probs[t, e] + b_e)        which experts
    gate_TK = probs[t, idx_TK]                 how much: never the biased scores

After every optimizer step the bias moves against the load error and is
re-centred (a constant shift changes no top-k):

    b_e <- b_e + eb_rate * u_e,      b <- b - mean(b)

where ``u_e`` depends on the scope (``n_e`` = slots routed to e, padding excluded,
dropped slots included: they were routed to an overloaded expert):

    global      u_e = sign(mean_e' n_e' - n_e), n over the whole step: every
                micro-batch of gradient accumulation and every rank (one
                all-reduce per step)
    microbatch  u_e = mean over the step's micro-batches (and ranks) of
                sign(mean_e' n_e' - n_e) computed inside each micro-batch
    sequence    u_e = the same mean over the step's sequences

So a narrower scope asks "is e under-used in most units?" rather than "is e
under-used overall?" (averaging the loads before the sign would make
``microbatch`` almost identical to ``global``). Loads are counted in
``observe``, which the MoE layer calls for training forwards only, and which
also ignores any forward with ``ctx.training`` False: evaluation never moves
the bias. A forward re-run for the same (step, micro-batch) -- activation
recomputation -- replaces its contribution instead of adding it twice. The
update is tensor arithmetic on the device: no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_testbed.knobs import Knob, positive
from moe_testbed.routing.balancer import Balancer
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import register_balancer
from moe_testbed.routing.scope import LocalGroup, unit_counts


def load_signs(counts_UE: Tensor) -> Tensor:
    """sign(mean load - load) per unit: +1 under-loaded, -1 over-loaded, float [U, E]."""
    return torch.sign(counts_UE.mean(-1, keepdim=True) - counts_UE)


@register_balancer
class ExpertBias(Balancer):
    """Expert bias for selection only, updated by the sign of the load error (DeepSeek-V3)."""

    name = "eb"
    requires = ("scores",)
    knobs = {"eb_rate": Knob(1e-3, float, "EB bias update step", positive)}
    overhead_budget_pct = 5.0
    own_definition_scopes = ("sequence", "microbatch")  # peers define EB over the whole step only

    def __init__(self, n_experts, top_k, bcfg, layer):
        super().__init__(n_experts, top_k, bcfg, layer)
        # Part of the model (saved in checkpoints): the bias routes at evaluation too.
        self.register_buffer("bias_E", torch.zeros(n_experts))
        # This step's statistics: summed signs (sequence/microbatch) or slot counts
        # (global), and the number of units (or tokens) they came from.
        self.register_buffer("acc_E", torch.zeros(n_experts), persistent=False)
        self.register_buffer("acc_n", torch.zeros(()), persistent=False)
        self._last_key: tuple[int, int] | None = None
        self._last_contrib: tuple[Tensor, Tensor] | None = None
        self._group = LocalGroup()

    def selection_scores(self, probs_TE: Tensor, ctx: RoutingContext) -> Tensor:
        return probs_TE + self.bias_E.to(probs_TE.dtype)

    @torch.no_grad()
    def observe(self, idx_TK: Tensor, keep_TK: Tensor | None, ctx: RoutingContext) -> None:
        if not ctx.training:  # evaluation forwards never move the bias
            return
        valid_T = ctx.valid_T
        unit = ctx.unit_len(self.scope, idx_TK.shape[0])
        counts_UE = unit_counts(idx_TK, self.n_experts, unit, valid_T)
        if self.scope == "global":
            contrib = (counts_UE.sum(0), counts_UE.sum())
        else:
            has_U = (counts_UE.sum(-1) > 0).float()  # all-padding units carry no information
            contrib = ((load_signs(counts_UE) * has_U[:, None]).sum(0), has_U.sum())
        key = (ctx.step, ctx.microbatch)
        if self._last_key == key and self._last_contrib is not None:
            self.acc_E -= self._last_contrib[0]
            self.acc_n -= self._last_contrib[1]
        self.acc_E += contrib[0]
        self.acc_n += contrib[1]
        self._last_key, self._last_contrib, self._group = key, contrib, ctx.group

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        both = self._group.all_reduce_sum(torch.cat((self.acc_E, self.acc_n[None])))
        acc_E, acc_n = both[:-1], both[-1]
        if self.scope == "global":
            u_E = load_signs(acc_E[None])[0]  # zero when nothing was observed
        else:
            u_E = acc_E / acc_n.clamp_min(1)
        # Centring the update keeps the (zero-initialised) bias centred, and leaves it
        # bitwise unchanged when nothing was observed.
        self.bias_E += self.cfg.eb_rate * (u_E - u_E.mean())
        self.acc_E.zero_()
        self.acc_n.zero_()
        self._last_key, self._last_contrib = None, None
