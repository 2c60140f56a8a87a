"""Expert parallelism, applied from outside the model: each rank of an expert-parallel group holds E / N experts.

Tensor legend: T tokens on this rank, K experts per token, N slots (T * K), D model width,
R slots received from the group for this rank's experts.

``shard_experts(model, group)`` replaces every MoE layer's ``GroupedExperts`` by an
:class:`ExpertParallelExperts` that keeps this rank's slice of the experts. The router
still runs on every rank for its own tokens (data parallelism over tokens), so routing,
balancing and statistics are exactly those of data parallelism; only the experts'
computation moves:

1. the kept slots are sorted by the rank owning their expert (expert e lives on
   rank ``e // (E / N)``); the group exchanges how many slots each rank sends each
   other (one small ``all_to_all_single``);
2. the slots' hidden states and gates go to their experts' ranks
   (``all_to_all_single`` with uneven splits), where the local experts run on them
   as on any tokens (one slot each);
3. the gated outputs come back by the reverse exchange and are summed per token.

Both exchanges are an autograd function whose backward is the reverse exchange
(the pattern that exits cleanly; torch's own autograd all-to-all wrappers aborted
at interpreter exit on this project's machines, ../shared/DATA_SOURCES.md 4.4).
An expert's gradient is the sum over every token of the group that it processed:
:class:`ExpertParallel` sums it over the replicas of that shard and divides by the world size.
Checkpoints hold the full experts (``gather_full_experts``), so a run resumes on
any number of ranks and any expert-parallel size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_testbed.errors import ConfigError
from moe_testbed.model.experts import GroupedExperts


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        out_splits, in_splits = ctx.splits
        back = g.new_empty(sum(in_splits), *g.shape[1:])
        dist.all_to_all_single(back, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def exchange(x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
    return _AllToAll.apply(x, recv, send, group)


class ExpertParallelExperts(nn.Module):
    """This rank's experts of one MoE layer; the forward exchanges slots with the group."""

    def __init__(self, full: GroupedExperts, group, rank: int, size: int):
        super().__init__()
        E = full.n_experts
        self.n_experts, self.group, self.rank, self.size = E, group, rank, size
        self.per_rank = E // size
        lo = rank * self.per_rank
        self.local = GroupedExperts(self.per_rank, full.d_model, full.hidden, impl=full.impl)
        with torch.no_grad():
            self.local.w13.copy_(full.w13[lo : lo + self.per_rank])
            self.local.w2.copy_(full.w2[lo : lo + self.per_rank])

    def forward(self, x_TD: Tensor, idx_TK: Tensor, gate_TK: Tensor, keep_TK: Tensor | None = None) -> Tensor:
        T, K = idx_TK.shape
        e_N = idx_TK.reshape(-1)
        slots = torch.arange(T * K, device=idx_TK.device)
        if keep_TK is not None:
            slots = slots[keep_TK.reshape(-1)]
        owner = e_N[slots] // self.per_rank
        order = slots[torch.argsort(owner, stable=True)]  # slots grouped by the rank that owns their expert
        send_R = torch.bincount(owner, minlength=self.size)
        recv_R = torch.empty_like(send_R)
        dist.all_to_all_single(recv_R, send_R, group=self.group)
        send, recv = send_R.tolist(), recv_R.tolist()
        tok = torch.div(order, K, rounding_mode="floor")
        x_R = exchange(x_TD.index_select(0, tok), send, recv, self.group)
        gate_R = exchange(gate_TK.reshape(-1).index_select(0, order)[:, None], send, recv, self.group)
        local_R = e_N.new_empty(sum(recv), 1)  # each received slot's expert among this rank's (no gradient)
        owned = (e_N.index_select(0, order) % self.per_rank)[:, None]
        dist.all_to_all_single(local_R, owned.contiguous(), recv, send, group=self.group)
        y_R = self.local(x_R, local_R, gate_R)  # each received slot is one "token" with one expert
        y_back = exchange(y_R, recv, send, self.group)
        return y_back.new_zeros(T, y_back.shape[1]).index_add(0, tok, y_back)


