"""One micro-step and one optimizer step, exactly as training takes them.

The trainer, the benchmark (bench/step.py) and the routing tests all call these,
so what is timed and what is tested is what trains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from moe_testbed.errors import ConfigError
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.recorder import RoutingRecorder
from moe_testbed.routing.scope import LocalGroup, ProcessGroup

# By default a forward holds this many tokens at most (a few GB of activations for the testbed's
# models); a step larger than this takes several forwards, and global scope falls back to carried
# statistics (docs/routing.md#scope). train.forward_microbatches overrides it.
AUTO_FORWARD_TOKENS = 1 << 16


def forward_microbatches(requested: int | None, accum: int, tokens_per_microbatch: int) -> int:
    """Micro-batches per forward: ``requested`` (it must divide ``accum``), or the most that fit the default budget."""
    if requested is not None:
        if requested < 1 or accum % requested:
            raise ConfigError(
                f"train.forward_microbatches={requested} must divide the {accum} micro-batches of a step on this "
                f"rank: choose one of {', '.join(str(d) for d in range(1, accum + 1) if accum % d == 0)}"
            )
        return requested
    fits = [d for d in range(1, accum + 1) if accum % d == 0 and d * tokens_per_microbatch <= AUTO_FORWARD_TOKENS]
    return max(fits, default=1)


def micro_step(
    model: torch.nn.Module,
    inp_BS: Tensor,
    tgt_BS: Tensor,
    dom_BS: Tensor,
    *,
    step: int,
    microbatch: int,
    accum: float,
    microbatch_size: int | None = None,
    whole_step: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    group: ProcessGroup | None = None,
    recorder: RoutingRecorder | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward one or several micro-batches at once, backward ``(CE + auxiliary losses) / accum``.

    The forward holds consecutive micro-batches of this rank, the first being the
    step's ``microbatch``-th, of ``microbatch_size`` sequences each (None: one
    micro-batch); ``accum`` is the number of such forwards in a step, and
    ``whole_step`` says this forward is the rank's whole step (exact global
    scope). Returns the cross-entropy and the auxiliary losses per kind (summed
    over layers), detached and not divided by ``accum``.
    """
    ctx = RoutingContext(
        training=True, seq_len=inp_BS.shape[1], domain_ids_T=dom_BS.reshape(-1), step=step, microbatch=microbatch,
        microbatch_size=microbatch_size, whole_step=whole_step, group=group or LocalGroup(), recorder=recorder,
    )  # fmt: skip
    with autocast():
        out = model(inp_BS, ctx, targets_BS=tgt_BS)  # the head's cross-entropy, chunked (model/head.py)
    ((out.loss + out.aux_loss) / accum).backward()
    return out.loss.detach(), out.aux


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None, step: int, ep=None
) -> Tensor | None:
    """Reduce the expert shards' gradients (``ep``), clip, step, zero the gradients, tell the routers.

    Under data parallelism the other gradients were averaged during the backward
    (train/ddp.py). ``step`` is the number of optimizer steps completed after this
    one (1-based); returns the gradient norm before clipping (None when ``grad_clip`` is None).
    """
    params = list(model.parameters())
    if ep is not None:
        ep.reduce_shard_gradients()
        grad_norm = None if grad_clip is None else ep.clip_grad_norm(params, grad_clip)
    else:
        grad_norm = None if grad_clip is None else torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.after_optimizer_step(step)
    return grad_norm
