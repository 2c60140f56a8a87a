"""The LM head and its cross-entropy, computed a chunk of tokens at a time.

Tensor legend: T tokens, D model width, V vocabulary, C tokens per chunk.

A forward that holds a whole optimizer step (8192 tokens in the quick preset)
would otherwise make [T, V] logits, their log-softmax and their gradient:
three 268 MB buffers at V = 8192, each above glibc's largest mmap threshold,
so mapped afresh and page-faulted on every step (allocator.py), which made the
head slower than all the experts together. Here no [T, V] tensor exists: each
chunk's logits are formed, turned into its loss and its gradient with respect
to the hidden states and the head's weight (``softmax - onehot``, the
cross-entropy's gradient), and dropped. The backward then only scales the
gradients the forward computed (the "fused linear cross-entropy" of
Liger-Kernel and torchtune). Without gradients (evaluation) only the loss is
computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_TOKENS = 512  # a chunk's logits are 512 x V floats: 16 MiB at V = 8192, reused from step to step


def _matmul_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _accum_dtype(dt: torch.dtype) -> torch.dtype:
    """Softmax and sums in at least fp32 (bf16 matmuls still accumulate here)."""
    return torch.promote_types(dt, torch.float32)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD: Tensor, w_VD: Tensor, tgt_T: Tensor, ignore_index: int) -> Tensor:
        dt = _matmul_dtype(h_TD)
        acc = _accum_dtype(dt)
        h, w = h_TD.to(dt), w_VD.to(dt)
        valid_T = tgt_T != ignore_index
        n_valid = valid_T.sum().clamp_min(1)
        loss = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h_TD, dtype=acc)
        grad_w = torch.zeros_like(w_VD, dtype=acc)
        for s in range(0, h.shape[0], CHUNK_TOKENS):
            e = min(s + CHUNK_TOKENS, h.shape[0])
            logits_CV = (h[s:e] @ w.t()).to(acc)
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            v_C = valid_T[s:e]
            tgt_C = tgt_T[s:e].clamp_min(0)
            loss += ((lse_C - logits_CV.gather(1, tgt_C[:, None])[:, 0]) * v_C).sum()
            g_CV = logits_CV.sub_(lse_C[:, None]).exp_()  # softmax, in place of the logits
            g_CV[torch.arange(e - s, device=g_CV.device), tgt_C] -= 1.0
            g_CV.mul_(v_C[:, None])
            if dt == acc:
                torch.mm(g_CV, w, out=grad_h[s:e])
                grad_w.addmm_(g_CV.t(), h[s:e])
            else:  # bf16 matmuls, fp32 accumulation
                grad_h[s:e] = g_CV.to(dt) @ w
                grad_w += (g_CV.t().to(dt) @ h[s:e]).to(acc)
        ctx.save_for_backward(grad_h, grad_w, n_valid)
        ctx.dtypes = (h_TD.dtype, w_VD.dtype)
        return (loss / n_valid).float()

    @staticmethod
    def backward(ctx, g: Tensor):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = g / n_valid
        return (grad_h * scale).to(ctx.dtypes[0]), (grad_w * scale).to(ctx.dtypes[1]), None, None


def linear_cross_entropy(h_TD: Tensor, w_VD: Tensor, tgt_T: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of ``h_TD @ w_VD.T`` against ``tgt_T`` over the targets that are not ignored."""
    if torch.is_grad_enabled() and (h_TD.requires_grad or w_VD.requires_grad):
        return _LinearCrossEntropy.apply(h_TD, w_VD, tgt_T, ignore_index)
    dt = _matmul_dtype(h_TD)
    h, w = h_TD.to(dt), w_VD.to(dt)
    valid_T = tgt_T != ignore_index
    loss = torch.zeros((), dtype=_accum_dtype(dt), device=h.device)
    for s in range(0, h.shape[0], CHUNK_TOKENS):
        logits_CV = (h[s : s + CHUNK_TOKENS] @ w.t()).to(loss.dtype)
        tgt_C = tgt_T[s : s + CHUNK_TOKENS]
        loss += torch.nn.functional.cross_entropy(logits_CV, tgt_C, ignore_index=ignore_index, reduction="sum")
    return (loss / valid_T.sum().clamp_min(1)).float()
