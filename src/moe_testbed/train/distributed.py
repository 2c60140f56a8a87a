"""Data-parallel training over processes: ``torchrun --nproc_per_node N -m moe_testbed train ...``.

The model stays single-device; data parallelism is applied from outside, here:

- the process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``): gloo on CPU, NCCL on CUDA with one GPU per
  local rank;
- every rank starts from rank 0's parameters and buffers (broadcast);
- ``train.grad_accum`` counts the micro-batches of one optimizer step over *all*
  ranks (nanoGPT's convention), so each of N ranks runs ``grad_accum / N`` and
  the same config trains on the same global batch at any N. Rank r's j-th
  micro-batch is batch ``j * N + r`` of the data order, so a step covers the same
  batches as in one process, and the weights match it up to float rounding;
- gradients are averaged by torch's ``DistributedDataParallel``, overlapped with the
  backward of the step's last forward (train/ddp.py);
- routing statistics, losses and evaluation are summed over ranks, so rank 0
  logs the same numbers as one process would; only rank 0 writes files.

Balancing at global scope already reduces over :class:`TorchDistributedGroup`
(routing/scope.py), the same interface this module hands to the routers.
"""

from __future__ import annotations

import importlib
import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from moe_testbed.devices import resolve_device
from moe_testbed.errors import ConfigError
from moe_testbed.routing.scope import LocalGroup, TorchDistributedGroup


class DataParallel:
    """This process's place in a data-parallel run; the identity when alone."""

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.device, self.rank, self.world_size, self.local_rank = device, rank, world_size, local_rank
        self.group = TorchDistributedGroup() if world_size > 1 else LocalGroup()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_accumulation(self, grad_accum: int) -> int:
        """Micro-batches per optimizer step on this rank."""
        return local_accumulation(grad_accum, self.world_size)

    def broadcast_model(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)

    def sum(self, tables: dict[str, Tensor]) -> dict[str, Tensor]:
        """Element-wise sums over ranks of host or device tensors (returned where they were)."""
        if self.world_size == 1:
            return tables
        out = {}
        for key, t in tables.items():
            buf = t.detach().to(self.device, copy=True)  # NCCL reduces device tensors only
            dist.all_reduce(buf)
            out[key] = buf.to(t.device)
        return out

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def rank_seed(self, seed: int) -> int:
        """A seed for this rank's randomness (router noise) once the shared model is built."""
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0])

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def local_accumulation(grad_accum: int, world_size: int) -> int:
    """``train.grad_accum`` counts micro-batches over all ranks: each runs an equal share."""
    if grad_accum % world_size:
        raise ConfigError(
            f"train.grad_accum={grad_accum} counts micro-batches over all {world_size} ranks and must be divisible "
            f"by them: use train.grad_accum={max(1, grad_accum // world_size) * world_size}"
        )
    return grad_accum // world_size


def check_same_checkpoint(identities: list[str | None], run_dir) -> None:
    """Refuse a resume where some rank sees another latest checkpoint than rank 0 (``identities`` in rank order).

    Rank 0 alone writes checkpoints and every rank loads one, so on nodes with local disks
    the other ranks would resume from another step, or from none, and fall out of step.
    """
    for rank, seen in enumerate(identities):
        if seen != identities[0]:
            raise ConfigError(
                f"rank {rank} sees checkpoint {seen} in {run_dir} but rank 0 sees {identities[0]}: every rank "
                "resumes from rank 0's checkpoint, so the run directory must be on storage all nodes share"
            )


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_data_parallel(device_name: str, timeout_s: float = 600.0) -> DataParallel:
    """One process: the identity. Under torchrun: join the process group on this rank's device.

    ``timeout_s`` bounds every collective: a peer that hangs (stopped, deadlocked) fails
    the run after that long instead of torch's default 30 minutes.
    """
    device = resolve_device(device_name)
    world_size = launched_world_size()
    if world_size == 1:
        return DataParallel(device)
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with "
            "torchrun --nproc_per_node N -m moe_testbed train ..., or unset WORLD_SIZE"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # torch._dynamo (which torch.optim imports) registers hooks on the process groups that exist
        # when it is first imported; a group created before that import stays referenced after
        # destroy_process_group, its gloo worker threads keep running and race interpreter shutdown
        # ("terminate called without an active exception", SIGABRT at exit; pytorch/pytorch#179291).
        # Imported first, it holds no group, and closing the group ends every thread (a test checks).
        importlib.import_module("torch._dynamo")

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return DataParallel(device, rank, world_size, local_rank)
