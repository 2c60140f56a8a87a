"""A small decoder-only LM: pre-norm RMSNorm, RoPE, causal SDPA attention, SwiGLU or MoE FFNs.

Tensor legend: B batch, S sequence, D model width, H heads, Dh head width,
V vocabulary. The model is single-device; data and expert parallelism wrap it
from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_testbed.model.ffn import SwiGLU
from moe_testbed.model.head import linear_cross_entropy
from moe_testbed.model.moe import MoELayer
from moe_testbed.model.params import dense_hidden_for
from moe_testbed.routing.context import RoutingContext


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles_SF = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles_SF.cos(), angles_SF.sin()


def apply_rope(x_BHSDh: Tensor, cos_SF: Tensor, sin_SF: Tensor) -> Tensor:
    x1, x2 = x_BHSDh.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos_SF - x2 * sin_SF, x1 * sin_SF + x2 * cos_SF), dim=-1)
    return out.flatten(-2).type_as(x_BHSDh)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BSD: Tensor, cos_SF: Tensor, sin_SF: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos_SF, sin_SF), apply_rope(k, cos_SF, sin_SF)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg, layer: int, moe_index: int | None, info: dict):
        super().__init__()
        m = cfg.model
        self.norm1 = nn.RMSNorm(m.d_model)
        self.attn = Attention(m.d_model, m.n_heads)
        self.norm2 = nn.RMSNorm(m.d_model)
        if moe_index is None:
            self.ffn = SwiGLU(m.d_model, dense_hidden_for(cfg))
        else:
            self.ffn = MoELayer(cfg, layer, moe_index, info)
        self.is_moe = moe_index is not None

    def forward(self, x: Tensor, cos_SF: Tensor, sin_SF: Tensor, ctx: RoutingContext) -> Tensor:
        x = x + self.attn(self.norm1(x), cos_SF, sin_SF)
        h = self.norm2(x)
        return x + (self.ffn(h, ctx) if self.is_moe else self.ffn(h))


@dataclass
class ModelOutput:
    logits: Tensor | None  # [B, S, V]; None when the forward was given targets
    aux_loss: Tensor  # scalar: sum of every MoE layer's balancing losses
    aux: dict[str, Tensor]  # per kind ("lbl", "z"), summed over layers, detached
    loss: Tensor | None = None  # mean cross-entropy against the targets, when given (head.py)


def moe_layer_indices(cfg) -> list[int]:
    m = cfg.model
    if m.dense:
        return []
    return [i for i in range(m.n_layers) if (i + 1) % m.moe_every == 0]


class Transformer(nn.Module):
    def __init__(self, cfg, vocab_size: int, info: dict | None = None):
        super().__init__()
        m = cfg.model
        self.cfg, self.vocab_size = cfg, vocab_size
        info = {"vocab_size": vocab_size, **(info or {})}
        moe_layers = moe_layer_indices(cfg)
        self.moe_layer_names = [f"L{i}" for i in moe_layers]
        self.embed = nn.Embedding(vocab_size, m.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, i, moe_layers.index(i) if i in moe_layers else None, info) for i in range(m.n_layers)
        )
        self.norm = nn.RMSNorm(m.d_model)
        self.lm_head = nn.Linear(m.d_model, vocab_size, bias=False)
        if m.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.model.init_std
        # Output projections are scaled down by depth (GPT-2 / OLMo style) so the
        # residual stream does not grow with the number of layers.
        out_std = std / (2 * self.cfg.model.n_layers) ** 0.5
        for name, p in self.named_parameters():
            if p.dim() < 2 or ".router." in name:
                continue  # norms keep ones; routers initialise themselves
            is_out = name.endswith(("out.weight", "w2.weight", "experts.w2"))
            nn.init.normal_(p, std=out_std if is_out else std)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(
        self, input_ids_BS: Tensor, ctx: RoutingContext | None = None, targets_BS: Tensor | None = None
    ) -> ModelOutput:
        """Logits [B, S, V]; or, given targets, their mean cross-entropy without ever forming the logits."""
        B, S = input_ids_BS.shape
        if ctx is None:
            ctx = RoutingContext(training=self.training, seq_len=S)
        if ctx.token_ids_T is None:
            ctx.token_ids_T = input_ids_BS.reshape(-1)
        head_dim = self.cfg.model.d_model // self.cfg.model.n_heads
        cos_SF, sin_SF = rope_tables(S, head_dim, self.cfg.model.rope_theta, input_ids_BS.device)
        x = self.embed(input_ids_BS)
        for block in self.blocks:
            x = block(x, cos_SF, sin_SF, ctx)
        h = self.norm(x)
        if targets_BS is None:
            logits, loss = self.lm_head(h), None
        else:
            logits, loss = None, linear_cross_entropy(h.view(B * S, -1), self.lm_head.weight, targets_BS.reshape(-1))
        aux_loss = h.new_zeros((), dtype=torch.float32)
        aux: dict[str, Tensor] = {}
        for layer in self.moe_layers:
            for kind, value in layer.aux_losses.items():
                aux_loss = aux_loss + value
                aux[kind] = aux.get(kind, 0.0) + value.detach()
        return ModelOutput(logits=logits, aux_loss=aux_loss, aux=aux, loss=loss)

    def after_optimizer_step(self, step: int) -> None:
        for layer in self.moe_layers:
            layer.router.after_optimizer_step(step)
