"""Building blocks of a run shared by the trainer and the benchmark: the optimizer and the run name."""

from __future__ import annotations

import torch

from moe_testbed.config import Config


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms) do not (nanoGPT's rule)."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    t = cfg.train
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), foreach=True)


def default_run_name(cfg: Config) -> str:
    if cfg.model.dense:
        return f"dense-{cfg.model.dense_match}-s{cfg.train.seed}"
    return f"{cfg.routing.router}-{cfg.balance.method}-{cfg.balance.scope}-s{cfg.train.seed}"
