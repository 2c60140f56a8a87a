"""Router and balancer interfaces.

Tensor legend (torchtitan style suffixes):
  T tokens of the micro-batch on this rank (batch * seq, flattened)
  E routed experts, K experts per token (top_k), D model width

A router turns hidden states into a :class:`RoutingDecision`: for every token the
K chosen experts and their gate weights. A learned router follows one pipeline

    logits_TE = W x                        (router-specific scoring)
    probs_TE  = activation(logits_TE)      (softmax or sigmoid)
    sel_TE    = balancer.selection_scores  (EB adds its bias; SH runs Sinkhorn)
    idx_TK    = balancer.select(sel_TE)    (top-k; BA solves an assignment)
    gate_TK   = probs_TE[idx_TK]           (never the biased scores: trap!)
    aux       = balancer.losses(...)       (LBL, z-loss)

and the balancing method plugs into it through :class:`Balancer`. Routers that
do not score tokens (hash, reference, expert choice) override ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from moe_testbed.routing.scope import LocalGroup, ProcessGroup


@dataclass
class RoutingContext:
    """What a router may know besides the hidden states of its layer."""

    training: bool = False
    seq_len: int = 1  # tokens per sequence: T = B * seq_len
    domain_ids_T: Tensor | None = None  # -1 marks padding
    token_ids_T: Tensor | None = None
    step: int = 0  # optimizer steps completed
    microbatch: int = 0  # index of the micro-batch inside the optimizer step
    tokens_in_step: int = 0  # tokens of the whole step on this rank (global scope)
    group: ProcessGroup = field(default_factory=LocalGroup)
    recorder: Any = None  # RoutingRecorder or None
    capacity_factor: float | None = None  # resolved for train or eval by the caller


@dataclass
class RoutingDecision:
    idx_TK: Tensor  # int64 expert of each slot
    gate_TK: Tensor  # gate weight of each slot (carries the router's gradient)
    probs_TE: Tensor | None = None  # activated scores, for metrics and LBL
    logits_TE: Tensor | None = None
    keep_TK: Tensor | None = None  # False where capacity dropped the slot; None = all kept
    # Expert choice marks unchosen (token, expert) pairs as not kept: those are
    # not drops, and the statistics must not count them as such.
    unkept_are_drops: bool = True
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


class Balancer(nn.Module):
    """A load-balancing method. Defaults do nothing: plain top-k, no loss."""

    name: ClassVar[str] = "none"
    # Routers this method cannot work with, and why (checked at config time).
    description: ClassVar[str] = "no balancing"

    def __init__(self, n_experts: int, top_k: int, bcfg, layer: int):
        super().__init__()
        self.n_experts, self.top_k, self.cfg, self.layer = n_experts, top_k, bcfg, layer
        self.scope: str = bcfg.scope

    @classmethod
    def check(cls, cfg) -> str | None:
        """Return why ``cfg`` cannot use this method, or None."""
        return None

    def selection_scores(self, probs_TE: Tensor, ctx: RoutingContext) -> Tensor:
        return probs_TE

    def select(self, sel_TE: Tensor, k: int, ctx: RoutingContext) -> Tensor:
        return sel_TE.topk(k, dim=-1, sorted=False).indices

    def losses(self, probs_TE: Tensor, logits_TE: Tensor, idx_TK: Tensor, ctx: RoutingContext) -> dict[str, Tensor]:
        return {}

    def observe(self, idx_TK: Tensor, keep_TK: Tensor | None, ctx: RoutingContext) -> None:
        """See the final assignment of a training forward (EB counts load here)."""

    def after_optimizer_step(self) -> None:
        """Called once after every optimizer step (EB updates, buffers reset)."""


class Router(nn.Module):
    """Base router: a learned linear scorer feeding the balancer pipeline."""

    name: ClassVar[str] = "base"
    activation: ClassVar[str] = "softmax"
    learned: ClassVar[bool] = True  # has trainable parameters
    causal: ClassVar[bool] = True  # a token's choice depends only on its prefix

    def __init__(self, d_model: int, n_experts: int, top_k: int, rcfg, balancer: Balancer, layer: int, info: dict):
        super().__init__()
        self.d_model, self.n_experts, self.top_k = d_model, n_experts, top_k
        self.cfg, self.balancer, self.layer, self.info = rcfg, balancer, layer, info
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)

    @classmethod
    def check(cls, cfg) -> str | None:
        """Return why ``cfg`` cannot use this router, or None."""
        return None

    # -- pipeline steps, overridable one at a time ---------------------------
    def score(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        # Routers score in fp32 even under bf16 autocast: top-k ties and the
        # softmax tail are sensitive to precision.
        return torch.nn.functional.linear(x_TD.float(), self.weight.float())

    def activate(self, logits_TE: Tensor) -> Tensor:
        if self.activation == "sigmoid":
            return torch.sigmoid(logits_TE)
        return torch.softmax(logits_TE, dim=-1)

    def gates(self, probs_TE: Tensor, idx_TK: Tensor) -> Tensor:
        gate_TK = probs_TE.gather(1, idx_TK)
        if self.cfg.renormalize and self.top_k > 1:
            gate_TK = gate_TK / gate_TK.sum(-1, keepdim=True).clamp_min(1e-9)
        return gate_TK

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RoutingDecision:
        logits_TE = self.score(x_TD, ctx)
        probs_TE = self.activate(logits_TE)
        sel_TE = self.balancer.selection_scores(probs_TE.detach(), ctx)
        idx_TK = self.balancer.select(sel_TE, self.top_k, ctx)
        gate_TK = self.gates(probs_TE, idx_TK)
        aux = self.balancer.losses(probs_TE, logits_TE, idx_TK, ctx) if ctx.training else {}
        return RoutingDecision(idx_TK=idx_TK, gate_TK=gate_TK, probs_TE=probs_TE, logits_TE=logits_TE, aux_losses=aux)

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based) completes."""
        self.balancer.after_optimizer_step()
