"""Regression tests for the known traps listed in docs/routing.md ("Known traps and their regression tests"), one section each."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moe_testbed.routing.balancing.eb import ExpertBias
from moe_testbed.routing.balancing.lbl import LoadBalancingLoss
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.decision import RoutingDecision
from moe_testbed.routing.recorder import RoutingRecorder

from .toy import VOCAB, batch, evaluate, make_cfg, make_model, train


def forward_backward(model, step, mb, recompute: bool):
    ids, tgt, dom = batch(step * 10 + mb)
    if recompute:  # activation recomputation: every block's forward runs again during backward
        for block in model.blocks:
            if not hasattr(block, "_orig_forward"):
                block._orig_forward = block.forward
                block.forward = lambda *a, _f=block._orig_forward: checkpoint(_f, *a, use_reentrant=False)
    out = model(ids, RoutingContext(training=True, seq_len=8, domain_ids_T=dom, step=step, microbatch=mb))
    torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB), tgt.reshape(-1)).add(out.aux_loss).backward()
    return out


# -- trap 1: counts added twice under activation recomputation ------------------------------


@pytest.mark.parametrize("method, scope", [("lbl", "global"), ("eb", "global"), ("eb", "sequence")])
def test_recomputation_does_not_count_twice(method, scope):
    cfg = make_cfg("softmax_topk", method, scope)
    plain, recomputed = make_model(cfg), make_model(cfg)
    for mb in range(2):
        forward_backward(plain, 0, mb, recompute=False)
        forward_backward(recomputed, 0, mb, recompute=True)
    for a, b in zip(plain.moe_layers, recomputed.moe_layers):
        ba, bb = a.router.balancer, b.router.balancer
        if method == "lbl":  # carried global scope: the step's counts (and tokens) for the next step's f
            assert ba.step_counts_E.sum() > 0
            torch.testing.assert_close(ba.step_counts_E, bb.step_counts_E)
        else:
            torch.testing.assert_close(ba.acc_E, bb.acc_E)
            torch.testing.assert_close(ba.acc_n, bb.acc_n)
    # And the recorded routing statistics (the recorder is the trainer's business, counted once per forward).


# -- trap 2: evaluation forwards updating the expert bias --------------------------------------


@pytest.mark.parametrize("scope", ["sequence", "microbatch", "global"])
def test_evaluation_forwards_never_move_the_bias(scope):
    cfg = make_cfg("softmax_topk", "eb", scope, **{"balance.eb_rate": 0.1})
    model = make_model(cfg)
    train(model, cfg, steps=1)
    bias = [layer.router.balancer.bias_E.clone() for layer in model.moe_layers]
    for _ in range(3):
        evaluate(model, cfg)
    with torch.no_grad():  # even a forward in train mode with training=False in its context
        ids, _, dom = batch(5)
        model(ids, RoutingContext(training=False, seq_len=8, domain_ids_T=dom))
    for layer, b in zip(model.moe_layers, bias):
        eb = layer.router.balancer
        assert eb.acc_E.abs().sum() == 0 and eb.acc_n == 0
        eb.after_optimizer_step()  # nothing was observed: no move
        assert torch.equal(eb.bias_E, b)


def test_eb_observe_ignores_evaluation_contexts_directly():
    cfg = make_cfg("softmax_topk", "eb")
    eb = ExpertBias(4, 2, cfg.balance, 0)
    eb.observe(torch.tensor([[0, 1]] * 4), None, RoutingContext(training=False, seq_len=4))
    assert eb.acc_n == 0 and eb.acc_E.abs().sum() == 0


# -- trap 3: normalising accumulated counts by the current micro-batch's size ---------------


def test_global_lbl_normalises_by_the_accumulated_tokens():
    torch.manual_seed(0)
    E, k = 4, 2
    cfg = make_cfg("softmax_topk", "lbl", "global", **{"balance.coeff": 1.0})
    lbl = LoadBalancingLoss(E, k, cfg.balance, 0)
    sizes = [12, 4]  # unequal micro-batches make a wrong denominator visible
    probs = [torch.randn(T, E).softmax(-1) for T in sizes]
    idx = [p.topk(k, -1).indices for p in probs]
    for mb, (p, i) in enumerate(zip(probs, idx)):
        loss = lbl.losses(p, p.log(), i, RoutingContext(training=True, seq_len=sizes[mb], microbatch=mb))["lbl"]
    f_cat = torch.bincount(torch.cat(idx).reshape(-1), minlength=E).float() / (sum(sizes) * k)
    want = E * (f_cat * probs[-1].mean(0)).sum()
    torch.testing.assert_close(loss, want)
    wrong = E * (torch.bincount(torch.cat(idx).reshape(-1), minlength=E).float() / (sizes[-1] * k) * probs[-1].mean(0))
    assert not torch.allclose(loss, wrong.sum())


# -- trap 4: the bias leaking into gate weights -----------------------------------------------


def test_bias_never_enters_gates_through_the_model():
    cfg = make_cfg("softmax_topk", "eb")
    model = make_model(cfg)
    layer = model.moe_layers[0]
    layer.router.balancer.bias_E.copy_(torch.tensor([3.0, 3.0, -3.0, -3.0]))
    seen = {}
    layer.router.register_forward_hook(lambda m, i, o: seen.update(x=i[0], dec=o))
    ids, _, dom = batch(0)
    model(ids, RoutingContext(training=True, seq_len=8, domain_ids_T=dom))
    dec, x = seen["dec"], seen["x"]
    assert (dec.idx_TK.sort(-1).values == torch.tensor([0, 1])).all()
    probs = torch.softmax(x.float() @ layer.router.weight.T, -1)
    g = probs.gather(1, dec.idx_TK)
    torch.testing.assert_close(dec.gate_TK, g / g.sum(-1, keepdim=True))
    # The gradient reaches the router weight only through the unbiased probs.
    assert layer.router.balancer.bias_E.requires_grad is False


# -- trap 5: whether f is divided by k ---------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4])
def test_lbl_is_coeff_at_perfect_balance_for_any_k(k):
    E, T = 8, 16
    cfg = make_cfg("softmax_topk", "lbl", **{"balance.coeff": 0.01, "model.n_experts": E, "routing.top_k": k})
    lbl = LoadBalancingLoss(E, k, cfg.balance, 0)
    idx = (torch.arange(T)[:, None] * k + torch.arange(k)) % E  # every expert gets T*k/E slots
    probs = torch.full((T, E), 1.0 / E)
    out = lbl.losses(probs, probs.log(), idx, RoutingContext(training=True, seq_len=T))
    assert out["lbl"].item() == pytest.approx(0.01)  # f sums to 1 (divided by k): loss = coeff, not k * coeff


# -- trap 6: padding tokens counted ------------------------------------------------------------


def test_padding_is_not_counted_by_eb_or_the_recorder():
    cfg = make_cfg("softmax_topk", "eb", "global")
    eb = ExpertBias(4, 1, cfg.balance, 0)
    idx = torch.tensor([[0], [1], [2], [3], [0], [0], [0]])
    dom = torch.tensor([0, 0, 1, 1, -1, -1, -1])  # the padding all went to expert 0
    ctx = RoutingContext(training=True, seq_len=7, domain_ids_T=dom)
    eb.observe(idx, None, ctx)
    torch.testing.assert_close(eb.acc_E, torch.ones(4))  # balanced without the padding
    rec = RoutingRecorder(1, 4, 2)
    rec.record(0, RoutingDecision(idx, torch.ones(7, 1)), ctx.domains_or(0), ctx.valid_T)
    t = rec.tables()
    assert t.counts.sum() == 4 and t.tokens.sum() == 4


def test_reference_padding_tokens_are_routed_but_not_counted():
    cfg = make_cfg("reference")
    model = make_model(cfg)
    rec = RoutingRecorder(2, 4, 2)
    ids, _, dom = batch(0, pad=3)
    model(ids, RoutingContext(training=True, seq_len=8, domain_ids_T=dom, recorder=rec))
    t = rec.tables()
    assert t.tokens.sum() == 2 * (dom >= 0).sum()
    assert t.counts.sum() == 2 * 2 * (dom >= 0).sum()
