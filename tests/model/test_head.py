"""model/head.py: the chunked linear cross-entropy equals the plain one, loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from moe_testbed.model import head
from moe_testbed.model.head import linear_cross_entropy


@pytest.mark.parametrize("T", [7, head.CHUNK_TOKENS, 2 * head.CHUNK_TOKENS + 3])
def test_matches_plain_cross_entropy_in_float64(T):
    torch.manual_seed(T)
    D, V = 24, 50
    h = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, V, (T,))
    tgt[::5] = -100  # ignored targets (padding) count neither in the loss nor in its mean
    want = F.cross_entropy(h @ w.t(), tgt)
    (3.0 * want).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, tgt)
    (3.0 * got).backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(h.grad, gh, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(w.grad, gw, rtol=1e-7, atol=1e-10)
    with torch.no_grad():  # evaluation: the loss only
        assert linear_cross_entropy(h, w, tgt).item() == pytest.approx(want.item(), rel=1e-6)


def test_a_tied_weight_gets_both_gradients():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(30, 8)
    ids = torch.randint(0, 30, (40,))
    tgt = torch.randint(0, 30, (40,))
    F.cross_entropy(emb(ids) @ emb.weight.t(), tgt).backward()
    want = emb.weight.grad.clone()
    emb.weight.grad = None
    linear_cross_entropy(emb(ids), emb.weight, tgt).backward()
    torch.testing.assert_close(emb.weight.grad, want, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_stays_close():
    torch.manual_seed(1)
    h = torch.randn(600, 32, requires_grad=True)
    w = torch.randn(64, 32, requires_grad=True)
    tgt = torch.randint(0, 64, (600,))
    want = F.cross_entropy(h @ w.t(), tgt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, tgt)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=2e-2)
    got.backward()
    assert h.grad.dtype == torch.float32 and torch.isfinite(h.grad).all()
