"""What a router decides for the tokens of one MoE layer."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


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
