"""Gradient averaging over data-parallel ranks by torch's ``DistributedDataParallel``.

DDP registers a hook on every trainable parameter and all-reduces the gradients in
buckets while the backward is still running (the overlap a reduction after the
backward gives up). How the testbed uses it:

- the model stays single-device and unwrapped everywhere else (evaluation,
  checkpoints, statistics); only the training forward runs through the wrapper;
- a step of several forwards accumulates locally (``no_sync``) and reduces in the
  last backward, so the communication per step is one pass over the gradients;
- ``find_unused_parameters`` stays off (it would search the autograd graph every
  forward): every parameter that trains gets a gradient in every backward, which
  holds because the experts of a layer are stacked in one tensor (a test checks it
  for every router). A router that freezes its weights mid-run (``frozen``) changes
  the set of trainable parameters; the wrapper is then rebuilt over the new set;
- under expert parallelism the expert shards are left out (each rank holds other
  experts) and reduced over their replicas by train/expert_parallel.py;
- ``forward_sync_buffers`` is off: the routers' buffers (EB's biases, carried
  statistics) are updated from all-reduced counts, identically on every rank.

With 2 ranks DDP's mean (each gradient halved, then summed) equals one process's
sum of the same micro-batches halved, bit for bit.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

from torch import nn
from torch.nn.parallel import DistributedDataParallel


class GradientSync:
    """The module the training forward runs: ``model`` itself alone, DDP over it under data parallelism."""

    def __init__(self, model: nn.Module, world_size: int, ignore: set[int] | None = None):
        """``ignore``: ids of parameters DDP must leave alone (expert shards under expert parallelism)."""
        self.model, self.world_size, self.ignore = model, world_size, ignore or set()
        self._ddp: DistributedDataParallel | None = None
        self._trainable: tuple[str, ...] | None = None

    @contextlib.contextmanager
    def forward(self, last: bool) -> Iterator[nn.Module]:
        """The module for one forward and its backward; ``last``: the step's last one, where gradients are reduced."""
        if self.world_size == 1:
            yield self.model
            return
        ddp = self._wrapper()
        with contextlib.nullcontext() if last else ddp.no_sync():
            yield ddp

    def close(self) -> None:
        """Drop the wrapper while the process group lives: a reducer destroyed after it blocks the exit."""
        if self._ddp is not None:
            self._ddp._remove_autograd_hooks()
            self._ddp = self._trainable = None
            gc.collect()  # DDP holds reference cycles: free its reducer now, not at some later collection

    def _wrapper(self) -> DistributedDataParallel:
        trainable = tuple(n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in self.ignore)
        if trainable != self._trainable:
            if self._ddp is not None:
                self._ddp._remove_autograd_hooks()  # the old wrapper must not reduce a second time
            if self.ignore:
                names = [n for n, p in self.model.named_parameters() if id(p) in self.ignore]
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, names)
            # device_ids=None: the module is on this rank's one device and DDP leaves the inputs
            # where they are (it would otherwise copy the routing context, a dataclass, per forward).
            # init_sync=False: every rank already holds rank 0's weights (broadcast or one checkpoint).
            self._ddp = DistributedDataParallel(
                self.model, device_ids=None, forward_sync_buffers=False, init_sync=False, gradient_as_bucket_view=True
            )
            self._trainable = trainable
        return self._ddp
