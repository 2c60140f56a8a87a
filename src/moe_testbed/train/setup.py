"""Building blocks of a run shared by the trainer and the benchmark: device, autocast, optimizer, name."""

from __future__ import annotations

import contextlib

import torch

from moe_testbed.config import Config, ConfigError


def resolve_device(name: str, option: str = "train.device=") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``option`` names the setting in the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}cuda but no CUDA device is available: use {option}auto or {option}cpu")
    return torch.device(name)


def autocast_for(device: torch.device, dtype: str):
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


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
