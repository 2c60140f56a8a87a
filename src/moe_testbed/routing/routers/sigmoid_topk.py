"""Learned sigmoid top-k router (DeepSeek-V3, 2024).

    s_TE    = sigmoid(W x)                   independent affinity per expert
    idx_TK  = topk_e(s_TE)                   (plus EB's bias, if any, for selection only)
    gate_TK = s[t, idx] / sum_j s[t, idx_j]  normalised over the chosen k

(``routing.renormalize=false`` keeps the raw sigmoid gates; with k = 1 the
gate is the raw score, so the router still receives a gradient.) Balancing
losses average the normalised scores ``s / sum_e s``, as DeepSeek-V3's
sequence-wise balance loss does (Router.balance_probs).
"""

from moe_testbed.routing.registry import register_router
from moe_testbed.routing.router import Router


@register_router
class SigmoidTopK(Router):
    name = "sigmoid_topk"
    activation = "sigmoid"
