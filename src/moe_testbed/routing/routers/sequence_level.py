"""Sequence-level routing with a causal prefix mean (after Fan et al. 2024).

Fan et al. route a whole sequence by its pooled (mean) representation. A causal
LM cannot pool over tokens it has not seen, so here token t of sequence b is
routed by the mean of the layer's inputs over its prefix:

    xbar[b, t] = (1 / (t + 1)) * sum_{s <= t} x[b, s]
    logits[b, t] = W xbar[b, t] = (1 / (t + 1)) * sum_{s <= t} W x[b, s]   (linear: we average logits)
    probs = softmax(logits), idx = topk(probs), gates = probs[idx]

So all tokens of a sequence share one routing *function* of the running
sequence summary: early tokens may switch experts while the summary settles,
later ones converge to the sequence's choice, and no token's experts depend on
a later token (a test checks this through the whole model). Padding inside a
sequence enters the mean of the tokens after it; the loaders pad only at the
end, where it affects nobody else.

Balancing: LBL, EB and z-loss apply as usual; SH and BA would force the tokens
of one sequence apart, contradicting sequence-level routing, and are rejected.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import register_router
from moe_testbed.routing.router import Router


def prefix_mean(v_BSX: Tensor) -> Tensor:
    """Mean over positions 0..t for every t, along dim 1."""
    n_S = torch.arange(1, v_BSX.shape[1] + 1, device=v_BSX.device, dtype=v_BSX.dtype)
    return v_BSX.cumsum(1) / n_S[None, :, None]


@register_router
class SequenceLevel(Router):
    name = "sequence_level"
    offers = ("learned", "scores")
    lacking = {"any_expert": "routes each sequence by its running mean, which per-token balancing would split"}

    def score(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        logits_TE = super().score(x_TD, ctx)
        S = ctx.seq_len
        return prefix_mean(logits_TE.view(-1, S, self.n_experts)).reshape(-1, self.n_experts)
