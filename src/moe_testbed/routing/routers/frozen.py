"""A learned router frozen after a warm-up (Fan et al. 2024).

Trains like ``softmax_topk`` for ``routing.freeze_after`` optimizer steps, then
stops: ``after_optimizer_step(step)`` sets ``requires_grad=False`` once
``step >= freeze_after``, so no later gradient reaches W and AdamW skips it
(no update, no weight decay). A run resumed past ``freeze_after`` is frozen in
``sync_after_resume``; ``freeze_after=0`` freezes at construction (a random
frozen router, but with W kept in the optimizer's parameter list).
"""

from moe_testbed.routing.base import Router
from moe_testbed.routing.registry import register_router


@register_router
class Frozen(Router):
    name = "frozen"

    def __init__(self, d_model, n_experts, top_k, rcfg, balancer, layer, info):
        super().__init__(d_model, n_experts, top_k, rcfg, balancer, layer, info)
        self._freeze_if_due(0)

    @classmethod
    def check(cls, cfg) -> str | None:
        if cfg.routing.freeze_after < 0:
            return f"routing.freeze_after={cfg.routing.freeze_after} must be >= 0"
        return super().check(cfg)

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
