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


class FakeGroup:
    """Rank ``rank`` of two whose peer holds ``peer_sum``: all-reduce adds it."""

    world_size = 2

    def __init__(self, rank, peer_sum):
        self.rank, self.peer_sum = rank, peer_sum

    def all_reduce_sum(self, t):
        return t + self.peer_sum


def test_global_scope_is_the_formula_over_the_whole_step_on_one_or_two_ranks():
    torch.manual_seed(0)
    E, k, T, N = 8, 2, 16, 4
    probs = torch.randn(N * T, E).softmax(-1)  # the step: N micro-batches of T tokens
    idx = probs.topk(k, -1).indices
    f = torch.bincount(idx.reshape(-1), minlength=E).float() / (N * T * k)
    want = E * (f * probs.mean(0)).sum()
    one = RoutingContext(training=True, seq_len=T, microbatch_size=1, whole_step=True)
    torch.testing.assert_close(make("global", E, k).losses(probs, None, idx, one)["lbl"], want)
    # Two ranks, each forwarding its half of the step: the counts are all-reduced inside the forward,
    # and the mean of the two losses (what averaged gradients follow) is the loss of the step.
    halves = [slice(0, N * T // 2), slice(N * T // 2, N * T)]
    mine = [torch.cat((torch.bincount(idx[h].reshape(-1), minlength=E).float(), torch.tensor([N * T / 2.0])))
            for h in halves]  # fmt: skip
    losses = []
    for r, h in enumerate(halves):
        ctx = RoutingContext(training=True, seq_len=T, microbatch_size=1, whole_step=True,
                             group=FakeGroup(r, mine[1 - r]))  # fmt: skip
        losses.append(make("global", E, k).losses(probs[h], None, idx[h], ctx)["lbl"])
    torch.testing.assert_close((losses[0] + losses[1]) / 2, want)


def test_global_scope_carried_uses_the_previous_steps_whole_step_f():
    torch.manual_seed(1)
    E, k, T, N = 8, 2, 16, 4
    lbl = make("global", E, k)
    steps = [torch.randn(N * T, E).softmax(-1) for _ in range(2)]
    idxs = [p.topk(k, -1).indices for p in steps]
    for step, (p, idx) in enumerate(zip(steps, idxs)):  # each step in N forwards of one micro-batch
        for mb in range(N):
            rows = slice(mb * T, (mb + 1) * T)
            ctx = RoutingContext(training=True, seq_len=T, step=step, microbatch=mb)
            loss = lbl.losses(p[rows], None, idx[rows], ctx)["lbl"]
            if step == 1:  # f of the whole previous step, P of this forward
                f0 = torch.bincount(idxs[0].reshape(-1), minlength=E).float() / (N * T * k)
                torch.testing.assert_close(loss, E * (f0 * p[rows].mean(0)).sum())
            if mb == N - 1:  # a re-run of the same forward (activation recomputation) is not counted twice
                lbl.losses(p[rows], None, idx[rows], ctx)
        lbl.after_optimizer_step()
        f_step = torch.bincount(idx.reshape(-1), minlength=E).float() / (N * T * k)
        torch.testing.assert_close(lbl.carried_f_E, f_step)
        assert lbl.step_counts_E.sum().item() == 0


def test_microbatch_scope_in_a_forward_of_several_micro_batches_is_their_mean():
    torch.manual_seed(2)
    E, k, T, N = 8, 2, 16, 3
    probs = torch.randn(N * T, E).softmax(-1)
    idx = probs.topk(k, -1).indices
    each = [make("microbatch", E, k).losses(probs[i * T : (i + 1) * T], None, idx[i * T : (i + 1) * T],
                                            RoutingContext(training=True, seq_len=T))["lbl"] for i in range(N)]  # fmt: skip
    together = make("microbatch", E, k).losses(probs, None, idx, RoutingContext(training=True, seq_len=T,
                                                                                 microbatch_size=1))["lbl"]  # fmt: skip
    torch.testing.assert_close(together, torch.stack(each).mean())


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
