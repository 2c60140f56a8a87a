"""Auxiliary load-balancing loss (Switch Transformer, Fedus et al. 2021; GShard).

    f_e  = (slots routed to expert e) / (T * k)      top-k normalised: sum_e f_e = 1
    P_e  = mean_t probs[t, e]
    LBL  = coeff * E * sum_e f_e * P_e               = coeff at perfect balance

f is a count (no gradient); the gradient flows through P. Convention: f is
divided by k, so the loss is 1 at uniform load for any k. Hugging Face
transformers' ``load_balancing_loss_func`` does not divide by k, so its value is
k times ours for the same logits (a test pins this).

Scope decides the tokens f and P are computed over (see routing/scope.py):
``sequence`` -> per sequence, loss averaged over sequences; ``microbatch`` ->
the micro-batch; ``global`` -> f from counts summed over every micro-batch of
the optimizer step so far and over every rank (a buffer, reset after each
optimizer step, normalised by the tokens actually accumulated); P stays local
to the current micro-batch and carries the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_testbed.knobs import Knob, non_negative
from moe_testbed.routing.balancer import Balancer
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import register_balancer
from moe_testbed.routing.scope import unit_counts


def expert_counts(idx_TK: Tensor, n_experts: int, valid_T: Tensor | None = None) -> Tensor:
    """Slots per expert, float [E]; padding tokens (valid 0) are not counted."""
    return unit_counts(idx_TK, n_experts, idx_TK.shape[0], valid_T)[0]


def lbl_value(f_E: Tensor, P_E: Tensor, n_experts: int) -> Tensor:
    return n_experts * (f_E * P_E).sum(-1)


@register_balancer
class LoadBalancingLoss(Balancer):
    """Auxiliary loss ``coeff * E * sum_e f_e P_e`` (Switch, GShard)."""

    name = "lbl"
    requires = ("learned", "scores")
    knobs = {"coeff": Knob(0.01, float, "LBL coefficient (top-k normalised f, see docs/routing.md)", non_negative)}
    overhead_budget_pct = 5.0

    def __init__(self, n_experts, top_k, bcfg, layer):
        super().__init__(n_experts, top_k, bcfg, layer)
        # Global scope: synchronised slot counts of the current optimizer step.
        self.register_buffer("step_counts_E", torch.zeros(n_experts), persistent=False)
        self.register_buffer("step_tokens", torch.zeros(()), persistent=False)
        self._last_microbatch: tuple[int, int] | None = None
        self._last_contrib: tuple[Tensor, Tensor] | None = None

    def balance_losses(self, probs_TE: Tensor, idx_TK: Tensor, ctx: RoutingContext) -> dict[str, Tensor]:
        E, k = self.n_experts, self.top_k
        valid_T = ctx.valid_T
        if self.scope == "sequence":
            S = ctx.seq_len
            B = probs_TE.shape[0] // S
            v_BS = torch.ones(B, S, device=probs_TE.device) if valid_T is None else valid_T.view(B, S)
            n_B = v_BS.sum(1).clamp_min(1)
            f_BE = unit_counts(idx_TK, E, S, valid_T) / (n_B[:, None] * k)
            P_BE = (probs_TE.view(B, S, E) * v_BS[..., None]).sum(1) / n_B[:, None]
            has_tokens = (v_BS.sum(1) > 0).float()
            loss = (lbl_value(f_BE, P_BE, E) * has_tokens).sum() / has_tokens.sum().clamp_min(1)
        else:
            counts_E = expert_counts(idx_TK, E, valid_T)
            n_tok = (
                torch.full((), float(probs_TE.shape[0]), device=probs_TE.device) if valid_T is None else valid_T.sum()
            )
            P_E = (probs_TE if valid_T is None else probs_TE * valid_T[:, None]).sum(0) / n_tok.clamp_min(1)
            if self.scope == "global":
                counts_E, n_tok = self._accumulate(counts_E, n_tok, ctx)
            f_E = counts_E / (n_tok.clamp_min(1) * k)
            loss = lbl_value(f_E, P_E, E)
        return {"lbl": self.cfg.coeff * loss}

    def _accumulate(self, counts_E: Tensor, n_tok: Tensor, ctx: RoutingContext) -> tuple[Tensor, Tensor]:
        """Add this micro-batch's (rank-summed) counts to the step buffer.

        A forward re-run for the same micro-batch (activation recomputation)
        replaces its contribution instead of adding it twice.
        """
        counts_E = ctx.group.all_reduce_sum(counts_E.detach())
        n_tok = ctx.group.all_reduce_sum(n_tok.detach())
        key = (ctx.step, ctx.microbatch)
        if self._last_microbatch == key and self._last_contrib is not None:
            self.step_counts_E -= self._last_contrib[0]
            self.step_tokens -= self._last_contrib[1]
        self.step_counts_E += counts_E
        self.step_tokens += n_tok
        self._last_microbatch, self._last_contrib = key, (counts_E, n_tok)
        return self.step_counts_E.clone(), self.step_tokens.clone()

    def after_optimizer_step(self) -> None:
        self.step_counts_E.zero_()
        self.step_tokens.zero_()
        self._last_microbatch, self._last_contrib = None, None
