"""A carried-mode method's record of the step's router scores, for a whole-step solve after the optimizer step.

When a step takes several forwards, a global-scope solve (SH, BA) cannot see the
whole step inside a forward; it routes by prices from the previous step and
keeps the scores of this step here. After the optimizer step they are gathered
from every rank in the step's micro-batch order, so the solve for the next step
is the one a single process holding the whole step would make.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.scope import LocalGroup, ProcessGroup, gather_step


class StepScores:
    def __init__(self) -> None:
        self.parts: dict[int, tuple[Tensor, int]] = {}  # first local micro-batch -> (scores, micro-batches)
        self.group: ProcessGroup = LocalGroup()

    def add(self, x_TX: Tensor, ctx: RoutingContext) -> None:
        """Keep one forward's scores; a forward re-run for the same micro-batches replaces its own."""
        self.parts[ctx.microbatch] = (x_TX.detach().clone(), ctx.n_microbatches(x_TX.shape[0]))
        self.group = ctx.group

    def take_step(self) -> Tensor | None:
        """The step's scores from every rank in the step's order (a collective), and forget them; None if none."""
        if not self.parts:
            return None
        ordered = [self.parts[k] for k in sorted(self.parts)]
        x = torch.cat([part for part, _ in ordered])
        n_local = sum(n for _, n in ordered)
        self.parts = {}
        return gather_step(x, n_local, self.group)
