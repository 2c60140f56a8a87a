"""Auxiliary load-balancing loss (Switch Transformer, Fedus et al. 2021; GShard).

    f_e  = (slots routed to expert e) / (T * k)      top-k normalised: sum_e f_e = 1
    P_e  = mean_t probs[t, e]
    LBL  = coeff * E * sum_e f_e * P_e               = coeff at perfect balance

over the T tokens of a scope unit (padding excluded). f is a count (no
gradient); the gradient flows through P. Convention: f is divided by k, so the
loss is 1 at uniform load for any k. Hugging Face transformers'
``load_balancing_loss_func`` does not divide by k, so its value is k times ours
for the same logits (a test pins this).

Scope (routing/scope.py) decides the unit:

``sequence``, ``microbatch``
    f and P per unit; the loss is the mean over the units (so the step's loss
    is the mean over all the step's sequences, or micro-batches, on all ranks).
``global``, exact (a forward holds this rank's whole share of the step)
    f and P over every token of the step: the counts are all-reduced over the
    ranks inside the forward; each rank's loss carries its share of P
    (``sum of its p / the step's tokens * W``), so that the ranks' mean, which
    is what their averaged gradients follow, is the loss over the step.
``global``, carried (the step takes several forwards)
    f from the previous step's whole-step counts (on the first step: the counts
    of the step so far), P over the forward: the testbed's fallback, recorded
    in the run summary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_testbed.knobs import Knob, non_negative
from moe_testbed.routing.balance_loss import lbl_value, unit_lbl
from moe_testbed.routing.balancer import Balancer
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import register_balancer
from moe_testbed.routing.scope import LocalGroup, unit_counts


@register_balancer
class LoadBalancingLoss(Balancer):
    """Auxiliary loss ``coeff * E * sum_e f_e P_e`` (Switch, GShard)."""

    name = "lbl"
    requires = ("learned", "scores")
    knobs = {"coeff": Knob(0.01, float, "LBL coefficient (top-k normalised f, see docs/routing.md)", non_negative)}
    overhead_budget_pct = 5.0

    def __init__(self, n_experts, top_k, bcfg, layer):
        super().__init__(n_experts, top_k, bcfg, layer)
        # Global scope, carried: the previous step's f (saved: a resumed run continues exactly),
        # and this step's counts (and tokens, the last entry) so far on this rank.
        self.register_buffer("carried_f_E", torch.zeros(n_experts))
        self.register_buffer("step_counts_E", torch.zeros(n_experts + 1), persistent=False)
        self._last_key: tuple[int, int] | None = None
        self._last_contrib: Tensor | None = None
        self._group = LocalGroup()

    def balance_losses(self, probs_TE: Tensor, idx_TK: Tensor, ctx: RoutingContext) -> dict[str, Tensor]:
        T, E, k = probs_TE.shape[0], self.n_experts, self.top_k
        v_T = ctx.valid_T if ctx.valid_T is not None else probs_TE.new_ones(T)
        if self.scope == "global":
            loss = self._global(probs_TE, idx_TK, v_T, ctx)
        else:
            loss = unit_lbl(probs_TE, idx_TK, v_T, ctx.unit_len(self.scope, T), E, k)
        return {"lbl": self.cfg.coeff * loss}

    def _global(self, probs_TE: Tensor, idx_TK: Tensor, v_T: Tensor, ctx: RoutingContext) -> Tensor:
        E, k, group = self.n_experts, self.top_k, ctx.group
        counts_E = unit_counts(idx_TK, E, idx_TK.shape[0], v_T)[0]
        mine = torch.cat((counts_E, v_T.sum()[None])).detach()
        if ctx.exact_global():
            step = group.all_reduce_sum(mine)  # [E + 1]: the step's counts and tokens
            f_E = step[:E] / (step[E].clamp_min(1) * k)
            P_E = (probs_TE * v_T[:, None]).sum(0) * group.world_size / step[E].clamp_min(1)
            return lbl_value(f_E, P_E, E)
        # Carried: keep this step's counts for the next step's f (a re-run forward replaces its own).
        key = (ctx.step, ctx.microbatch)
        if self._last_key == key and self._last_contrib is not None:
            self.step_counts_E -= self._last_contrib
        self.step_counts_E += mine
        self._last_key, self._last_contrib, self._group = key, mine, group
        if ctx.step > 0:
            f_E = self.carried_f_E
        else:  # no previous step yet: the step so far, over every rank
            so_far = group.all_reduce_sum(self.step_counts_E.clone())
            f_E = so_far[:E] / (so_far[E].clamp_min(1) * k)
        P_E = (probs_TE * v_T[:, None]).sum(0) / v_T.sum().clamp_min(1)
        return lbl_value(f_E, P_E, E)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self._last_key is not None:  # carried mode ran this step: its whole-step f routes the next one
            step = self._group.all_reduce_sum(self.step_counts_E.clone())
            self.carried_f_E.copy_(step[: self.n_experts] / (step[self.n_experts].clamp_min(1) * self.top_k))
        self.step_counts_E.zero_()
        self._last_key, self._last_contrib = None, None
