"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks").

    H(x)_e = (W x)_e + noise_std * eps_e * softplus((W_noise x)_e),   eps ~ N(0, 1)
    probs  = softmax(H),   idx = topk(probs),   gates = probs[idx] (renormalised)

The learned noise scale lets the router explore early and become confident
later. Noise is drawn in training forwards only (from torch's global RNG, which
checkpoints save); evaluation uses the clean logits. ``W_noise`` starts at zero
as in the paper, so the initial noise scale is softplus(0) = 0.69 * noise_std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_testbed.knobs import Knob, non_negative
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import register_router
from moe_testbed.routing.router import Router


@register_router
class NoisyTopK(Router):
    name = "noisy_topk"
    knobs = {"noise_std": Knob(1.0, float, "noisy_topk: scale of the learned noise", non_negative)}

    def __init__(self, cfg, balancer, layer, moe_index, info):
        super().__init__(cfg, balancer, layer, moe_index, info)
        self.noise_weight = nn.Parameter(torch.zeros(self.n_experts, self.d_model))

    def score(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        clean_TE = super().score(x_TD, ctx)
        if not ctx.training or self.cfg.noise_std == 0:
            return clean_TE
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            scale_TE = F.softplus(F.linear(x_TD.float(), self.noise_weight.float()))
        return clean_TE + self.cfg.noise_std * torch.randn_like(clean_TE) * scale_TE
