"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): an MoE started from a trained dense model.

``model.init_from=RUN_DIR`` names a trained dense run of the testbed (``model.dense=true``, the
same width, depth, heads and vocabulary). Its latest checkpoint initialises the MoE:

- embeddings, attention, norms and the head are copied as they are;
- every MoE layer's experts come from that block's dense SwiGLU FFN of hidden width H:
  with ``model.expert_hidden = H`` each expert is a copy of the FFN (the paper's
  upcycling); with ``H = G * expert_hidden`` (fine-grained experts) the FFN's hidden units
  are split into G consecutive slices and expert e takes slice ``e mod G``, its output
  weights multiplied by G, so a token whose k = G experts are the G distinct slices with
  equal gates 1/G computes the dense FFN exactly (**the testbed's own split**: the
  fine-grained upcycling literature differs in how it scales);
- ````model.upcycle_noise = s```` multiplies every copied expert weight by ``1 + s * N(0, 1)``
  (drawn per expert from the run's seed), so that copies can drift apart; 0 keeps exact copies;
- routers keep their fresh initialisation (nothing in the dense model routes).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moe_testbed.errors import ConfigError
from moe_testbed.train.checkpoint import latest_checkpoint


def dense_checkpoint(run_dir: str | Path) -> Path:
    run = Path(run_dir).expanduser()
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise ConfigError(f"model.init_from={run_dir}: no checkpoint there; train the dense run first")
    return ckpt


def upcycle(model: nn.Module, dense_weights: dict[str, torch.Tensor], noise: float, seed: int, source: str) -> None:
    """Initialise ``model`` (an MoE Transformer) in place from a dense model's weights (names as saved)."""
    own = model.state_dict()
    copied: set[int] = set()
    with torch.no_grad():
        for name, tensor in own.items():
            if ".ffn.router." in name or ".ffn.experts." in name or ".ffn.shared." in name:
                continue
            if tensor.data_ptr() in copied:
                continue  # a tied weight (the head is the embedding): saved once, copied once
            if name not in dense_weights:
                raise ConfigError(f"model.init_from={source}: the dense model has no {name}: train it with the "
                                  "same model.d_model, n_layers, n_heads and vocabulary")  # fmt: skip
            if dense_weights[name].shape != tensor.shape:
                raise ConfigError(
                    f"model.init_from={source}: {name} is {tuple(dense_weights[name].shape)} there, "
                    f"{tuple(tensor.shape)} here: the dense run must have the same width and depth"
                )
            tensor.copy_(dense_weights[name])
            copied.add(tensor.data_ptr())
        gen = torch.Generator().manual_seed(seed)
        for i, block in enumerate(model.blocks):
            if block.is_moe:
                _experts_from_ffn(block.ffn.experts, dense_weights, f"blocks.{i}.ffn", noise, gen, source)


@torch.no_grad()
def _experts_from_ffn(experts, dense: dict[str, torch.Tensor], prefix: str, noise: float, gen, source: str) -> None:
    try:
        w13, w2 = dense[f"{prefix}.w13.weight"], dense[f"{prefix}.w2.weight"]  # [2H, D], [D, H]
    except KeyError:
        raise ConfigError(f"model.init_from={source}: {prefix} is not a dense FFN there (is it a dense run?)") from None
    H, h, E = w2.shape[1], experts.w2.shape[1], experts.w2.shape[0]
    if H % h or E % (H // h):
        raise ConfigError(
            f"model.init_from={source}: the dense FFN's {H} hidden units do not split into experts of "
            f"model.expert_hidden={h} over {E} experts: use expert_hidden={H} (copies) or a divisor G of {H // h or 1}"
            f" slices with n_experts a multiple of G"
        )
    G = H // h
    a, b = w13[:H], w13[H:]  # the SwiGLU's gate and value halves, [H, D] each
    for e in range(E):
        g = e % G
        rows = slice(g * h, (g + 1) * h)
        e13 = torch.cat((a[rows], b[rows])).T  # [D, 2h]
        e2 = w2[:, rows].T * G  # [h, D]
        if noise > 0:
            e13 = e13 * (1 + noise * torch.randn(e13.shape, generator=gen))
            e2 = e2 * (1 + noise * torch.randn(e2.shape, generator=gen))
        experts.w13[e].copy_(e13)
        experts.w2[e].copy_(e2)
