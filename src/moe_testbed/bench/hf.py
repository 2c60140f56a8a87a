"""Hugging Face transformers' Mixtral sparse MoE block, with our weights, as a baseline.

``MixtralSparseMoeBlock`` is built from a ``MixtralConfig`` only (no download).
Its router is softmax top-k with renormalisation, like our ``softmax_topk`` with
``routing.renormalize=true``, so with the same weights both compute the same
function. Layouts differ: HF keeps ``gate_up_proj [E, 2H, D]`` and
``down_proj [E, D, H]`` (``F.linear`` layout, gate rows before up rows), ours
``w13 [E, D, 2H]`` and ``w2 [E, H, D]``: each HF matrix is our matrix transposed.

The experts backend is chosen by ``config._experts_implementation`` at every
forward. ``grouped_mm`` and ``eager`` are timed; ``batched_mm`` gathers one
weight matrix per slot (T*k*3*H*D*4 bytes, tens of GB at these sizes) and is
meant for decoding only, so it is left out.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

HF_BACKENDS = ("grouped_mm", "eager")


def hf_available() -> str | None:
    """None when the Mixtral block can be imported, else why not."""
    try:
        from transformers import MixtralConfig  # noqa: F401
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: F401
    except Exception as exc:  # ImportError, or a transformers without Mixtral
        return f"transformers' Mixtral block is not importable ({type(exc).__name__}: {exc})"
    return None


def build_hf_block(
    d_model: int, hidden: int, n_experts: int, top_k: int, backend: str, router_ED: Tensor, w13: Tensor, w2: Tensor
) -> nn.Module:
    """A Mixtral block holding copies of our router and expert weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=d_model, intermediate_size=hidden, num_local_experts=n_experts, num_experts_per_tok=top_k,
        router_jitter_noise=0.0, num_attention_heads=1, num_key_value_heads=1,
    )  # fmt: skip
    cfg._experts_implementation = backend
    block = MixtralSparseMoeBlock(cfg).to(device=w13.device, dtype=w13.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(router_ED)
        block.experts.gate_up_proj.copy_(w13.transpose(1, 2))
        block.experts.down_proj.copy_(w2.transpose(1, 2))
    return block


def hf_grads(block: nn.Module) -> dict[str, Tensor | None]:
    """The block's parameter gradients in our layout (router [E, D], w13 [E, D, 2H], w2 [E, H, D])."""
    e = block.experts

    def t(g):
        return None if g is None else g.transpose(1, 2)

    return {"grad_router": block.gate.weight.grad, "grad_w13": t(e.gate_up_proj.grad), "grad_w2": t(e.down_proj.grad)}
