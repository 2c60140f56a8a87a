"""Routed experts: sort slots by expert, run each expert on a contiguous slice.

Tensor legend: T tokens, K slots per token, N = T*K slots, n kept slots (N minus
capacity drops), E experts, D model width, H expert hidden size.

Dispatch (no per-expert boolean mask over all tokens, which costs 4-5x):
  1. sort the N slots by expert id (dropped slots get the sentinel id E and sort
     last, so the kept slots are the prefix ``order_N[:n]``);
  2. gather the kept slots' hidden states in that order: x_nD;
  3. run the experts on contiguous row blocks;
  4. scale by the gate weights and add each row back into its token (index_add).

Two implementations of step 3, same arithmetic:
  ``loop`` (CPU default): one autograd.Function that loops over the experts with
     ``torch.mm(out=...)`` into preallocated buffers and writes its own backward.
     Plain autograd over a Python loop spent ~30% of the layer (at 64 experts) on
     ``cat``/``split``/``stack`` of per-expert pieces, ``index_put`` (the backward
     of fancy indexing) and zero fills; the fused function has none of those, so
     what is left is the matmuls plus a few elementwise passes, like a dense FFN.
  ``grouped_mm`` (CUDA default): torch's grouped matmul under autograd, with
     index_select / index_add for gather and combine (their backwards are each
     other, never ``index_put``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def grouped_mm_ok(*tensors: Tensor) -> bool:
    """torch's grouped matmul needs 16-byte aligned strides and a CUDA or CPU kernel."""
    if not hasattr(F, "grouped_mm"):
        return False
    if any(t.dtype not in (torch.float32, torch.bfloat16, torch.float16) for t in tensors):
        return False
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in tensors)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul on x (custom Functions are not autocast)."""
    if x.dtype in (torch.float32, torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _SortedExperts(torch.autograd.Function):
    """SwiGLU experts over slots sorted by expert, with a hand-written backward.

    Inputs: x_TD, gate_TK, w13 [E, D, 2H], w2 [E, H, D], order_N (slots sorted by
    expert, kept ones first), counts (kept slots per expert, host ints), K.
    Output: y_TD = sum over each token's kept slots of gate * expert(x).
    """

    @staticmethod
    def forward(ctx, x_TD, gate_TK, w13, w2, order_N, counts, K):
        dtypes = (x_TD.dtype, gate_TK.dtype, w13.dtype, w2.dtype)
        dt = _compute_dtype(x_TD)
        x_TD, w13c, w2c = x_TD.to(dt), w13.to(dt), w2.to(dt)
        T, D = x_TD.shape
        H = w2.shape[1]
        n = sum(counts)
        order_n = order_N[:n]
        tok_n = torch.div(order_n, K, rounding_mode="floor")
        gate_n = gate_TK.reshape(-1).index_select(0, order_n).to(dt)
        x_nD = x_TD.index_select(0, tok_n)
        spans = _spans(counts)
        h13, sa, act, y = (x_TD.new_empty(n, w) for w in (2 * H, H, H, D))
        for e, s, t in spans:
            torch.mm(x_nD[s:t], w13c[e], out=h13[s:t])
        torch.ops.aten.silu.out(h13[:, :H], out=sa)
        torch.mul(sa, h13[:, H:], out=act)
        for e, s, t in spans:
            torch.mm(act[s:t], w2c[e], out=y[s:t])
        y.mul_(gate_n[:, None])
        out = x_TD.new_zeros(T, D).index_add_(0, tok_n, y)
        ctx.save_for_backward(x_nD, h13, sa, act, gate_n, tok_n, order_n, w13c, w2c)
        ctx.spans, ctx.shapes = spans, (T, K, D, H)
        ctx.dtypes = dtypes  # gradients go back in the inputs' own dtypes
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_TD):
        x_nD, h13, sa, act, gate_n, tok_n, order_n, w13, w2 = ctx.saved_tensors
        spans, (T, K, D, H) = ctx.spans, ctx.shapes
        n = x_nD.shape[0]
        g_nD = g_TD.to(x_nD.dtype).contiguous().index_select(0, tok_n)
        # Per slot: u = dL/d(act) before gating = g @ w2^T; the gate's gradient is
        # <dL/dy, y> = <u, act>; then act = silu(a) * b gives
        # dL/db = gate * u * silu(a) and dL/da = silu'(a) * gate * u * b.
        gg_n = gate_n.new_empty(n)
        g_h13, g_x = x_nD.new_empty(n, 2 * H), x_nD.new_empty(n, D)
        grad_w13, grad_w2 = _weight_grad_buffers(w13, spans), _weight_grad_buffers(w2, spans)
        u = g_h13[:, :H]  # dL/d(act) lives where dL/da will be written
        for e, s, t in spans:
            torch.mm(g_nD[s:t], w2[e].t(), out=u[s:t])
        torch.sum(u * act, -1, out=gg_n)
        u.mul_(gate_n[:, None])
        g_nD.mul_(gate_n[:, None])
        for e, s, t in spans:
            torch.mm(act[s:t].t(), g_nD[s:t], out=grad_w2[e])
        torch.mul(u, sa, out=g_h13[:, H:])
        torch.ops.aten.silu_backward.grad_input(u.mul_(h13[:, H:]), h13[:, :H], grad_input=u)
        for e, s, t in spans:
            torch.mm(x_nD[s:t].t(), g_h13[s:t], out=grad_w13[e])
            torch.mm(g_h13[s:t], w13[e].t(), out=g_x[s:t])
        dx, dgate, dw13, dw2 = ctx.dtypes
        grad_x = x_nD.new_zeros(T, D).index_add_(0, tok_n, g_x).to(dx)
        grad_gate = gg_n.new_zeros(T * K).index_copy_(0, order_n, gg_n).view(T, K).to(dgate)
        return grad_x, grad_gate, grad_w13.to(dw13), grad_w2.to(dw2), None, None, None


def _spans(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start row, end row) of every expert with at least one slot."""
    spans, start = [], 0
    for e, c in enumerate(counts):
        if c:
            spans.append((e, start, start + c))
        start += c
    return spans


