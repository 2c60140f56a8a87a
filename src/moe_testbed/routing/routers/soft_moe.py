"""Causal Soft MoE (after Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Soft MoE gives every expert slots instead of tokens: a slot is a softmax-weighted
mixture of *all* the tokens of a sequence (dispatch weights, normalised over the
tokens), each expert processes its slots, and each token's output is a
softmax-weighted mixture of the slots' outputs (combine weights, normalised over
the slots). Mixing all the tokens of a sequence lets position t see positions
after t: in a causal language model that leaks the next tokens into the
prediction, and the loss means nothing. The testbed does not offer that form.

What it offers is the causal variant, one slot per expert per position, each
slot mixing only the token's prefix (the testbed's own construction):

    l_TE           = W x                                   (the same logits for dispatch and combine)
    slot_e(t)      = sum_{j <= t} softmax_{j <= t}(l_je) x_j   within t's sequence
    c_t            = softmax_e(l_te)                       combine weights, sum_e c_te = 1
    y_t            = sum_e c_te FFN_e(slot_e(t))

``slot_e(t)`` is causal attention with one fixed query per expert (keys: the
logits, values: the hidden states), computed by ``scaled_dot_product_attention``.

**Cost.** Every expert runs at every position: E expert FFNs per token, E times
the expert FLOPs of top-1 routing (as many as a dense FFN E times as wide), plus
the attention-like mixing, O(S) per position. Nothing is dropped and every
expert processes exactly T slots, so no balancing method applies (z-loss may).
The original's cost advantage (a fixed number of slots, independent of the
tokens) does not survive causality; what the variant keeps is Soft MoE's
routing, which is differentiable end to end, with no discrete choice.

**Counts.** The tables (n[layer, expert, domain]) need a discrete choice: they
count each token at its ``routing.top_k`` largest combine weights (the experts that
contribute most of its output; top_k=1: the one expert that contributes most). Those
slots' gate weights are their combine weights, so the tables' gate mass (the chosen
gates' sum per token, averaged) says how much of the output the counted experts
make: 1 = the routing is as discrete as the tables; k/E = an even mix, the tables
then overstate how concentrated it is. The trace keeps the whole combine
distribution's entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.decision import RoutingDecision
from moe_testbed.routing.registry import register_router
from moe_testbed.routing.router import Router


@register_router
class SoftMoE(Router):
    name = "soft_moe"
    activation = "softmax"
    mixes_tokens = True  # the MoE layer calls combine_experts instead of routing tokens to experts
    offers = ("learned",)
    lacking = {
        "scores": "mixes every expert into every token (causal Soft MoE): each expert processes every position",
        "any_expert": "mixes every expert into every token (causal Soft MoE): each expert processes every position",
    }

    @classmethod
    def check(cls, cfg) -> str | None:
        b = cfg.balance
        problem = cls.no_capacity(cfg, "every expert processes every position, nothing is dropped")
        if problem:
            return problem
        if b.seq_aux_coeff > 0:
            return f"balance.seq_aux_coeff={b.seq_aux_coeff} balances top-k choices, which routing.router=soft_moe " \
                   "does not make: set balance.seq_aux_coeff=0"  # fmt: skip
        if cfg.parallel.expert_parallel > 1:
            return "routing.router=soft_moe runs every expert at every position: set parallel.expert_parallel=1"
        return super().check(cfg)

    def decide(self, x_TD: Tensor, ctx: RoutingContext) -> RoutingDecision:
        logits_TE = self.score(x_TD, ctx)
        combine_TE = torch.softmax(logits_TE, dim=-1)
        gate_TK, idx_TK = combine_TE.topk(self.top_k, dim=-1)  # what the tables count (see the module)
        aux = self.balancer.losses(combine_TE, logits_TE, idx_TK, ctx) if ctx.training else {}
        return RoutingDecision(idx_TK=idx_TK, gate_TK=gate_TK, probs_TE=combine_TE, logits_TE=logits_TE,
                               aux_losses=aux)  # fmt: skip

    def combine_experts(self, x_TD: Tensor, dec: RoutingDecision, experts, ctx: RoutingContext) -> Tensor:
        """``y_t = sum_e c_te FFN_e(slot_e(t))`` with each slot mixing the token's prefix (see the module)."""
        T, D = x_TD.shape
        S, E = ctx.seq_len, self.n_experts
        B = T // S
        logits_BE1S = dec.logits_TE.view(B, S, E).permute(0, 2, 1).unsqueeze(-1).to(x_TD.dtype)
        ones = torch.ones_like(logits_BE1S)
        values_BESD = x_TD.view(B, 1, S, D).expand(B, E, S, D)
        # Attention scores q_t . k_j = 1 * l_je: position t softmax-mixes x_j over j <= t with weights l_je.
        slots_BESD = F.scaled_dot_product_attention(ones, logits_BE1S, values_BESD, is_causal=True, scale=1.0)
        slots_ND = slots_BESD.permute(0, 2, 1, 3).reshape(T * E, D)  # row t*E + e: expert e's slot at t
        idx_N1 = torch.arange(E, device=x_TD.device).repeat(T).unsqueeze(1)
        gate_N1 = dec.probs_TE.reshape(T * E, 1).to(x_TD.dtype)
        return experts(slots_ND, idx_N1, gate_N1, None).view(T, E, D).sum(1)
