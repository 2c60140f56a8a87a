"""Routed experts: sort slots by expert, run each expert on a contiguous slice.

Tensor legend: T tokens, K slots per token, N = T*K slots, n kept slots (N minus
capacity drops), E experts, D model width, H expert hidden size.

Dispatch (no per-expert boolean mask over all tokens, which costs 4-5x):
  1. sort the N slots by expert id (dropped slots get the sentinel id E and sort
     last, so the kept slots are the prefix ``order_N[:n]``);
  2. gather the kept slots' hidden states in that order;
  3. run the experts on contiguous row blocks;
  4. scale by the gate weights and add each row back into its token (index_add).

Two implementations of steps 2-4, same arithmetic:
  ``loop`` (CPU default): one autograd.Function with a hand-written backward
     (``_SortedExperts``). Plain autograd around a per-expert Python loop spent
     ~30% of the layer at 64 experts on ``cat``/``split``/``stack`` of per-expert
     pieces, ``index_put`` (the backward of fancy indexing) and zero fills; here
     what is left is the matmuls plus a few elementwise passes, like a dense FFN.
  ``grouped_mm`` (CUDA default): torch's grouped matmul under autograd, with
     index_select / index_add for gather and combine (each other's backward,
     never ``index_put``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# Blocks of consecutive experts hold at most this many bytes per row buffer: the
# elementwise work then runs on rows the matmul just wrote (still in cache), and
# every buffer stays under 32 MiB, glibc's largest dynamic mmap threshold, so
# freed buffers are reused instead of being mapped afresh (page faults cost
# ~0.25 ms per MiB, on every call). Small layers are one block: fewest op calls.
_BLOCK_BYTES = 16 << 20
# With 2+ threads, a block of experts with small matmuls is padded to equal sizes
# and run as one batched matmul, which splits the batch across threads instead of
# splitting each small matmul. Measured on 2 cores, side by side: ~40 rows x d128
# per expert (the quick shape) ran 1.16x faster even with padding up to twice the
# rows; ~500 rows x d128 (D) 1.03x faster with under 30% padding; ~500 rows x
# d512 (C) and ~2k rows (A, B) ran 5-12% slower than with plain matmuls, and with
# one thread bmm is slower at every size. Hence the limits below.
# Most padding, as a share of a block's rows, for (blocks of at most _PAD_SMALL_ROWS
# rows per expert, larger blocks), keyed by "more than one thread"; -1: never pad.
_PAD_WASTE = {True: (1.0, 0.30), False: (-1.0, -1.0)}
_PAD_SMALL_ROWS = 128
_PAD_MAX_MACS = 64 << 20  # per expert: rows x D x 2H above this, a block is never padded


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


class _Block:
    """Experts e0..e1-1, whose sorted kept slots are rows r0..r1-1 of the sort order.

    ``cap`` is None for a ragged block (grouped matmul over ``sizes``) or the
    padded rows per expert of a batched block. ``tok``/``slot`` give every row of
    the block's buffers its token and slot; padding rows point at the extra
    row T / slot N, which the caller drops.
    """

    __slots__ = ("e0", "e1", "r0", "r1", "sizes", "cap", "offs", "tok", "slot")

    def __init__(self, e0: int, e1: int, r0: int, sizes: list[int], cap: int | None):
        self.e0, self.e1, self.r0, self.r1 = e0, e1, r0, r0 + sum(sizes)
        self.sizes, self.cap = sizes, cap

    def index(self, tok_n: Tensor, order_n: Tensor, T: int, N: int, gmm: bool) -> None:
        tok, slot = tok_n[self.r0 : self.r1], order_n[self.r0 : self.r1]
        self.offs = None
        if self.cap is None:
            self.tok, self.slot = tok, slot
            if gmm:
                self.offs = torch.tensor(self.sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(tok.device)
            return
        # Row i of the block's j-th expert goes to padded row j*cap + i.
        starts = [0]
        for c in self.sizes[:-1]:
            starts.append(starts[-1] + c)
        shift = torch.tensor([j * self.cap - s for j, s in enumerate(starts)], device=tok.device)
        sizes = torch.tensor(self.sizes, device=tok.device)
        pos = torch.arange(tok.shape[0], device=tok.device) + shift.repeat_interleave(sizes, output_size=tok.shape[0])
        rows = len(self.sizes) * self.cap
        self.tok = tok.new_full((rows,), T).index_copy_(0, pos, tok)
        self.slot = slot.new_full((rows,), N).index_copy_(0, pos, slot)

    @property
    def rows(self) -> int:
        return self.r1 - self.r0 if self.cap is None else len(self.sizes) * self.cap


def _blocks(
    counts: list[int], row_bytes: int, max_waste: tuple[float, float] = (-1.0, -1.0), row_macs: int = 0
) -> list[_Block]:
    """Consecutive experts grouped into blocks of at most ``_BLOCK_BYTES`` per row buffer
    (an expert larger than that is a block of its own). Experts without slots never
    start a block, so the blocks cover experts 0..E-1 exactly (none when no slot is
    kept) and every weight gradient is written by some block."""
    limit = max(1, _BLOCK_BYTES // row_bytes)
    spans, e0, rows = [], 0, 0
    for e, c in enumerate(counts):
        if rows and c and rows + c > limit:
            spans.append((e0, e))
            e0, rows = e, 0
        rows += c
    if rows:
        spans.append((e0, len(counts)))
    blocks, r0 = [], 0
    for e0, e1 in spans:
        sizes = counts[e0:e1]
        n, cap = sum(sizes), max(sizes)
        waste = max_waste[0] if cap <= _PAD_SMALL_ROWS else max_waste[1]
        padded = len(sizes) > 1 and cap * row_macs <= _PAD_MAX_MACS and len(sizes) * cap <= (1 + waste) * n
        blocks.append(_Block(e0, e1, r0, sizes, cap if padded else None))
        r0 += n
    return blocks


def _mm_groups(a: Tensor, w: Tensor, blk: _Block) -> Tensor:
    """Rows of expert g (of the block) times ``w[g]``."""
    if blk.cap is not None:
        return torch.bmm(a.view(len(blk.sizes), blk.cap, a.shape[1]), w).view(a.shape[0], w.shape[-1])
    if blk.offs is not None:
        return F.grouped_mm(a, w, offs=blk.offs)
    out = a.new_empty(a.shape[0], w.shape[-1])
    for a_g, w_g, o_g in zip(a.split(blk.sizes), w.unbind(0), out.split(blk.sizes)):
        if a_g.shape[0]:
            torch.mm(a_g, w_g, out=o_g)
    return out


def _wgrad_groups(a: Tensor, b: Tensor, blk: _Block) -> Tensor:
    """Per expert ``a_g^T @ b_g`` -> [experts, A, B]; zeros for an expert without slots."""
    if blk.cap is not None:
        E = len(blk.sizes)
        return torch.bmm(a.view(E, blk.cap, a.shape[1]).transpose(1, 2), b.view(E, blk.cap, b.shape[1]))
    if blk.offs is not None:
        return F.grouped_mm(a.t(), b, offs=blk.offs)
    out = a.new_empty(len(blk.sizes), a.shape[1], b.shape[1])
    for a_g, b_g, o_g in zip(a.split(blk.sizes), b.split(blk.sizes), out.unbind(0)):
        if a_g.shape[0]:
            torch.mm(a_g.t(), b_g, out=o_g)
        else:
            o_g.zero_()
    return out


def _with_zero_row(t: Tensor) -> Tensor:
    """``t`` with one zero row (or element) appended: what padding reads and writes."""
    return torch.cat([t, t.new_zeros(1, *t.shape[1:])])


class _SortedExperts(torch.autograd.Function):
    """SwiGLU experts over slots sorted by expert, with a hand-written backward.

    Inputs: x_TD, gate_TK, w13 [E, D, 2H], w2 [E, H, D], order_N (slots sorted by
    expert, kept ones first), counts (kept slots per expert, host ints), K.
    Output: y_TD = sum over each token's kept slots of gate * expert(x).
    Padding rows of batched blocks read a zero input row and carry a zero gate,
    so they add exact zeros to every output and gradient.
    """

    @staticmethod
    def forward(ctx, x_TD, gate_TK, w13, w2, order_N, counts, K):
        dtypes = (x_TD.dtype, gate_TK.dtype, w13.dtype, w2.dtype)
        dt = _compute_dtype(x_TD)
        x_TD, w13c, w2c = x_TD.to(dt), w13.to(dt), w2.to(dt)
        T, D = x_TD.shape
        H, N = w2.shape[1], gate_TK.numel()
        n = sum(counts)
        order_n = order_N[:n]
        tok_n = torch.div(order_n, K, rounding_mode="floor")
        waste = _PAD_WASTE[torch.get_num_threads() > 1] if x_TD.device.type == "cpu" else (-1.0, -1.0)
        es = x_TD.element_size()
        blocks = _blocks(counts, max(2 * H, D) * es, waste, row_macs=D * 2 * H)
        # torch's grouped matmul: fp32/bf16 with 16-byte aligned strides (also transposed).
        gmm = hasattr(F, "grouped_mm") and dt in (torch.float32, torch.bfloat16) and D * es % 16 == H * es % 16 == 0
        for blk in blocks:
            blk.index(tok_n, order_n, T, N, gmm)
        # Padding rows read (and write) one extra zero row: token T, slot N.
        pad = any(blk.cap is not None for blk in blocks)
        x_src = _with_zero_row(x_TD) if pad else x_TD
        gate_src = gate_TK.reshape(-1).to(dt)
        gate_src = _with_zero_row(gate_src) if pad else gate_src
        out = x_TD.new_zeros(T + pad, D)
        saved = []
        for blk in blocks:
            x_b = x_src.index_select(0, blk.tok)
            gate_b = gate_src.index_select(0, blk.slot)
            h13 = _mm_groups(x_b, w13c[blk.e0 : blk.e1], blk)
            sa = F.silu(h13[:, :H])
            act = sa * h13[:, H:]
            y = _mm_groups(act, w2c[blk.e0 : blk.e1], blk)  # kept unscaled: the gate's gradient needs it
            out.index_add_(0, blk.tok, y * gate_b[:, None])
            saved.append((x_b, gate_b, h13, sa, act, y))
        ctx.save_for_backward(w13c, w2c)
        # Intermediates made here stay on ctx, one tuple per block, so that
        # backward can free each block as soon as it is done with it.
        ctx.blocks, ctx.saved_blocks, ctx.shapes, ctx.dtypes = blocks, saved, (T, K, D, H, pad), dtypes
        return out[:T].clone() if pad else out  # a clone: no view of a buffer escapes

    @staticmethod
    @once_differentiable
    def backward(ctx, g_TD):
        w13, w2 = ctx.saved_tensors
        (T, K, D, H, pad), blocks = ctx.shapes, ctx.blocks
        g_TD = g_TD.to(w13.dtype)
        g_src = _with_zero_row(g_TD) if pad else g_TD.contiguous()
        # Per row, with y the unscaled expert output: the gate's gradient is <g, y>
        # (D wide, cheaper than the equal <g @ w2^T, act>, H wide). Scaling g by the
        # gate first makes u = (gate * g) @ w2^T = dL/d(act) directly; then
        # act = silu(a) * b gives dL/db = u * silu(a) and dL/da = silu'(a) * u * b.
        grad_gate = g_TD.new_zeros(T * K + pad)
        grad_x = g_TD.new_zeros(T + pad, D)
        whole = len(blocks) == 1  # one block covers every expert: its weight gradients are the gradients
        grad_w13 = None if whole else torch.empty_like(w13)
        grad_w2 = None if whole else torch.empty_like(w2)
        for i, blk in enumerate(blocks):
            x_b, gate_b, h13, sa, act, y = ctx.saved_blocks[i]
            ctx.saved_blocks[i] = None
            gate_b = gate_b[:, None]
            g_b = g_src.index_select(0, blk.tok)
            grad_gate.index_add_(0, blk.slot, (g_b * y).sum(-1))
            del y
            g_b.mul_(gate_b)
            u = _mm_groups(g_b, w2[blk.e0 : blk.e1].transpose(1, 2), blk)
            gw2 = _wgrad_groups(act, g_b, blk)
            g_h13 = torch.empty_like(h13)
            torch.mul(u, sa, out=g_h13[:, H:])
            torch.ops.aten.silu_backward.grad_input(u.mul_(h13[:, H:]), h13[:, :H], grad_input=g_h13[:, :H])
            gw13 = _wgrad_groups(x_b, g_h13, blk)
            grad_x.index_add_(0, blk.tok, _mm_groups(g_h13, w13[blk.e0 : blk.e1].transpose(1, 2), blk))
            if whole:
                grad_w13, grad_w2 = gw13, gw2
            else:
                grad_w13[blk.e0 : blk.e1] = gw13
                grad_w2[blk.e0 : blk.e1] = gw2
        if not blocks:  # every slot dropped
            grad_w13, grad_w2 = torch.zeros_like(w13), torch.zeros_like(w2)
        dx, dgate, dw13, dw2 = ctx.dtypes
        grad_gate = grad_gate[: T * K].view(T, K).to(dgate)
        return grad_x[:T].to(dx), grad_gate, grad_w13.to(dw13), grad_w2.to(dw2), None, None, None


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
        # auto: on CPU torch's grouped matmul is itself a loop of plain matmuls; the
        # fused function (which uses it inside) also saves the autograd bookkeeping.
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
