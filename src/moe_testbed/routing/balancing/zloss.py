"""Router z-loss (ST-MoE, Zoph et al. 2022), combinable with every method.

    z = coeff * mean_t (logsumexp_e logits[t, e])^2

It keeps router logits small, which keeps the softmax out of its saturated,
numerically fragile region. Padding tokens (domain id -1) are excluded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_testbed.routing.base import RoutingContext


def z_loss(logits_TE: Tensor, valid_T: Tensor | None = None) -> Tensor:
    z_T = torch.logsumexp(logits_TE.float(), dim=-1).square()
    if valid_T is None:
        return z_T.mean()
    return (z_T * valid_T).sum() / valid_T.sum().clamp_min(1)


def valid_mask(ctx: RoutingContext, n_tokens: int, device) -> Tensor | None:
    """Float mask of real (non-padding) tokens, or None when there is no padding."""
    if ctx.domain_ids_T is None:
        return None
    return (ctx.domain_ids_T >= 0).float()


class ZLossMixin:
    """Adds ``aux/z`` to a balancer's losses when ``balance.z_loss > 0``."""

    def losses(self, probs_TE, logits_TE, idx_TK, ctx):
        out = super().losses(probs_TE, logits_TE, idx_TK, ctx)
        if self.cfg.z_loss > 0 and logits_TE is not None:
            out["z"] = self.cfg.z_loss * z_loss(logits_TE, valid_mask(ctx, logits_TE.shape[0], logits_TE.device))
        return out
