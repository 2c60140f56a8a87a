"""A tiny model and a training loop that mimics the trainer, for routing tests.

The data layer is not needed: random token ids and random domain ids (with a
padded tail) drive ``moe_testbed.model.Transformer`` directly, through the
trainer's own micro-step and optimizer step (train/step.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moe_testbed.config import Config
from moe_testbed.model import Transformer
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.groups import reference_groups
from moe_testbed.train.step import micro_step, optimizer_step

VOCAB = 64
DOMAINS = ["code", "prose"]
TINY = {
    "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "n_experts": 4, "expert_hidden": 16},
    "routing": {"top_k": 2},
}


def make_cfg(router="softmax_topk", method="none", scope="microbatch", capacity=None, **dotted) -> Config:
    raw = {
        "model": dict(TINY["model"]),
        "routing": {**TINY["routing"], "router": router},
        "balance": {"method": method, "scope": scope, "capacity_factor": capacity},
    }
    cfg = Config.from_dict(raw)
    return cfg.replace(dotted) if dotted else cfg


def make_info(cfg: Config, vocab: int = VOCAB) -> dict:
    freq = np.arange(vocab, 0, -1, dtype=np.float64) ** 2  # a skewed, Zipf-like frequency table
    return {
        "domains": DOMAINS,
        "groups": reference_groups(DOMAINS, cfg.model.n_experts, cfg.routing.top_k, cfg.routing.groups),
        "token_frequencies": lambda: freq,
        "vocab_size": vocab,
    }


def make_model(cfg: Config, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg, VOCAB, make_info(cfg))


def batch(seed: int, B: int = 2, S: int = 8, pad: int = 2):
    """Token ids [B, S], targets, and domain ids [B*S]: one domain per sequence, a padded tail on the last."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    dom = torch.randint(0, len(DOMAINS), (B, 1), generator=g).expand(B, S).clone()
    if pad:
        dom[-1, -pad:] = -1
    return ids, ids.roll(-1, 1), dom.reshape(-1)


def train(
    model: Transformer, cfg: Config, steps: int = 2, grad_accum: int = 2, B: int = 2, S: int = 8, lr=1e-2,
    per_forward: int | None = None,
):  # fmt: skip
    """A few AdamW steps the way the trainer takes them (train/step.py); returns the per-step losses.

    ``per_forward`` micro-batches of B sequences go through the model at once (default: the whole step).
    """
    per_forward = per_forward or grad_accum
    forwards = grad_accum // per_forward
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        total = 0.0
        for f in range(forwards):
            parts = [batch(step * grad_accum + f * per_forward + i, B, S) for i in range(per_forward)]
            ids, tgt = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            dom = torch.cat([p[2] for p in parts])
            ce, aux = micro_step(model, ids, tgt, dom, step=step, microbatch=f * per_forward, accum=forwards,
                                 microbatch_size=B, whole_step=forwards == 1)  # fmt: skip
            total += float(ce + sum(aux.values())) / forwards
        optimizer_step(model, opt, None, step + 1)
        losses.append(total)
    return losses


@torch.no_grad()
def evaluate(model: Transformer, cfg: Config, B: int = 2, S: int = 8):
    model.eval()
    ids, tgt, dom = batch(999, B, S)
    out = model(ids, RoutingContext(training=False, seq_len=S, domain_ids_T=dom))
    model.train()
    return F.cross_entropy(out.logits.reshape(-1, VOCAB), tgt.reshape(-1)).item()
