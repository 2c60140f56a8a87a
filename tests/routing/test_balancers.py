"""Balancing methods: EB, SH, BA and z-loss on small inputs and against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from moe_testbed.routing.balancer import z_loss
from moe_testbed.routing.balancing.ba import BalancedAssignment
from moe_testbed.routing.balancing.eb import ExpertBias
from moe_testbed.routing.balancing.sh import SinkhornBalancing
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import BALANCERS, build_router, load_all

from .toy import make_cfg, make_info, make_model, train

load_all()


class FakeGroup:
    """Rank ``rank`` of two, whose peer's tensors are given: all-reduce adds them, all-gather concatenates."""

    world_size = 2

    def __init__(self, rank: int, peer_gather=None, peer_sum=None):
        self.rank, self.peer_gather, self.peer_sum = rank, peer_gather, peer_sum

    def all_reduce_sum(self, t):
        return t + (self.peer_sum if self.peer_sum is not None else t)

    def all_gather_cat(self, t):
        parts = [t, self.peer_gather] if self.rank == 0 else [self.peer_gather, t]
        return torch.cat(parts)


def balancer(method, scope="microbatch", E=4, k=2, **bal):
    cfg = make_cfg("softmax_topk", method, scope, **{f"balance.{k_}": v for k_, v in bal.items()})
    return BALANCERS[method](E, k, cfg.balance, layer=0)


def ctx(training=True, S=8, **kw):
    """One forward holding the whole step (exact global scope) unless told otherwise."""
    return RoutingContext(training=training, seq_len=S, **{"whole_step": True, **kw})


# -- z-loss ---------------------------------------------------------------------------


def test_z_loss_hand_example_and_padding():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp = log 2, log 4
    want = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(want)
    assert z_loss(logits, torch.tensor([1.0, 0.0])).item() == pytest.approx(math.log(2) ** 2)
    b = balancer("none", z_loss=0.5)
    out = b.losses(logits.softmax(-1), logits, logits.topk(1).indices, ctx(S=2))
    assert out["z"].item() == pytest.approx(0.5 * want)


@pytest.mark.parametrize("method", sorted(BALANCERS))
def test_z_loss_combines_with_every_method(method):
    torch.manual_seed(0)
    logits = torch.randn(8, 4)
    b = balancer(method, z_loss=0.1)
    out = b.losses(logits.softmax(-1), logits, logits.topk(2).indices, ctx())
    assert out["z"].item() == pytest.approx(0.1 * z_loss(logits).item())


def test_sequence_wise_loss_hand_example():
    # two sequences of 2 tokens, E = 2, k = 1. Sequence 0: both tokens to expert 0, P = (0.75, 0.25):
    # f = (1, 0), E * sum f P = 2 * 0.75 = 1.5. Sequence 1: one each, P = (0.5, 0.5): 2 * 0.5 = 1.
    probs = torch.tensor([[0.8, 0.2], [0.7, 0.3], [0.9, 0.1], [0.1, 0.9]])
    idx = torch.tensor([[0], [0], [0], [1]])
    b = balancer("eb", E=2, k=1, seq_aux_coeff=0.1)
    assert b.losses(probs, None, idx, ctx(S=2))["seq_aux"].item() == pytest.approx(0.1 * (1.5 + 1.0) / 2)


@pytest.mark.parametrize("method", sorted(BALANCERS))
def test_sequence_wise_loss_combines_with_every_method_as_lbl_at_sequence_scope(method):
    torch.manual_seed(0)
    logits = torch.randn(16, 4)
    probs, idx = logits.softmax(-1), logits.topk(2).indices
    lbl = balancer("lbl", "sequence", coeff=1e-3).losses(probs, logits, idx, ctx(S=4))["lbl"]
    out = balancer(method, seq_aux_coeff=1e-3).losses(probs, logits, idx, ctx(S=4))
    assert out["seq_aux"].item() == pytest.approx(lbl.item())
    assert "seq_aux" not in balancer(method).losses(probs, logits, idx, ctx(S=4))  # off by default


