"""Router and balancer interfaces.

Tensor legend (torchtitan style suffixes):
  T tokens of the micro-batch on this rank (batch * seq, flattened)
  E routed experts, K experts per token (top_k), D model width

A router turns hidden states into a :class:`RoutingDecision`: for every token the
K chosen experts and their gate weights. A learned router follows one pipeline

    logits_TE = W x  (masked to -inf outside allowed experts)   router-specific scoring
    probs_TE  = activation(logits_TE)       (softmax or sigmoid)
    sel_TE    = balancer.selection_scores   (EB adds its bias; SH runs Sinkhorn)
    sel_TE    = router.restrict(sel_TE)     (allowed experts, group-limited routing)
    idx_TK    = balancer.select(sel_TE)     (top-k; BA solves an assignment)
    gate_TK   = probs_TE[idx_TK]            (never the biased scores: trap!)
    aux       = balancer.losses(...)        (LBL, z-loss; training only)

and the balancing method plugs into it through :class:`Balancer`. Routers that
do not score tokens (hash, reference, expert choice) override ``forward``.

Which router x method combinations make sense is decided by *traits*: a router
states what it offers (``Router.traits``), a method what it needs
(``Balancer.requires``), and ``check`` turns a mismatch into a one-line reason at
config time (see docs/combinations.md, generated from these rules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from moe_testbed.routing.scope import LocalGroup, ProcessGroup

# What a router may offer a balancing method, and how a rejection names it.
TRAITS = {
    "learned": "a router whose scores are trained by gradient",
    "scores": "a token-choice router that selects by a score per expert",
    "any_expert": "a token-choice router free to send each token on its own to any expert",
}


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


def valid_tokens(ctx: RoutingContext) -> Tensor | None:
    """Float mask [T] of real (non-padding) tokens, or None when no labels are known."""
    if ctx.domain_ids_T is None:
        return None
    return (ctx.domain_ids_T >= 0).float()


class Balancer(nn.Module):
    """A load-balancing method. Defaults do nothing: plain top-k, no loss."""

    name: ClassVar[str] = "none"
    description: ClassVar[str] = "no balancing"
    requires: ClassVar[tuple[str, ...]] = ()  # router traits this method needs

    def __init__(self, n_experts: int, top_k: int, bcfg, layer: int):
        super().__init__()
        self.n_experts, self.top_k, self.cfg, self.layer = n_experts, top_k, bcfg, layer
        self.scope: str = bcfg.scope

    @classmethod
    def check(cls, cfg) -> str | None:
        """Return why ``cfg`` cannot use this method, or None."""
        from moe_testbed.routing.registry import ROUTERS

        router = ROUTERS.get(cfg.routing.router)
        if router is None:
            return None
        traits = router.traits(cfg)
        for trait in cls.requires:
            if trait not in traits:
                return (
                    f"balance.method={cls.name} needs {TRAITS[trait]}, but routing.router={cfg.routing.router} "
                    f"{router.lacks(trait, cfg)}"
                )
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
    # Traits offered to balancing methods (see TRAITS), and why a missing one is missing.
    offers: ClassVar[tuple[str, ...]] = ("learned", "scores", "any_expert")
    lacking: ClassVar[dict[str, str]] = {}

    def __init__(self, d_model: int, n_experts: int, top_k: int, rcfg, balancer: Balancer, layer: int, info: dict):
        super().__init__()
        self.d_model, self.n_experts, self.top_k = d_model, n_experts, top_k
        self.cfg, self.balancer, self.layer, self.info = rcfg, balancer, layer, info
        self.steps_done = 0  # optimizer steps completed (kept by after_optimizer_step / sync_after_resume)
        if self.uses_weight():
            self.weight = nn.Parameter(torch.empty(n_experts, d_model))
            nn.init.normal_(self.weight, std=d_model**-0.5)

    def uses_weight(self) -> bool:
        return True

    # -- config-time rules ----------------------------------------------------
    @classmethod
    def traits(cls, cfg) -> set[str]:
        return set(cls.offers)

    @classmethod
    def lacks(cls, trait: str, cfg) -> str:
        return cls.lacking.get(trait, f"is not {TRAITS[trait]}")

    @classmethod
    def check(cls, cfg) -> str | None:
        """Return why ``cfg`` cannot use this router, or None."""
        r, b = cfg.routing, cfg.balance
        traits = cls.traits(cfg)
        if b.z_loss > 0 and "learned" not in traits:
            return (
                f"balance.z_loss={b.z_loss} needs {TRAITS['learned']}, but routing.router={r.router} "
                f"{cls.lacks('learned', cfg)}; set balance.z_loss=0"
            )
        if r.n_groups > 1:
            return cls._check_group_limit(cfg, traits)
        return None

    @classmethod
    def _check_group_limit(cls, cfg, traits: set[str]) -> str | None:
        r, E = cfg.routing, cfg.model.n_experts
        if "any_expert" not in traits:
            return (
                f"routing.n_groups={r.n_groups} (group-limited routing) needs {TRAITS['any_expert']}, but "
                f"routing.router={r.router} {cls.lacks('any_expert', cfg)}"
            )
        if cfg.balance.method in ("sh", "ba"):
            return (
                f"routing.n_groups={r.n_groups} restricts each token to routing.topk_groups groups, which "
                f"balance.method={cfg.balance.method} (uniform load over all experts) cannot respect; set n_groups=1"
            )
        if E % r.n_groups:
            return f"routing.n_groups={r.n_groups} must divide model.n_experts={E}"
        if not 1 <= r.topk_groups <= r.n_groups:
            return f"routing.topk_groups={r.topk_groups} must be in 1..routing.n_groups={r.n_groups}"
        if r.topk_groups * (E // r.n_groups) < r.top_k:
            return (
                f"routing.topk_groups={r.topk_groups} groups of {E // r.n_groups} experts hold fewer than "
                f"routing.top_k={r.top_k} experts"
            )
        return None

    # -- pipeline steps, overridable one at a time ---------------------------
    def score(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        # Routers score in fp32 even under bf16 autocast (which would otherwise
        # recast the matmul to bf16): top-k ties and the softmax tail are
        # sensitive to precision.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return torch.nn.functional.linear(x_TD.float(), self.weight.float())

    def allowed(self, ctx: RoutingContext) -> Tensor | None:
        """Bool mask [T, E] of the experts each token may use; None = all."""
        return None

    def activate(self, logits_TE: Tensor) -> Tensor:
        if self.activation == "sigmoid":
            return torch.sigmoid(logits_TE)
        return torch.softmax(logits_TE, dim=-1)

    def balance_probs(self, probs_TE: Tensor) -> Tensor:
        """The per-token distribution over experts that LBL's P averages.

        Softmax scores already sum to 1; sigmoid scores are normalised first
        (DeepSeek-V3's balance loss uses s / sum_e s).
        """
        if self.activation == "sigmoid":
            return probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(1e-9)
        return probs_TE

    def restrict(self, sel_TE: Tensor, allowed_TE: Tensor | None) -> Tensor:
        """Mask selection scores to the allowed experts and, optionally, groups.

        Group-limited routing (DeepSeek-V3): experts form ``n_groups`` groups; a
        group's score is the sum of its two best selection scores (the best one
        for single-expert groups); each token keeps the ``topk_groups`` best
        groups and chooses its K experts inside them.
        """
        if allowed_TE is not None:
            sel_TE = sel_TE.masked_fill(~allowed_TE, -torch.inf)
        G = self.cfg.n_groups
        if G > 1:
            T, E = sel_TE.shape
            sel_TGM = sel_TE.view(T, G, E // G)
            group_TG = sel_TGM.topk(min(2, E // G), dim=-1).values.sum(-1)
            keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_TG.topk(self.cfg.topk_groups, dim=-1).indices, True)
            sel_TE = sel_TGM.masked_fill(~keep_TG[..., None], -torch.inf).view(T, E)
        return sel_TE

    def gates(self, probs_TE: Tensor, idx_TK: Tensor) -> Tensor:
        gate_TK = probs_TE.gather(1, idx_TK)
        if self.cfg.renormalize and self.top_k > 1:
            gate_TK = gate_TK / gate_TK.sum(-1, keepdim=True).clamp_min(1e-9)
        return gate_TK

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RoutingDecision:
        allowed_TE = self.allowed(ctx)
        logits_TE = self.score(x_TD, ctx)
        if allowed_TE is not None:
            logits_TE = logits_TE.masked_fill(~allowed_TE, -torch.inf)
        probs_TE = self.activate(logits_TE)
        sel_TE = self.balancer.selection_scores(probs_TE.detach(), ctx)
        sel_TE = self.restrict(sel_TE, allowed_TE)
        idx_TK = self.balancer.select(sel_TE, self.top_k, ctx)
        gate_TK = self.gates(probs_TE, idx_TK)
        aux = {}
        if ctx.training:
            aux = self.balancer.losses(self.balance_probs(probs_TE), logits_TE, idx_TK, ctx)
        return RoutingDecision(idx_TK=idx_TK, gate_TK=gate_TK, probs_TE=probs_TE, logits_TE=logits_TE, aux_losses=aux)

    # -- training-loop hooks --------------------------------------------------
    def after_optimizer_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based) completes."""
        self.steps_done = step
        self.balancer.after_optimizer_step()

    def sync_after_resume(self, step: int) -> None:
        """Called once after a checkpoint of step ``step`` has been loaded."""
        self.steps_done = step


def require_domains(ctx: RoutingContext, router: str) -> Tensor:
    if ctx.domain_ids_T is None:
        raise ValueError(
            f"routing.router={router} routes by domain label, but the forward got no domain ids: "
            "pass RoutingContext(domain_ids_T=...) (the trainer and evaluation do)"
        )
    return ctx.domain_ids_T
