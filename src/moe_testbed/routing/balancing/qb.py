"""Quantile balancing: expert prices by dual coordinate descent on the balanced-assignment LP.

(Megatron-Core's ``quantile_balancing``, NVIDIA/Megatron-LM PR #5349.) Every token
takes top-k of its log scores minus a persistent price per expert, at training and
at evaluation alike (the prices are part of the model, like EB's bias):

    S[t, e]   = log probs[t, e]                 (softmax: the logits up to a per-token constant)
    idx_TK    = topk_e(S[t, e] - beta_e)        which experts
    gate_TK   = probs[t, idx_TK]                how much: never the priced scores

During training each scope unit of T tokens proposes new prices, the coordinate-
descent step of the LP dual given the current ones: expert e wins token t when
``S[t, e] - beta_e`` beats ``theta[t, e]``, the k-th best priced score among t's
*other* experts, so the price that gives e exactly its balanced load c = T*k // E is
the (c+1)-th largest margin:

    theta[t, e] = (k+1)-th largest of S[t, :] - beta   if e is among t's top k
                  k-th largest of S[t, :] - beta       otherwise
    q_e         = (c+1)-th largest over t of (S[t, e] - theta[t, e])

(Megatron's rule as published takes the (k+1)-th priced score as every token's
threshold. For a token that does not hold e that threshold is e's own priced score
whenever e is its (k+1)-th choice, so its margin equals the current price: an
under-loaded expert's price is then held where it is and the iteration can stop
unbalanced. tests/routing/test_qb.py shows it on a fixed score matrix, and shows
this rule reaching SciPy's LP optimum.)

At a fixed point (beta = q) exactly c tokens clear each expert's price, and the
prices with the thresholds satisfy complementary slackness: the assignment is an
optimum of the balanced-assignment LP (BA's problem; tests/routing/test_qb.py
checks against SciPy). After every optimizer step the prices move toward the
step's proposals and are re-centred (a constant shift changes no top-k):

    beta <- qb_ema * beta + (1 - qb_ema) * mean of the proposals,   beta <- beta - mean(beta)

Scope: ``sequence`` and ``microbatch`` propose per unit and average the proposals
over the step's units and ranks (Megatron's rule: per micro-batch, averaged over
micro-batches and data-parallel ranks); ``global`` proposes once, from every token
of the optimizer step on every rank (the step's margins gathered in the step's
order after the optimizer step), so it is exact in any number of forwards. The
prices only route the *next* step, so no scope needs a fallback. Padding tokens
take part like other tokens (as in SH and BA); they are kept out of the statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_testbed.knobs import Knob
from moe_testbed.routing.balancer import Balancer
from moe_testbed.routing.balancing.sh import log_scores
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import register_balancer
from moe_testbed.routing.scope import LocalGroup, unit_spans
from moe_testbed.routing.step_scores import StepScores


def unit_interval(v) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def margins(S_TE: Tensor, beta_E: Tensor, k: int) -> Tensor:
    """``S[t, e] - theta[t, e]``, theta the k-th best priced score among token t's other experts."""
    P_TE = S_TE - beta_E
    top_TK = P_TE.topk(k + 1, dim=-1).values
    kth_T, next_T = top_TK[:, k - 1], top_TK[:, k]
    holds_TE = kth_T[:, None] <= P_TE  # e is among t's top k (its k-th best included)
    return S_TE - torch.where(holds_TE, next_T[:, None], kth_T[:, None])


def column_quantile(M_UTE: Tensor, k: int) -> Tensor:
    """Each expert's (c+1)-th largest margin over a unit's T tokens, c = T*k // E: the proposed prices [U, E]."""
    T, E = M_UTE.shape[1:]
    return M_UTE.topk(T * k // E + 1, dim=1).values[:, -1]


def unit_prices(M_TE: Tensor, k: int, unit_len: int) -> Tensor:
    """Proposed prices of each unit of ``unit_len`` consecutive tokens (a shorter last one on its own): [U, E]."""
    parts = [
        column_quantile(M_TE[s : s + n * L].reshape(n, L, -1), k) for s, n, L in unit_spans(M_TE.shape[0], unit_len)
    ]
    return torch.cat(parts)


@register_balancer
class QuantileBalancing(Balancer):
    """Per-expert prices from the balanced-assignment LP's dual, by coordinate descent (Megatron-Core)."""

    name = "qb"
    requires = ("scores", "any_expert")
    knobs = {"qb_ema": Knob(0.9, float, "QB: weight of the old prices in each step's update", unit_interval)}
    overhead_budget_pct = 5.0

    def __init__(self, n_experts, top_k, bcfg, layer):
        super().__init__(n_experts, top_k, bcfg, layer)
        self.register_buffer("beta_E", torch.zeros(n_experts))  # part of the model: it routes at evaluation too
        self.register_buffer("acc_E", torch.zeros(n_experts), persistent=False)  # this step's summed proposals
        self.register_buffer("acc_n", torch.zeros(()), persistent=False)
        self.step_scores = StepScores()  # global scope: the step's margins
        self._last: tuple[tuple[int, int], Tensor, Tensor] | None = None
        self._group = LocalGroup()

    @classmethod
    def check(cls, cfg) -> str | None:
        if cfg.routing.top_k >= cfg.model.n_experts:
            return (f"balance.method=qb needs routing.top_k < model.n_experts (a token's admission threshold is "
                    f"its (k+1)-th score); got top_k={cfg.routing.top_k} of {cfg.model.n_experts}")  # fmt: skip
        return None

    @torch.no_grad()
    def selection_scores(self, probs_TE: Tensor, ctx: RoutingContext) -> Tensor:
        S_TE = log_scores(probs_TE)
        if ctx.training:
            self._propose(margins(S_TE, self.beta_E, self.top_k), ctx)
        return S_TE - self.beta_E

    def _propose(self, M_TE: Tensor, ctx: RoutingContext) -> None:
        self._group = ctx.group
        if self.scope == "global":
            self.step_scores.add(M_TE, ctx)  # a re-run forward replaces its own margins
            return
        q_UE = unit_prices(M_TE, self.top_k, ctx.unit_len(self.scope, M_TE.shape[0]))
        key, q_sum, n = (ctx.step, ctx.microbatch), q_UE.sum(0), q_UE.new_tensor(q_UE.shape[0])
        if self._last is not None and self._last[0] == key:  # activation recomputation: replace, do not add
            self.acc_E -= self._last[1]
            self.acc_n -= self._last[2]
        self.acc_E += q_sum
        self.acc_n += n
        self._last = (key, q_sum, n)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.scope == "global":
            M_TE = self.step_scores.take_step()  # every rank's margins, in the step's order (a collective)
            target_E = None if M_TE is None else column_quantile(M_TE[None], self.top_k)[0]
        else:
            both = self._group.all_reduce_sum(torch.cat((self.acc_E, self.acc_n[None])))
            self.acc_E.zero_()
            self.acc_n.zero_()
            self._last = None
            target_E = both[:-1] / both[-1].clamp_min(1)
        if target_E is None:
            return
        ema = self.cfg.qb_ema
        new_E = ema * self.beta_E + (1 - ema) * target_E
        new_E -= new_E.mean()
        observed = torch.ones((), dtype=torch.bool) if self.scope == "global" else both[-1] > 0
        self.beta_E.copy_(torch.where(observed.to(new_E.device), new_E, self.beta_E))  # nothing seen: no move