def test_the_sequence_wise_loss_needs_a_learned_router():
    from moe_testbed.config import ConfigError
    from moe_testbed.routing.registry import check_combination

    with pytest.raises(ConfigError, match=r"balance.seq_aux_coeff=0.001 needs a router whose scores are trained"):
        check_combination(make_cfg("hash", "none", **{"balance.seq_aux_coeff": 1e-3}))


# -- EB ---------------------------------------------------------------------------------


def eb_loop(eb, probs_TE, steps, S=None):
    S = S or probs_TE.shape[0]
    loads = []
    for step in range(steps):
        idx = eb.selection_scores(probs_TE, ctx(S=S)).topk(eb.top_k, -1).indices
        eb.observe(idx, None, ctx(S=S, step=step))
        eb.after_optimizer_step()
        loads.append(torch.bincount(idx.reshape(-1), minlength=eb.n_experts).float())
    return loads


def test_eb_moves_a_skewed_load_toward_uniform():
    torch.manual_seed(0)
    T, E, k = 256, 8, 2
    logits = torch.randn(T, E)
    logits[:, 0] += 2.0  # expert 0 is everybody's favourite
    probs = logits.softmax(-1)
    eb = balancer("eb", E=E, k=k, eb_rate=0.01)
    loads = eb_loop(eb, probs, 300)
    spread = [(load.max() - load.min()).item() for load in loads]
    assert spread[-1] < 0.25 * spread[0]
    assert eb.bias_E[0] < 0 and eb.bias_E.sum().abs() < 1e-5  # favourite pushed down, bias centred


