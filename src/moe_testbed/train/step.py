"""One micro-step and one optimizer step, exactly as training takes them.

The trainer, the benchmark (bench/step.py) and the routing tests all call these,
so what is timed and what is tested is what trains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_testbed.data.loader import IGNORE_INDEX
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.recorder import RoutingRecorder
from moe_testbed.routing.scope import LocalGroup, ProcessGroup


def micro_step(
    model: torch.nn.Module,
    inp_BS: Tensor,
    tgt_BS: Tensor,
    dom_BS: Tensor,
    *,
    step: int,
    microbatch: int,
    accum: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    group: ProcessGroup | None = None,
    recorder: RoutingRecorder | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward one micro-batch, backward ``(CE + auxiliary losses) / accum``.

    Returns the cross-entropy and the auxiliary losses per kind (summed over
    layers), detached and not divided by ``accum``.
    """
    ctx = RoutingContext(
        training=True, seq_len=inp_BS.shape[1], domain_ids_T=dom_BS.reshape(-1), step=step, microbatch=microbatch,
        group=group or LocalGroup(), recorder=recorder,
    )  # fmt: skip
    with autocast():
        out = model(inp_BS, ctx)
    V = out.logits.shape[-1]
    ce = F.cross_entropy(out.logits.float().view(-1, V), tgt_BS.reshape(-1), ignore_index=IGNORE_INDEX)
    ((ce + out.aux_loss) / accum).backward()
    return ce.detach(), out.aux


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None, step: int, dp=None
) -> Tensor | None:
    """Average gradients over ranks (``dp``), clip, step, zero the gradients, tell the routers.

    ``step`` is the number of optimizer steps completed after this one (1-based);
    returns the gradient norm before clipping (None when ``grad_clip`` is None).
    """
    if dp is not None:
        dp.average_gradients(list(model.parameters()))
    grad_norm = None if grad_clip is None else torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.after_optimizer_step(step)
    return grad_norm
