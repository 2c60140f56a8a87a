"""How a balancing method plugs into the router's pipeline, and the router z-loss every method gets.

Tensor legend: T tokens, E routed experts, K experts per token.

A method may change three things (router.py shows where each is called):

    selection_scores(probs_TE, ctx)  the scores top-k selects by (EB adds its bias, SH rebalances)
    select(sel_TE, k, ctx)           the selection itself (BA solves an assignment)
    balance_losses(probs, idx, ctx)  auxiliary losses (LBL), training forwards only

and it keeps state through ``observe`` (the final assignment of every training
forward) and ``after_optimizer_step``. The defaults are plain top-k with no
loss: the ``none`` method.

Router z-loss (ST-MoE, Zoph et al. 2022) is not a method but a term of every
method, added by :meth:`Balancer.losses` whenever ``balance.z_loss > 0``:

    z = balance.z_loss * mean_t (logsumexp_e logits[t, e])^2      (padding excluded)

It keeps router logits small, out of the softmax's saturated region.

The sequence-wise balance loss (DeepSeek-V3's complementary term, arXiv 2412.19437 eq. 17-20)
is another term every method may add, whenever ``balance.seq_aux_coeff > 0``:

    seq_aux = balance.seq_aux_coeff * mean over sequences of E * sum_e f_e P_e

(f and P of each sequence, as LBL at ``sequence`` scope; sigmoid scores normalised per token),
so that EB, SH, BA or QB can be combined with a small auxiliary loss as DeepSeek-V3 does.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from moe_testbed.knobs import Knob
from moe_testbed.routing.balance_loss import unit_lbl
from moe_testbed.routing.context import RoutingContext


def z_loss(logits_TE: Tensor, valid_T: Tensor | None = None) -> Tensor:
    """``mean_t (logsumexp_e logits[t, e])^2`` over the real tokens (``valid_T`` 1) or all of them."""
    z_T = torch.logsumexp(logits_TE.float(), dim=-1).square()
    if valid_T is None:
        return z_T.mean()
    return (z_T * valid_T).sum() / valid_T.sum().clamp_min(1)


class Balancer(nn.Module):
    """A load-balancing method. Defaults do nothing: plain top-k, no loss."""

    name: ClassVar[str] = "none"
    requires: ClassVar[tuple[str, ...]] = ()  # router traits this method needs (router.py: TRAITS)
    knobs: ClassVar[dict[str, Knob]] = {}  # this method's own config keys (moe_testbed/knobs.py)
    # The benchmark's target for the extra step time of this method, in % (None: not a target).
    overhead_budget_pct: ClassVar[float | None] = None
    # Scopes at which this method's definition is the testbed's own (no paper or peer defines it):
    # results there say so (docs/routing.md#scope).
    own_definition_scopes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, n_experts: int, top_k: int, bcfg, layer: int):
        super().__init__()
        self.n_experts, self.top_k, self.cfg, self.layer = n_experts, top_k, bcfg, layer
        self.scope: str = bcfg.scope

    @classmethod
    def check(cls, cfg) -> str | None:
        """Return why ``cfg`` cannot use this method beyond the router's traits (registry.py), or None."""
        return None

    def selection_scores(self, probs_TE: Tensor, ctx: RoutingContext) -> Tensor:
        return probs_TE

    def select(self, sel_TE: Tensor, k: int, ctx: RoutingContext) -> Tensor:
        return sel_TE.topk(k, dim=-1, sorted=False).indices

    def losses(self, probs_TE: Tensor, logits_TE: Tensor | None, idx_TK: Tensor, ctx: RoutingContext
               ) -> dict[str, Tensor]:  # fmt: skip
        """The z-loss (when ``balance.z_loss > 0``), then the method's own losses."""
        out = {}
        if self.cfg.z_loss > 0 and logits_TE is not None:
            out["z"] = self.cfg.z_loss * z_loss(logits_TE, ctx.valid_T)
        if self.cfg.seq_aux_coeff > 0:
            seq = unit_lbl(probs_TE, idx_TK, ctx.valid_T, ctx.seq_len, self.n_experts, self.top_k)
            out["seq_aux"] = self.cfg.seq_aux_coeff * seq
        out.update(self.balance_losses(probs_TE, idx_TK, ctx))
        return out

    def balance_losses(self, probs_TE: Tensor, idx_TK: Tensor, ctx: RoutingContext) -> dict[str, Tensor]:
        return {}

    def observe(self, idx_TK: Tensor, keep_TK: Tensor | None, ctx: RoutingContext) -> None:
        """See the final assignment of a training forward (EB counts load here)."""

    def after_optimizer_step(self) -> None:
        """Called once after every optimizer step (EB updates, buffers reset)."""
