import pytest
import torch

from moe_testbed.config import load_config
from moe_testbed.model import Transformer, count_params, dense_hidden_for
from moe_testbed.model.experts import GroupedExperts
from moe_testbed.routing.context import RoutingContext

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_experts=4", "model.expert_hidden=16"]


def test_forward_shapes_and_aux():
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    model = Transformer(cfg, vocab_size=50)
    x = torch.randint(0, 50, (3, 7))
    out = model(x, RoutingContext(training=True, seq_len=7))
    assert out.logits.shape == (3, 7, 50)
    assert "lbl" in out.aux and out.aux_loss.item() > 0


def test_causal_logits_do_not_see_the_future():
    torch.manual_seed(0)
    model = Transformer(load_config(None, TINY), vocab_size=50).eval()
    x = torch.randint(0, 50, (1, 8))
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % 50
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[0, :5], b[0, :5])


def test_param_counts_by_hand():
    # d=32, H=16, E=4, k=2, 2 layers, vocab 50, tied embeddings.
    cfg = load_config(None, TINY)
    model = Transformer(cfg, vocab_size=50)
    counts = count_params(model)
    d, H, E, k, V = 32, 16, 4, 2, 50
    per_layer = 4 * d * d + 2 * d + E * d + E * 3 * d * H  # attention, 2 norms, router, experts
    total = V * d + 2 * per_layer + d  # embedding, layers, final norm
    assert counts["total"] == total
    assert counts["active"] == total - 2 * (E - k) * 3 * d * H


# d=32, H=16, E=4, k=2 (TINY). One MoE FFN: expert 3*d*H = 1536, router E*d = 128.
#   active: (k*1536 + 128) / (3*d) = 3200 / 96 = 33.3 -> nearest multiple of 8: 32
#   total:  (E*1536 + 128) / (3*d) = 6272 / 96 = 65.3 -> nearest multiple of 8: 64
@pytest.mark.parametrize("match, expected", [("active", 32), ("total", 64)])
def test_dense_baseline_sizing(match, expected):
    cfg = load_config(None, [*TINY, "model.dense=true", f"model.dense_match={match}"])
    assert dense_hidden_for(cfg) == expected
    assert dense_hidden_for(cfg.replace({"model.dense_hidden": 40})) == 40  # an explicit width wins
    model = Transformer(cfg, vocab_size=50)
    moe = Transformer(load_config(None, TINY), vocab_size=50)
    key = "active" if match == "active" else "total"
    assert abs(count_params(model)["total"] - count_params(moe)[key]) / count_params(moe)[key] < 0.05


def reference_moe(x_TD, idx_TK, gate_TK, w13, w2, keep_TK=None):
    """Per-token loop in float64: the slow obvious implementation."""
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for j in range(idx_TK.shape[1]):
            if keep_TK is not None and not keep_TK[t, j]:
                continue
            e = idx_TK[t, j]
            a, b = (x_TD[t] @ w13[e]).chunk(2)
            out[t] += gate_TK[t, j] * ((torch.nn.functional.silu(a) * b) @ w2[e])
    return out


def random_experts(seed: int, E: int, D: int, H: int, impl: str) -> GroupedExperts:
    """Experts with unit-scale weights (the default init is near zero), seeded."""
    torch.manual_seed(seed)
    experts = GroupedExperts(E, D, H, impl=impl)
    torch.nn.init.normal_(experts.w13)
    torch.nn.init.normal_(experts.w2)
    return experts


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("with_drops", [False, True])
def test_grouped_experts_match_per_token_reference(impl, with_drops):
    T, K, E, D, H = 23, 2, 5, 16, 8
    experts = random_experts(1, E, D, H, impl)
    x = torch.randn(T, D)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    gate = torch.rand(T, K)
    keep = torch.rand(T, K) > 0.3 if with_drops else None
    got = experts(x, idx, gate, keep)
    w13, w2 = experts.w13.detach().double(), experts.w2.detach().double()
    want = reference_moe(x.double(), idx, gate.double(), w13, w2, keep)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if impl == "grouped_mm":
        assert experts.use_grouped_mm(x)
    # Gradients reach every expert that received a kept slot and no other.
    got.square().sum().backward()
    used = torch.zeros(E, dtype=torch.bool)
    used[idx[keep] if keep is not None else idx.reshape(-1)] = True
    assert torch.equal(experts.w2.grad.abs().sum((1, 2)) > 0, used)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("with_drops", [False, True])
def test_grouped_experts_gradients_match_autograd_reference(impl, with_drops):
    """The loop path has a hand-written backward: pin every gradient against autograd in float64."""
    T, K, E, D, H = 19, 2, 4, 16, 8
    experts = random_experts(2, E, D, H, impl)
    x = torch.randn(T, D, requires_grad=True)
    gate = torch.rand(T, K, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    keep = torch.rand(T, K) > 0.3 if with_drops else None
    upstream = torch.randn(T, D)
    (experts(x, idx, gate, keep) * upstream).sum().backward()

    x64 = x.detach().double().requires_grad_()
    gate64 = gate.detach().double().requires_grad_()
    w13 = experts.w13.detach().double().requires_grad_()
    w2 = experts.w2.detach().double().requires_grad_()
    (reference_moe(x64, idx, gate64, w13, w2, keep) * upstream.double()).sum().backward()
    for got, want in [
        (x.grad, x64.grad),
        (gate.grad, gate64.grad),
        (experts.w13.grad, w13.grad),
        (experts.w2.grad, w2.grad),
    ]:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
