"""A learned router frozen after a warm-up (Fan et al. 2024).

Trains like ``softmax_topk`` for ``routing.freeze_after`` optimizer steps, then
stops: ``after_optimizer_step(step)`` sets ``requires_grad=False`` once
``step >= freeze_after``, so no later gradient reaches W and AdamW skips it
(no update, no weight decay). A run resumed past ``freeze_after`` is frozen in
``sync_after_resume``; ``freeze_after=0`` freezes at construction (a random
frozen router, but with W kept in the optimizer's parameter list).
"""

from moe_testbed.knobs import Knob, non_negative
from moe_testbed.routing.registry import register_router
from moe_testbed.routing.router import Router


@register_router
class Frozen(Router):
    name = "frozen"
    knobs = {"freeze_after": Knob(100, int, "frozen: optimizer steps before the router freezes", non_negative)}

    def __init__(self, cfg, balancer, layer, moe_index, info):
        super().__init__(cfg, balancer, layer, moe_index, info)
        self._freeze_if_due(0)

    @property
    def frozen(self) -> bool:
        return not self.weight.requires_grad

    def _freeze_if_due(self, step: int) -> None:
        if step >= self.cfg.freeze_after:
            self.weight.requires_grad_(False)

    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        self._freeze_if_due(step)

    def sync_after_resume(self, step: int) -> None:
        super().sync_after_resume(step)
        self._freeze_if_due(step)
