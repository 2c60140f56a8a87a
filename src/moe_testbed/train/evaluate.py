"""Evaluation: per-domain validation loss and routing tables on held-out documents."""

from __future__ import annotations

import math

import numpy as np
import torch

from moe_testbed.data.loader import IGNORE_INDEX
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.recorder import RoutingRecorder
from moe_testbed.routing.scope import LocalGroup, ProcessGroup
from moe_testbed.routing.tables import RoutingTables
from moe_testbed.routing.trace import RoutingTrace


def loss_scalars(loss_sum_C: np.ndarray, tok_sum_C: np.ndarray, domains: list[str]) -> dict[str, float]:
    """``val/loss`` (token-weighted), ``val/loss_balanced`` (equal domain weight), per-domain loss and ppl."""
    present = tok_sum_C > 0
    scalars: dict[str, float] = {"val/loss": float(loss_sum_C[present].sum() / tok_sum_C[present].sum())}
    scalars["val/loss_balanced"] = float((loss_sum_C[present] / tok_sum_C[present]).mean())
    for c, name in enumerate(domains):
        if present[c]:
            scalars[f"val/loss/{name}"] = float(loss_sum_C[c] / tok_sum_C[c])
            scalars[f"val/ppl/{name}"] = float(math.exp(min(loss_sum_C[c] / tok_sum_C[c], 50.0)))
    return scalars


@torch.no_grad()
def evaluate(
    model,
    val_batches,
    domains: list[str],
    groups: list[list[int]],
    device,
    autocast,
    group: ProcessGroup | None = None,
    lockstep: bool = False,
    trace: RoutingTrace | None = None,
) -> tuple[dict, RoutingTables | None]:
    """Returns (scalars for metrics.jsonl, the routing tables with reference counts; None without MoE layers).

    ``group`` (data-parallel ranks): each rank evaluates every N-th batch and the
    sums are reduced, so every rank returns the numbers of the whole validation set.
    ``lockstep`` (expert parallelism: every forward is a collective): every rank runs
    as many forwards, a rank short of batches repeating one it has without counting it.
    ``trace``: keeps the per-token routing of this rank's first tokens (routing/trace.py).
    """
    group = group or LocalGroup()
    was_training = model.training
    model.eval()
    n_layers = len(model.moe_layers)
    cfg = model.cfg
    recorder = RoutingRecorder(max(n_layers, 1), cfg.model.n_experts, len(domains), device)
    loss_sum = np.zeros(len(domains))
    tok_sum = np.zeros(len(domains))
    mine = val_batches[group.rank :: group.world_size]
    n_forwards = -(-len(val_batches) // group.world_size) if lockstep else len(mine)
    seqs_before = 0  # sequences of this rank's earlier batches: the trace's sequence index
    for i in range(n_forwards):
        name, inp, tgt, dom = mine[i] if i < len(mine) else (mine or val_batches)[0]
        counted = i < len(mine)
        inp, tgt, dom = inp.to(device), tgt.to(device), dom.to(device)
        traced = trace if trace is not None and n_layers and counted and not trace.full else None
        if traced is not None:
            traced.begin(inp, dom, first_seq=seqs_before)
        seqs_before += inp.shape[0]
        ctx = RoutingContext(
            training=False, seq_len=inp.shape[1], domain_ids_T=dom.reshape(-1),
            microbatch_size=cfg.train.micro_batch_size, recorder=recorder if n_layers and counted else None,
            trace=traced,
        )  # fmt: skip
        with autocast():
            out = model(inp, ctx, targets_BS=tgt)  # mean over the batch's targets, logits never formed
        if not counted:
            continue
        n_valid = (tgt != IGNORE_INDEX).sum().item()
        c = domains.index(name)
        loss_sum[c] += out.loss.item() * n_valid
        tok_sum[c] += n_valid
    if was_training:
        model.train()
    if group.world_size > 1:
        loss_sum = group.all_reduce_sum(torch.from_numpy(loss_sum)).numpy()
        tok_sum = group.all_reduce_sum(torch.from_numpy(tok_sum)).numpy()
    scalars = loss_scalars(loss_sum, tok_sum, domains)
    if not n_layers:
        return scalars, None
    tables = recorder.tables(group).with_reference(groups, cfg.routing.top_k)
    scalars.update(tables.scalars(model.moe_layer_names, prefix="val/"))
    return scalars, tables
