"""A random router re-drawn every optimizer step (Fan et al. 2024's "random routing").

    W_s = N(0, 1/D) drawn from a generator seeded with (seed + s)
    probs = softmax(W_s x), idx = topk(probs)

where s is the number of optimizer steps completed and ``seed`` a persistent
buffer drawn once from torch's RNG at construction (so it follows
``train.seed`` and is saved with the model). The weights are a pure function
of (seed, step): a resumed run (``sync_after_resume``) routes exactly like an
uninterrupted one, and evaluation after step s uses W_s. No parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import register_router
from moe_testbed.routing.router import Router


@register_router
class RandomPerStep(Router):
    name = "random_per_step"
    offers = ("scores", "any_expert")
    lacking = {"learned": "is re-drawn at random every step and never trained"}

    def __init__(self, cfg, balancer, layer, moe_index, info):
        super().__init__(cfg, balancer, layer, moe_index, info)
        self.register_buffer("seed", torch.randint(0, 2**40, ()))
        self._cache: tuple[tuple, Tensor] | None = None
        self._seed_int: int | None = None  # host copy: no device sync per forward
        # A checkpoint load replaces the seed buffer: forget the host copy.
        self.register_load_state_dict_post_hook(lambda module, _keys: setattr(module, "_seed_int", None))

    def uses_weight(self) -> bool:
        return False

    def weight_at(self, step: int, device: torch.device) -> Tensor:
        if self._seed_int is None:
            self._seed_int = int(self.seed)
        key = (self._seed_int, step, str(device))
        if self._cache is None or self._cache[0] != key:
            gen = torch.Generator(device="cpu").manual_seed(key[0] + step)
            w_ED = torch.randn(self.n_experts, self.d_model, generator=gen) * self.d_model**-0.5
            self._cache = (key, w_ED.to(device))
        return self._cache[1]

    def score(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        w_ED = self.weight_at(self.steps_done, x_TD.device)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return torch.nn.functional.linear(x_TD.float(), w_ED)
