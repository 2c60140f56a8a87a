"""Evaluation: per-domain validation loss and routing tables on held-out documents."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from moe_testbed.analysis.metrics import reference_counts, routing_scalars
from moe_testbed.routing.base import RoutingContext
from moe_testbed.routing.stats import RoutingRecorder


@torch.no_grad()
def evaluate(
    model, val_batches, domains: list[str], groups: list[list[int]], cfg, device, autocast, dp=None
) -> tuple[dict, dict]:
    """Returns (scalars for metrics.jsonl, arrays for routing/step_*.npz).

    ``dp`` (train/distributed.py): each rank evaluates every N-th batch and the sums
    are reduced, so every rank returns the numbers of the whole validation set.
    """
    rank, world = (dp.rank, dp.world_size) if dp is not None else (0, 1)
    was_training = model.training
    model.eval()
    n_layers = len(model.moe_layers)
    E, k = cfg.model.n_experts, cfg.routing.top_k
    recorder = RoutingRecorder(max(n_layers, 1), E, len(domains), device)
    loss_sum = np.zeros(len(domains))
    tok_sum = np.zeros(len(domains))
    for name, inp, tgt, dom in val_batches[rank::world]:
        inp, tgt, dom = inp.to(device), tgt.to(device), dom.to(device)
        ctx = RoutingContext(
            training=False,
            seq_len=inp.shape[1],
            domain_ids_T=dom.reshape(-1),
            recorder=recorder if n_layers else None,
            capacity_factor=cfg.balance.eval_capacity_factor,
        )
        with autocast():
            out = model(inp, ctx)
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), tgt.reshape(-1), ignore_index=-100, reduction="sum")
        d = domains.index(name)
        loss_sum[d] += ce.item()
        tok_sum[d] += (tgt != -100).sum().item()
    if was_training:
        model.train()
    if world > 1:
        sums = dp.sum({"loss": torch.from_numpy(loss_sum), "tok": torch.from_numpy(tok_sum)})
        loss_sum, tok_sum = sums["loss"].numpy(), sums["tok"].numpy()
    tables = recorder.tables() if world == 1 else dp.sum(recorder.tables())
    present = tok_sum > 0
    scalars: dict[str, float] = {"val/loss": float(loss_sum[present].sum() / tok_sum[present].sum())}
    # Per-domain losses are averaged with equal domain weight in val/loss_balanced.
    per_domain = loss_sum[present] / tok_sum[present]
    scalars["val/loss_balanced"] = float(per_domain.mean())
    for d, name in enumerate(domains):
        if present[d]:
            scalars[f"val/loss/{name}"] = float(loss_sum[d] / tok_sum[d])
            scalars[f"val/ppl/{name}"] = float(math.exp(min(loss_sum[d] / tok_sum[d], 50.0)))
    arrays: dict = {}
    if n_layers:
        t = {key: v.numpy() for key, v in tables.items()}
        counts = t["counts"]
        ref = np.stack([reference_counts(t["tokens"][l] * k, groups, E) for l in range(n_layers)])
        scalars.update(
            routing_scalars(
                counts,
                model.moe_layer_names,
                drops_LD=t["drops"],
                gate_mass_sum_LD=t["gate_mass_sum"],
                tokens_LD=t["tokens"],
                ref_counts_LED=ref,
                prefix="val/",
            )
        )
        arrays = dict(t, ref_counts=ref)
    return scalars, arrays