def shard_experts(model: nn.Module, group, rank: int, size: int) -> None:
    """Keep this rank's experts in every MoE layer of ``model`` (in place)."""
    for layer in model.moe_layers:
        if layer.experts.n_experts % size:
            raise ValueError(f"{layer.experts.n_experts} experts do not split over {size} ranks")
        layer.experts = ExpertParallelExperts(layer.experts, group, rank, size)


def gather_full_experts(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` (a state dict of the sharded model) with every expert shard gathered to its full shape,
    under the names the unsharded model uses (a collective over the expert-parallel groups)."""
    out = dict(state)
    for name, mod in model.named_modules():
        if not isinstance(mod, ExpertParallelExperts):
            continue
        for w in ("w13", "w2"):
            shard = out.pop(f"{name}.local.{w}")
            parts = [torch.empty_like(shard) for _ in range(mod.size)]
            dist.all_gather(parts, shard.contiguous(), group=mod.group)
            out[f"{name}.{w}"] = torch.cat(parts)
    return out


def slice_full_experts(model: nn.Module, full: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse: a full state dict cut to this rank's shards, named as the sharded model names them."""
    out = dict(full)
    for name, mod in model.named_modules():
        if not isinstance(mod, ExpertParallelExperts):
            continue
        lo = mod.rank * mod.per_rank
        for w in ("w13", "w2"):
            out[f"{name}.local.{w}"] = out.pop(f"{name}.{w}")[lo : lo + mod.per_rank]
    return out


class ExpertParallel:
    """The expert-parallel side of a run: the mesh, the sharded model's gradients, norms and checkpoints.

    The world is a ``DeviceMesh`` of shape ``(world / N, N)``, dims ``("dp", "ep")``:
    consecutive ranks form an expert-parallel group (each holds E / N experts of
    every MoE layer), and the ranks holding the same shard form a ``dp`` group
    (torchtitan's EP-inside-DP layout). Every rank still trains on its own
    micro-batches, so replicated parameters are averaged over the world as in
    data parallelism; an expert shard's gradient already sums every token of its
    group that it processed, so it is summed over the ``dp`` group and divided by
    the world size: the same mean gradient as one process.
    """

    def __init__(self, model: nn.Module, size: int, world_size: int, device: torch.device):
        check_expert_parallel(size, world_size)
        from torch.distributed.device_mesh import init_device_mesh

        self.size, self.world_size = size, world_size
        self.mesh = init_device_mesh(device.type, (world_size // size, size), mesh_dim_names=("dp", "ep"))
        self.group, self.replicas = self.mesh["ep"].get_group(), self.mesh["dp"].get_group()
        self.rank = self.mesh["ep"].get_local_rank()
        self.model = model
        shard_experts(model, self.group, self.rank, size)
        self.shards = [p for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.local.parameters()]
        self.shard_ids = {id(p) for p in self.shards}  # left out of DDP (train/ddp.py)

    def replicated(self, params) -> list[nn.Parameter]:
        return [p for p in params if id(p) not in self.shard_ids]

    def reduce_shard_gradients(self) -> None:
        """Each shard's gradient: summed over the ranks holding that shard, divided by the world size."""
        for p in self.shards:
            if p.grad is None:  # no slot reached this rank's experts: in one process the tensor has zeros there
                p.grad = torch.zeros_like(p)
        if self.world_size > self.size:
            for p in self.shards:
                dist.all_reduce(p.grad, group=self.replicas)
        for p in self.shards:
            p.grad /= self.world_size

    def clip_grad_norm(self, params, max_norm: float) -> Tensor:
        """``clip_grad_norm_`` over the whole model: replicated gradients once, every shard of the group once."""
        params = [p for p in params if p.grad is not None]
        rep = [p.grad for p in self.replicated(params)]
        sq_rep = torch.stack([g.detach().float().pow(2).sum() for g in rep]).sum() if rep else torch.zeros(())
        sq_shard = torch.stack([p.grad.detach().float().pow(2).sum() for p in self.shards]).sum()
        dist.all_reduce(sq_shard, group=self.group)
        total = (sq_rep + sq_shard).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
        return total

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """(weights, optimizer state) as the unsharded model has them (a collective over every group)."""
        weights = _unique_storage(gather_full_experts(model, model.state_dict()))
        opt = optimizer.state_dict()
        for i in self._shard_indices(optimizer):
            st = opt["state"].get(i)
            if st is None:
                continue
            opt["state"][i] = {k: self._gather(v) if torch.is_tensor(v) and v.dim() else v for k, v in st.items()}
        return weights, opt

    def slice_weights(self, full: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unsharded weights (a checkpoint's) cut to this rank's shards, named as the sharded model names them."""
        return slice_full_experts(self.model, full)

    def slice_optimizer_state(self, optimizer: torch.optim.Optimizer, opt: dict) -> dict:
        """The inverse of :meth:`full_state` for the optimizer: this rank's rows of each shard's moments."""
        n = self.shards[0].shape[0]  # experts per rank
        lo = self.rank * n
        for i in self._shard_indices(optimizer):
            st = opt["state"].get(i)
            if st is not None:
                opt["state"][i] = {k: v[lo : lo + n].clone() if torch.is_tensor(v) and v.dim() else v
                                   for k, v in st.items()}  # fmt: skip
        return opt

    def _shard_indices(self, optimizer: torch.optim.Optimizer) -> list[int]:
        """The optimizer state's keys (parameter positions over its groups) that are expert shards."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        return [i for i, p in enumerate(params) if id(p) in self.shard_ids]

    def _gather(self, shard: Tensor) -> Tensor:
        parts = [torch.empty_like(shard) for _ in range(self.size)]
        dist.all_gather(parts, shard.contiguous(), group=self.group)
        return torch.cat(parts)


def _unique_storage(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the later names of tensors that share storage (tied weights), as safetensors' save_model does."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t.contiguous()
    return out


def rank_load_scalars(counts_LEC, layer_names: list[str], size: int, prefix: str = "") -> dict[str, float]:
    """``{prefix}ep_load/{layer}``: the busiest expert-parallel rank's slots over the mean rank's (1 = even).

    Rank j of a group holds experts ``j * E / size ..``; the ratio sets an expert-parallel
    step's time (every rank waits for the busiest) and an inference server's tail latency.
    """
    L, E = counts_LEC.shape[:2]
    per_rank_LR = counts_LEC.sum(axis=2).reshape(L, size, E // size).sum(axis=2).astype(float)
    ratio_L = per_rank_LR.max(axis=1) / np.maximum(per_rank_LR.mean(axis=1), 1e-12)
    out = {f"{prefix}ep_load/{name}": float(r) for name, r in zip(layer_names, ratio_L)}
    out[f"{prefix}ep_load/mean"] = float(ratio_L.mean())
    return out


def check_expert_parallel(size: int, world_size: int) -> None:
    """Refuse an expert-parallel size the launched ranks cannot form groups of (a user error)."""
    if size > 1 and world_size == 1:
        raise ConfigError(
            f"parallel.expert_parallel={size} needs {size} processes (or a multiple): launch with "
            f"torchrun --nproc_per_node {size} -m moe_testbed train ..., or set parallel.expert_parallel=1"
        )
    if world_size % size:
        raise ConfigError(
            f"parallel.expert_parallel={size} must divide the number of ranks ({world_size}): launch "
            f"torchrun --nproc_per_node {size} (or a multiple), or set parallel.expert_parallel=1"
        )


def expert_parallel_for(cfg, model: nn.Module, world_size: int, device: torch.device) -> ExpertParallel | None:
    """The run's :class:`ExpertParallel` (experts sharded in place), or None at ``parallel.expert_parallel=1``."""
    size = cfg.parallel.expert_parallel
    return None if size == 1 else ExpertParallel(model, size, world_size, device)
