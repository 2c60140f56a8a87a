import pytest
import torch

from moe_testbed.config import load_config
from moe_testbed.routing.balancing.lbl import LoadBalancingLoss
from moe_testbed.routing.context import RoutingContext


def make(scope="microbatch", E=8, k=2, coeff=1.0):
    cfg = load_config(
        None, [f"model.n_experts={E}", f"routing.top_k={k}", f"balance.scope={scope}", f"balance.coeff={coeff}"]
    )
    return LoadBalancingLoss(E, k, cfg.balance, layer=0)


def test_hand_example():
    # 4 tokens, E=2, k=1: tokens 0-2 go to expert 0, token 3 to expert 1.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    idx = torch.tensor([[0], [0], [0], [1]])
    lbl = make(E=2, k=1)
    # f = (3/4, 1/4); P = (2.6/4, 1.4/4) = (0.65, 0.35); loss = 2 * (0.75*0.65 + 0.25*0.35) = 1.15
    out = lbl.losses(probs, probs.log(), idx, RoutingContext(training=True, seq_len=4))
    assert out["lbl"].item() == pytest.approx(1.15)


def test_matches_transformers_mixtral_times_k():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    E, k, T = 8, 2, 64
    logits = torch.randn(T, E)
    probs = logits.softmax(-1)
    idx = probs.topk(k, -1).indices
    ours = make(E=E, k=k).losses(probs, logits, idx, RoutingContext(training=True, seq_len=T))["lbl"]
    theirs = load_balancing_loss_func((logits,), E, k)
    # transformers does not divide f by k: its value is k times ours.
    torch.testing.assert_close(ours * k, theirs)


def test_global_scope_equals_microbatch_scope_over_concatenation():
    torch.manual_seed(0)
    E, k, T, N = 8, 2, 16, 4
    mbs = [torch.randn(T, E).softmax(-1) for _ in range(N)]
    idxs = [p.topk(k, -1).indices for p in mbs]
    glob = make("global", E, k)
    for i, (p, idx) in enumerate(zip(mbs, idxs)):
        glob.losses(p, p.log(), idx, RoutingContext(training=True, seq_len=T, microbatch=i))
    # f of the last micro-batch's loss comes from all N micro-batches.
    f_global = glob.step_counts_E / (glob.step_tokens * k)
    cat_idx = torch.cat(idxs)
    f_cat = torch.bincount(cat_idx.reshape(-1), minlength=E).float() / (N * T * k)
    torch.testing.assert_close(f_global, f_cat)
    # A re-run of the same micro-batch (activation recomputation) is not counted twice.
    p, idx = mbs[-1], idxs[-1]
    glob.losses(p, p.log(), idx, RoutingContext(training=True, seq_len=T, microbatch=N - 1))
    torch.testing.assert_close(glob.step_counts_E / (glob.step_tokens * k), f_cat)
    glob.after_optimizer_step()
    assert glob.step_tokens.item() == 0 and glob.step_counts_E.sum().item() == 0


def test_sequence_scope_averages_per_sequence_losses():
    torch.manual_seed(0)
    E, k, S, B = 4, 1, 6, 3
    probs = torch.randn(B * S, E).softmax(-1)
    idx = probs.topk(k, -1).indices
    seq = make("sequence", E, k).losses(probs, probs.log(), idx, RoutingContext(training=True, seq_len=S))["lbl"]
    per_seq = [
        make("microbatch", E, k).losses(probs[b * S : (b + 1) * S], None, idx[b * S : (b + 1) * S],
                                        RoutingContext(training=True, seq_len=S))["lbl"]
        for b in range(B)
    ]  # fmt: skip
    torch.testing.assert_close(seq, torch.stack(per_seq).mean())


def test_padding_tokens_are_not_counted():
    torch.manual_seed(0)
    E, k, T = 4, 2, 10
    probs = torch.randn(T, E).softmax(-1)
    idx = probs.topk(k, -1).indices
    dom = torch.tensor([0] * 6 + [-1] * 4)
    padded = make(E=E, k=k).losses(probs, probs.log(), idx, RoutingContext(training=True, seq_len=T, domain_ids_T=dom))
    real = make(E=E, k=k).losses(probs[:6], probs[:6].log(), idx[:6], RoutingContext(training=True, seq_len=6))
    torch.testing.assert_close(padded["lbl"], real["lbl"])
