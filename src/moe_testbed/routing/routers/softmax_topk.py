"""Learned softmax top-k router (Shazeer et al. 2017; Switch, GShard, Mixtral).

probs = softmax(W x); the k largest probabilities choose the experts and are
the gate weights, renormalised to sum to 1 when ``routing.renormalize``.
"""

from moe_testbed.routing.registry import register_router
from moe_testbed.routing.router import Router


@register_router
class SoftmaxTopK(Router):
    name = "softmax_topk"
    activation = "softmax"
