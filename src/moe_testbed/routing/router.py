"""The router: one MoE layer's routing road, and the pipeline learned routers share.

Tensor legend (one alphabet for the package, docs/architecture.md):
  T tokens of the forward on this rank (batch * seq, flattened)
  E routed experts, K experts per token (top_k), D model width

``Router.forward`` is the road every token's routing takes, in this order:

    decide    router (+ balancing method)  -> idx_TK, gate_TK, aux losses
    capacity  routing/capacity.py          -> keep_TK (slots that fit)
    observe   balancer.observe             -> balancing state (EB's load)
    record    ctx.recorder                 -> n[layer, expert, domain]

Routers change ``decide`` only. A learned router decides by one pipeline

    logits_TE = W x  (masked to -inf outside allowed experts)   router-specific scoring
    probs_TE  = activation(logits_TE)       (softmax or sigmoid)
    sel_TE    = balancer.selection_scores   (EB adds its bias; SH runs Sinkhorn)
    sel_TE    = router.restrict(sel_TE)     (allowed experts, group-limited routing)
    idx_TK    = balancer.select(sel_TE)     (top-k; BA solves an assignment)
    gate_TK   = probs_TE[idx_TK]            (never the biased scores: trap!)
    aux       = balancer.losses(...)        (z-loss, LBL; training only)

whose steps override one at a time; routers that do not score tokens (hash,
reference, expert choice) override ``decide`` whole.

Which router x method combinations make sense is decided by *traits*: a router
states what it offers (``offers``), a method what it needs (``requires``), and
the registry turns a mismatch into a one-line reason at config time (see
docs/combinations.md, generated from these rules).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from moe_testbed.knobs import Knob, at_least
from moe_testbed.routing.balancer import Balancer
from moe_testbed.routing.capacity import Capacity
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.decision import RoutingDecision

# What a router may offer a balancing method, and how a rejection names it.
TRAITS = {
    "learned": "a router whose scores are trained by gradient",
    "scores": "a token-choice router that selects by a score per expert",
    "any_expert": "a token-choice router free to send each token on its own to any expert",
}


class Router(nn.Module):
    """Base router: a learned linear scorer feeding the balancer pipeline."""

    name: ClassVar[str] = "base"
    activation: ClassVar[str] = "softmax"
    causal: ClassVar[bool] = True  # a token's choice depends only on its prefix
    uses_domain_groups: ClassVar[bool] = False  # routes by the domain groups of routing.groups
    # Mixes tokens into every expert's input (soft_moe): the MoE layer calls ``combine_experts``
    # instead of sending each token to its K experts, and every expert is active for every token.
    mixes_tokens: ClassVar[bool] = False
    # Traits offered to balancing methods (see TRAITS), and why a missing one is missing.
    offers: ClassVar[tuple[str, ...]] = ("learned", "scores", "any_expert")
    lacking: ClassVar[dict[str, str]] = {}
    # Configurations of this router that the combinations page shows as rows of their own.
    variants: ClassVar[tuple[tuple[str, dict], ...]] = ()
    knobs: ClassVar[dict[str, Knob]] = {
        "renormalize": Knob(True, bool, "renormalise the k gate weights to sum to 1"),
        "n_groups": Knob(1, int, "group-limited routing: experts split into n_groups groups", at_least(1)),
        "topk_groups": Knob(1, int, "... and each token may use experts of this many groups", at_least(1)),
        "jitter": Knob(0.0, float, "Switch's router jitter: training scales the router's input by U(1-j, 1+j)",
                       lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
    }  # fmt: skip

    def __init__(self, cfg, balancer: Balancer, layer: int, moe_index: int, info: dict):
        """``layer``: index among all blocks; ``moe_index``: among the MoE layers (the tables' L axis)."""
        super().__init__()
        self.d_model, self.n_experts, self.top_k = cfg.model.d_model, cfg.model.n_experts, cfg.routing.top_k
        self.cfg, self.balancer, self.layer, self.moe_index = cfg.routing, balancer, layer, moe_index
        self.capacity = Capacity.from_config(cfg)
        self.steps_done = 0  # optimizer steps completed (kept by after_optimizer_step / sync_after_resume)
        if self.uses_weight():
            self.weight = nn.Parameter(torch.empty(self.n_experts, self.d_model))
            nn.init.normal_(self.weight, std=self.d_model**-0.5)

    def uses_weight(self) -> bool:
        return True

    # -- config-time rules ----------------------------------------------------
    @classmethod
    def offered(cls, cfg) -> set[str]:
        """The traits of this router under ``cfg``'s own knobs (a router may override this)."""
        return set(cls.offers)

    @classmethod
    def traits(cls, cfg) -> set[str]:
        """What balancing methods may rely on: ``offered``, less what group-limited routing takes away."""
        traits = cls.offered(cfg)
        if cfg.routing.n_groups > 1:  # group-limited routing confines each token to a few groups
            traits.discard("any_expert")
        return traits

    @classmethod
    def lacks(cls, trait: str, cfg) -> str:
        if trait == "any_expert" and "any_expert" in cls.offered(cfg):
            return (
                f"with routing.n_groups={cfg.routing.n_groups} restricts each token to its routing.topk_groups "
                "best groups, so uniform load over all experts is out of reach; set routing.n_groups=1"
            )
        return cls.lacking.get(trait, f"is not {TRAITS[trait]}")

    @classmethod
    def check(cls, cfg) -> str | None:
        """Return why ``cfg`` cannot use this router, or None."""
        r, b = cfg.routing, cfg.balance
        if b.z_loss > 0 and "learned" not in cls.traits(cfg):
            return (
                f"balance.z_loss={b.z_loss} needs {TRAITS['learned']}, but routing.router={r.router} "
                f"{cls.lacks('learned', cfg)}; set balance.z_loss=0"
            )
        if b.seq_aux_coeff > 0 and "learned" not in cls.traits(cfg):
            return (
                f"balance.seq_aux_coeff={b.seq_aux_coeff} needs {TRAITS['learned']}, but routing.router={r.router} "
                f"{cls.lacks('learned', cfg)}; set balance.seq_aux_coeff=0"
            )
        if r.jitter > 0 and "learned" not in cls.traits(cfg):
            return (
                f"routing.jitter={r.jitter} perturbs a learned router's input, but routing.router={r.router} "
                f"{cls.lacks('learned', cfg)}; set routing.jitter=0"
            )
        if r.n_groups > 1:
            return cls._check_group_limit(cfg)
        return None

    @classmethod
    def no_capacity(cls, cfg, why: str) -> str | None:
        """For routers to which capacity factors do not apply: why ``cfg`` sets one, or None."""
        b = cfg.balance
        if b.capacity_factor is not None or b.eval_capacity_factor is not None:
            return (
                "balance.capacity_factor and balance.eval_capacity_factor must be null for routing.router="
                f"{cls.name}: {why}"
            )
        return None

    @classmethod
    def _check_group_limit(cls, cfg) -> str | None:
        r, E = cfg.routing, cfg.model.n_experts
        if "any_expert" not in cls.offered(cfg):
            return (
                f"routing.n_groups={r.n_groups} (group-limited routing) needs {TRAITS['any_expert']}, but "
                f"routing.router={r.router} {cls.lacks('any_expert', cfg)}"
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

    # -- the road -------------------------------------------------------------
    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RoutingDecision:
        """decide -> capacity -> observe -> record; the decision comes back with its final ``keep_TK``."""
        dec = self.decide(x_TD, ctx)
        if dec.keep_TK is None:
            dec.keep_TK = self.capacity.keep(dec.idx_TK, dec.gate_TK, ctx)
        if ctx.training:
            self.balancer.observe(dec.idx_TK, dec.keep_TK, ctx)
        if ctx.recorder is not None and ctx.domain_ids_T is not None:
            ctx.recorder.record(self.moe_index, dec, ctx.domains_or(0), ctx.valid_T)
        if ctx.trace is not None:
            ctx.trace.record(self.moe_index, dec)
        return dec

    # -- the decide pipeline, overridable one step at a time ---------------------
    def decide(self, x_TD: Tensor, ctx: RoutingContext) -> RoutingDecision:
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

    def score(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        # Routers score in fp32 even under bf16 autocast (which would otherwise
        # recast the matmul to bf16): top-k ties and the softmax tail are
        # sensitive to precision.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            if ctx.training and self.cfg.jitter > 0:
                # Switch Transformer's jitter (Fedus et al. 2021): multiplicative noise on the router's
                # input only (the experts see the clean x), from torch's RNG, training forwards only.
                j = self.cfg.jitter
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - j, 1.0 + j)
            return torch.nn.functional.linear(x_TD, self.weight.float())

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

    # -- training-loop hooks --------------------------------------------------
    def after_optimizer_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based) completes."""
        self.steps_done = step
        self.balancer.after_optimizer_step()

    def sync_after_resume(self, step: int) -> None:
        """Called once after a checkpoint of step ``step`` has been loaded."""
        self.steps_done = step
