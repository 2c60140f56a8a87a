"""The hand-written expert kernels (model/experts.py) against plain autograd in float64.

The bench's speed comes from a custom autograd.Function with its own backward,
row blocks and two matmul back ends; every combination must give the same
output and the same gradients for x, the gates and both weight stacks.
"""

import pytest
import torch
import torch.nn.functional as F

import moe_testbed.model.experts as experts_mod
from moe_testbed.model.experts import GroupedExperts


def autograd_reference(x, idx, gate, w13, w2, keep):
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        m = idx == e
        if keep is not None:
            m = m & keep
        t, j = m.nonzero(as_tuple=True)
        a, b = (x[t] @ w13[e]).chunk(2, -1)
        out = out.index_add(0, t, gate[t, j, None] * ((F.silu(a) * b) @ w2[e]))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: the loop back end
@pytest.mark.parametrize("block_bytes", [16 << 20, 200])  # one block / many blocks
@pytest.mark.parametrize("pad", [False, True])  # ragged blocks / padded batched blocks
@pytest.mark.parametrize("drops", [False, True])
def test_every_gradient_matches(monkeypatch, dtype, block_bytes, pad, drops):
    monkeypatch.setattr(experts_mod, "_BLOCK_BYTES", block_bytes)
    waste = 100.0 if pad else -1.0
    monkeypatch.setattr(experts_mod, "_PAD_WASTE", {True: (waste, waste), False: (waste, waste)})
    torch.manual_seed(0)
    T, K, E, D, H = 37, 3, 7, 16, 8
    ex = GroupedExperts(E, D, H, impl="loop").to(dtype)
    torch.nn.init.normal_(ex.w13)
    torch.nn.init.normal_(ex.w2)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    gate = torch.rand(T, K, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(4)[:K] + 1 for _ in range(T)])  # experts 0, 5, 6 idle
    keep = torch.rand(T, K) > 0.3 if drops else None
    g = torch.randn(T, D, dtype=dtype)
    y = ex(x, idx, gate, keep)
    y.backward(g)
    xs, gs = x.detach().double().requires_grad_(), gate.detach().double().requires_grad_()
    w13, w2 = ex.w13.detach().double().requires_grad_(), ex.w2.detach().double().requires_grad_()
    want = autograd_reference(xs, idx, gs, w13, w2, keep)
    want.backward(g.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for got, ref in [
        (y, want),
        (x.grad, xs.grad),
        (gate.grad, gs.grad),
        (ex.w13.grad, w13.grad),
        (ex.w2.grad, w2.grad),
    ]:
        assert ((got.double() - ref).norm() / ref.norm()).item() < tol
    assert ex.w13.grad[0].abs().sum() == 0 and ex.w2.grad[5:].abs().sum() == 0  # idle experts: exact zeros


def test_blocks_cover_every_expert_once():
    blocks = experts_mod._blocks([3, 0, 5, 0, 0, 2, 0], row_bytes=experts_mod._BLOCK_BYTES // 4)
    assert [(b.e0, b.e1, b.r0, b.r1) for b in blocks] == [(0, 2, 0, 3), (2, 5, 3, 8), (5, 7, 8, 10)]
    assert all(b.cap is None for b in blocks)  # no padding allowed by default here
    padded = experts_mod._blocks([4, 3, 4, 4], row_bytes=4, max_waste=(0.2, 0.2))
    assert len(padded) == 1 and padded[0].cap == 4 and padded[0].rows == 16
    assert experts_mod._blocks([0, 0], row_bytes=4) == []
    big = experts_mod._PAD_MAX_MACS // 1000 + 1  # large matmuls per expert: plain matmuls beat bmm, never pad
    assert experts_mod._blocks([big, big], row_bytes=4, max_waste=(1.0, 1.0), row_macs=1000)[0].cap is None
    assert experts_mod._blocks([big, big], row_bytes=4, max_waste=(1.0, 1.0), row_macs=1)[0].cap == big
    # Few rows per expert may pad more than many rows (measured: bmm wins by more there).
    few, many = [100, 60], [300, 180]  # both pad by 25% of rows
    assert experts_mod._blocks(few, row_bytes=4, max_waste=(0.3, 0.2))[0].cap == 100
    assert experts_mod._blocks(many, row_bytes=4, max_waste=(0.3, 0.2))[0].cap is None


def test_all_slots_dropped_gives_zero_output_and_gradients():
    ex = GroupedExperts(4, 16, 8, impl="loop")
    torch.nn.init.normal_(ex.w13)
    torch.nn.init.normal_(ex.w2)
    x = torch.randn(5, 16, requires_grad=True)
    y = ex(x, torch.randint(0, 4, (5, 2)), torch.rand(5, 2), torch.zeros(5, 2, dtype=torch.bool))
    y.sum().backward()
    assert y.abs().sum() == 0 and x.grad.abs().sum() == 0 and ex.w13.grad.abs().sum() == 0