def test_eb_update_is_sign_of_load_error_and_recentred():
    eb = balancer("eb", E=4, k=1, eb_rate=0.1)
    idx = torch.tensor([[0], [0], [0], [1]])  # loads 3, 1, 0, 0; mean 1
    eb.observe(idx, None, ctx(S=4))
    eb.after_optimizer_step()
    raw = 0.1 * torch.tensor([-1.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(eb.bias_E, raw - raw.mean())


def test_eb_sequence_scope_averages_per_sequence_signs():
    eb = balancer("eb", "sequence", E=2, k=1, eb_rate=1.0)
    # Three sequences of 2 tokens: loads (2,0), (2,0), (0,2): signs (-1,+1), (-1,+1), (+1,-1); mean (-1/3, 1/3).
    idx = torch.tensor([[0], [0], [0], [0], [1], [1]])
    eb.observe(idx, None, ctx(S=2))
    eb.after_optimizer_step()
    torch.testing.assert_close(eb.bias_E, torch.tensor([-1 / 3, 1 / 3]))
    # Global scope sums the counts instead: (4, 2) -> signs (-1, +1).
    eg = balancer("eb", "global", E=2, k=1, eb_rate=1.0)
    eg.observe(idx, None, ctx(S=2))
    eg.after_optimizer_step()
    torch.testing.assert_close(eg.bias_E, torch.tensor([-1.0, 1.0]))


def test_eb_microbatch_scope_averages_over_the_steps_microbatches():
    eb = balancer("eb", "microbatch", E=2, k=1, eb_rate=1.0)
    eb.observe(torch.tensor([[0], [0], [0]]), None, ctx(S=3, microbatch=0))  # signs (-1, +1)
    eb.observe(torch.tensor([[1], [1], [0]]), None, ctx(S=3, microbatch=1))  # signs (+1, -1)
    eb.observe(torch.tensor([[0], [0], [1]]), None, ctx(S=3, microbatch=2))  # signs (-1, +1)
    eb.after_optimizer_step()
    torch.testing.assert_close(eb.bias_E, torch.tensor([-1 / 3, 1 / 3]))


def test_eb_global_scope_spans_microbatches_and_ranks():
    eb = balancer("eb", "global", E=2, k=1, eb_rate=1.0)
    eb.observe(torch.tensor([[0], [0]]), None, ctx(S=2, microbatch=0, group=FakeGroup(0)))
    eb.observe(torch.tensor([[1], [0]]), None, ctx(S=2, microbatch=1, group=FakeGroup(0)))
    # This rank counted (3, 1); the peer rank counted (0, 5) (+ its token count): total (3, 6).
    eb._group = FakeGroup(0, peer_sum=torch.tensor([0.0, 5.0, 5.0]))
    eb.after_optimizer_step()
    torch.testing.assert_close(eb.bias_E, torch.tensor([1.0, -1.0]))


def test_eb_state_is_saved_but_step_buffers_are_not():
    eb = balancer("eb")
    assert set(eb.state_dict()) == {"bias_E"}


def test_eb_bias_changes_selection_not_gates():
    cfg = make_cfg("softmax_topk", "eb")
    router = build_router(cfg, 0, 0, make_info(cfg))
    router.balancer.bias_E.copy_(torch.tensor([-5.0, -5.0, 5.0, 5.0]))  # forces experts 2, 3
    torch.manual_seed(0)
    x = torch.randn(6, cfg.model.d_model)
    dec = router(x, ctx(S=6))
    assert (dec.idx_TK.sort(-1).values == torch.tensor([2, 3])).all()
    probs = torch.softmax(x @ router.weight.T, -1)
    want = probs.gather(1, dec.idx_TK)
    torch.testing.assert_close(dec.gate_TK, want / want.sum(-1, keepdim=True))


# -- SH -------------------------------------------------------------------------------------


def test_sh_balances_a_skewed_microbatch_in_training_only():
    torch.manual_seed(0)
    T, E, k = 256, 8, 2
    logits = torch.randn(T, E)
    logits[:, 0] += 3.0
    probs = logits.softmax(-1)
    sh = balancer("sh", E=E, k=k, sinkhorn_iters=50)
    idx = sh.select(sh.selection_scores(probs, ctx(S=T)), k, ctx(S=T))
    load = torch.bincount(idx.reshape(-1), minlength=E).float()
    greedy = torch.bincount(probs.topk(k, -1).indices.reshape(-1), minlength=E).float()
    assert load.max() - load.min() < 0.2 * (greedy.max() - greedy.min())
    # Evaluation: plain top-k of the router's probs.
    torch.testing.assert_close(sh.selection_scores(probs, ctx(training=False)), probs)


def test_sh_sequence_scope_solves_each_sequence():
    torch.manual_seed(1)
    S, B, E = 16, 3, 4
    probs = torch.randn(B * S, E).softmax(-1)
    sh = balancer("sh", "sequence", E=E, sinkhorn_iters=30)
    plan = sh.selection_scores(probs, ctx(S=S)).exp().view(B, S, E)
    torch.testing.assert_close(plan.sum(1), torch.full((B, E), 1 / E), atol=1e-5, rtol=0)


def test_sh_global_scope_balances_the_whole_step_of_every_rank():
    # Each of two ranks forwards its two micro-batches (its whole share of the step): the plan is
    # the one over all four micro-batches in the step's order (0, 1, 2, 3 = rank 0, 1, 0, 1).
    torch.manual_seed(4)
    T, E, n = 6, 4, 2
    mb = [torch.randn(T, E).softmax(-1) for _ in range(4)]  # the step's micro-batches
    sh = balancer("sh", "global", E=E)
    step_ctx = dict(S=T, microbatch_size=1)
    whole = sh.selection_scores(torch.cat(mb), ctx(**step_ctx))
    torch.testing.assert_close(whole.exp().sum(0), torch.full((E,), 1 / E), atol=1e-5, rtol=0)  # step-wide marginals
    ranks = [torch.cat([mb[0], mb[2]]), torch.cat([mb[1], mb[3]])]
    for r in range(2):
        group = FakeGroup(r, peer_gather=ranks[1 - r].log())
        got = sh.selection_scores(ranks[r], ctx(**step_ctx, group=group))
        torch.testing.assert_close(got, torch.cat([whole[(2 * b + r) * T : (2 * b + r + 1) * T] for b in range(n)]))


def test_sh_global_scope_solves_over_every_ranks_microbatch():
    torch.manual_seed(2)
    T, E = 8, 4
    mine, peer = torch.randn(T, E).softmax(-1), torch.randn(T, E).softmax(-1)
    sh = balancer("sh", "global", E=E)
    together = sh.selection_scores(torch.cat([peer, mine]), ctx(S=4))
    got = sh.selection_scores(mine, ctx(S=4, group=FakeGroup(1, peer_gather=peer.log())))
    torch.testing.assert_close(got, together[T:])


# -- BA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["sequence", "microbatch", "global"])
def test_ba_gives_every_expert_its_capacity_per_scope_unit(scope):
    torch.manual_seed(0)
    S, B, E, k = 16, 3, 4, 2
    logits = torch.randn(B * S, E)
    logits[:, 1] += 2.0
    ba = balancer("ba", scope, E=E, k=k)
    idx = ba.select(ba.selection_scores(logits.softmax(-1), ctx(S=S)), k, ctx(S=S))
    unit = S if scope == "sequence" else B * S
    for u in range(B * S // unit):
        load = torch.bincount(idx[u * unit : (u + 1) * unit].reshape(-1), minlength=E)
        assert (load == unit * k // E).all()
    # Evaluation: greedy top-k.
    probs = logits.softmax(-1)
    got = ba.select(ba.selection_scores(probs, ctx(training=False)), k, ctx(training=False))
    assert torch.equal(got.sort(-1).values, probs.topk(k, -1).indices.sort(-1).values)


def test_ba_global_scope_assigns_the_whole_step_of_every_rank():
    torch.manual_seed(5)
    T, E, k = 6, 4, 2
    mb = [torch.randn(T, E).log_softmax(-1) for _ in range(4)]
    mb[0][:, 1] += 3.0  # one micro-batch loves expert 1
    ba = balancer("ba", "global", E=E, k=k)
    step_ctx = dict(S=T, microbatch_size=1)
    whole = ba.select(torch.cat(mb), k, ctx(**step_ctx))
    assert torch.bincount(whole.reshape(-1), minlength=E).tolist() == [4 * T * k // E] * E  # over the step
    assert torch.bincount(whole[:T].reshape(-1), minlength=E)[1] > T * k // E  # not per micro-batch
    ranks = [torch.cat([mb[0], mb[2]]), torch.cat([mb[1], mb[3]])]
    for r in range(2):
        got = ba.select(ranks[r], k, ctx(**step_ctx, group=FakeGroup(r, peer_gather=ranks[1 - r])))
        want = torch.cat([whole[(2 * b + r) * T : (2 * b + r + 1) * T] for b in range(2)])
        assert torch.equal(got, want)


def test_ba_global_scope_solves_over_every_ranks_microbatch():
    torch.manual_seed(3)
    T, E, k = 8, 4, 1
    mine, peer = torch.randn(T, E).log_softmax(-1), torch.randn(T, E).log_softmax(-1)
    ba = balancer("ba", "global", E=E, k=k)
    together = ba.select(torch.cat([mine, peer]), k, ctx(S=4))
    got = ba.select(mine, k, ctx(S=4, group=FakeGroup(0, peer_gather=peer)))
    assert torch.equal(got, together[:T])
    assert torch.bincount(together.reshape(-1), minlength=E).tolist() == [4, 4, 4, 4]


def test_none_is_plain_top_k_of_the_probs_and_adds_no_loss():
    torch.manual_seed(3)
    probs = torch.randn(8, 4).softmax(-1)
    b = balancer("none")
    sel = b.selection_scores(probs, ctx())
    assert torch.equal(sel, probs)
    idx = b.select(sel, 2, ctx())
    assert torch.equal(idx.sort(-1).values, probs.topk(2).indices.sort(-1).values)
    assert b.losses(probs, probs.log(), idx, ctx()) == {}  # z_loss = 0: nothing at all


def test_balancer_classes():
    assert isinstance(balancer("eb"), ExpertBias)
    assert isinstance(balancer("sh"), SinkhornBalancing)
    assert isinstance(balancer("ba"), BalancedAssignment)


# -- through the model -----------------------------------------------------------------------


def test_eb_trains_through_the_model_and_bias_moves():
    cfg = make_cfg("sigmoid_topk", "eb", "global", **{"balance.eb_rate": 0.05})
    model = make_model(cfg)
    train(model, cfg, steps=3)
    bias = model.moe_layers[0].router.balancer.bias_E
    assert bias.abs().sum() > 0 and bias.sum().abs() < 1e-5
