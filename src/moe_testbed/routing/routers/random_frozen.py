"""A randomly initialised router that is never trained (Fan et al. 2024, "learned vs frozen vs random").

Same scoring as ``softmax_topk`` (softmax of W x, top-k), but W keeps its random
initialisation: ``requires_grad`` is False from the start, so the optimizer
never sees it (a test checks the weights stay bitwise equal). Gradients still
flow *through* the gates into the hidden states. Balancing by EB, SH or BA is
meaningful (they act on the selection); LBL and z-loss are not (nothing learns).
"""

from moe_testbed.routing.registry import register_router
from moe_testbed.routing.router import Router


@register_router
class RandomFrozen(Router):
    name = "random_frozen"
    offers = ("scores", "any_expert")
    lacking = {"learned": "is random and never trained"}

    def __init__(self, cfg, balancer, layer, moe_index, info):
        super().__init__(cfg, balancer, layer, moe_index, info)
        self.weight.requires_grad_(False)