def _weight_grad_buffers(w: Tensor, spans) -> Tensor:
    """Gradient buffer of a stacked weight: every used expert's block is overwritten by
    its matmul, so only idle experts are zeroed (filling all E blocks costs more)."""
    grad = torch.empty_like(w)
    for e in set(range(w.shape[0])) - {e for e, _, _ in spans}:
        grad[e].zero_()
    return grad


class GroupedExperts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, hidden: int, impl: str = "auto"):
        super().__init__()
        self.n_experts, self.d_model, self.hidden, self.impl = n_experts, d_model, hidden, impl
        self.w13 = nn.Parameter(torch.empty(n_experts, d_model, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, d_model))

    def use_grouped_mm(self, x: Tensor) -> bool:
        if self.impl == "loop":
            return False
        ok = grouped_mm_ok(self.w13, self.w2, x)
        if self.impl == "grouped_mm":
            return ok
        # auto: on CPU torch's grouped matmul is itself a loop of plain matmuls, and
        # the fused loop below also saves the autograd bookkeeping around it.
        return ok and x.is_cuda

    def forward(self, x_TD: Tensor, idx_TK: Tensor, gate_TK: Tensor, keep_TK: Tensor | None = None) -> Tensor:
        T, K = idx_TK.shape
        E = self.n_experts
        e_N = idx_TK.reshape(-1)
        if keep_TK is not None:
            e_N = torch.where(keep_TK.reshape(-1), e_N, E)
        order_N = torch.argsort(e_N, stable=True)
        counts_E = torch.bincount(e_N, minlength=E + 1)[:E]
        if self.use_grouped_mm(x_TD):
            return self._grouped_mm(x_TD, gate_TK, order_N, counts_E, K, keep_all=keep_TK is None)
        return _SortedExperts.apply(x_TD, gate_TK, self.w13, self.w2, order_N, counts_E.tolist(), K)

    def _grouped_mm(
        self, x_TD: Tensor, gate_TK: Tensor, order_N: Tensor, counts_E: Tensor, K: int, keep_all: bool
    ) -> Tensor:
        # Only the kept prefix of the sorted slots is computed: the offsets end at
        # n, so no row of the output or of the input's gradient is left
        # uninitialised by the kernel. Dropless routing knows n = N without a host
        # sync; with capacity drops n costs one sync per layer.
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        n = order_N.shape[0] if keep_all else int(offs[-1])
        order_n = order_N[:n]
        tok_n = torch.div(order_n, K, rounding_mode="floor")
        dt = _compute_dtype(x_TD)
        x_nD = x_TD.index_select(0, tok_n).to(dt)
        w13, w2 = self.w13.to(dt), self.w2.to(dt)
        a, b = F.grouped_mm(x_nD, w13, offs=offs).chunk(2, dim=-1)
        y_nD = F.grouped_mm(F.silu(a) * b, w2, offs=offs)
        y_nD = y_nD * gate_TK.reshape(-1).index_select(0, order_n).to(dt)[:, None]
        return y_nD.new_zeros(x_TD.shape[0], y_nD.shape[1]).index_add(0, tok_n, y_nD)
