"""Routers: each one's defining property on small inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import build_router, load_all
from moe_testbed.routing.routers.hash import greedy_hash_table
from moe_testbed.routing.routers.sequence_level import prefix_mean

from .toy import VOCAB, batch, make_cfg, make_info, make_model, train

load_all()


def router_for(name, method="none", scope="microbatch", info_cfg=None, **dotted):
    cfg = make_cfg(name, method, scope, **dotted)
    torch.manual_seed(0)
    return build_router(cfg, 0, 0, make_info(info_cfg or cfg)), cfg


def ctx(training=True, S=8, **kw):
    return RoutingContext(training=training, seq_len=S, **kw)


def x_for(cfg, T=16, seed=0):
    return torch.randn(T, cfg.model.d_model, generator=torch.Generator().manual_seed(seed))


def test_softmax_topk_gates_are_renormalised_probs():
    router, cfg = router_for("softmax_topk")
    x = x_for(cfg)
    dec = router(x, ctx())
    probs = torch.softmax(x @ router.weight.T, -1)
    assert torch.equal(dec.idx_TK.sort(-1).values, probs.topk(2).indices.sort(-1).values)
    want = probs.gather(1, dec.idx_TK)
    torch.testing.assert_close(dec.gate_TK, want / want.sum(-1, keepdim=True))
    router.cfg.renormalize = False
    torch.testing.assert_close(router(x, ctx()).gate_TK, want)


def test_sigmoid_topk_scores_and_normalised_gates():
    router, cfg = router_for("sigmoid_topk", "lbl")
    x = x_for(cfg)
    dec = router(x, ctx())
    s = torch.sigmoid(x @ router.weight.T)
    torch.testing.assert_close(dec.probs_TE, s)
    assert torch.equal(dec.idx_TK.sort(-1).values, s.topk(2).indices.sort(-1).values)
    g = s.gather(1, dec.idx_TK)
    torch.testing.assert_close(dec.gate_TK, g / g.sum(-1, keepdim=True))
    torch.testing.assert_close(router.balance_probs(s).sum(-1), torch.ones(16))


def test_noisy_topk_noise_only_in_training():
    router, cfg = router_for("noisy_topk")
    x = x_for(cfg)
    clean = torch.softmax(x @ router.weight.T, -1)
    torch.testing.assert_close(router(x, ctx(training=False)).probs_TE, clean)
    torch.manual_seed(1)
    noisy = router(x, ctx()).probs_TE
    assert not torch.allclose(noisy, clean)
    # The noise scale is learned: W_noise receives a gradient.
    noisy.square().sum().backward()
    assert router.noise_weight.grad is not None and router.noise_weight.grad.abs().sum() > 0


def test_expert_choice_each_expert_takes_its_capacity_per_unit():
    for scope, unit in [("sequence", 8), ("microbatch", 16)]:
        router, cfg = router_for("expert_choice", scope=scope, **{"routing.seq_capacity": 1.0})
        x = x_for(cfg)
        dec = router(x, ctx(S=8))
        E, k = 4, 2
        assert dec.idx_TK.shape == (16, E) and not dec.unkept_are_drops
        assert torch.equal(dec.idx_TK, torch.arange(E).expand(16, E))
        cap = math.ceil(unit * k / E)
        keep = dec.keep_TK.view(-1, unit, E)
        assert (keep.sum(1) == cap).all()
        # Each expert holds exactly its highest-affinity tokens.
        probs = dec.probs_TE.view(-1, unit, E)
        for u in range(keep.shape[0]):
            for e in range(E):
                assert set(probs[u, :, e].topk(cap).indices.tolist()) == set(keep[u, :, e].nonzero().view(-1).tolist())
    assert router_for("expert_choice")[0].causal is False


def test_expert_choice_through_the_model_counts_no_drops():
    from moe_testbed.routing.recorder import RoutingRecorder

    cfg = make_cfg("expert_choice", "none", "microbatch")
    model = make_model(cfg)
    rec = RoutingRecorder(2, 4, 2)
    ids, _, dom = batch(0)
    model(ids, RoutingContext(training=True, seq_len=8, domain_ids_T=dom, recorder=rec))
    t = rec.tables()
    assert t.drops.sum() == 0  # unchosen (token, expert) pairs are not drops
    assert t.tokens.sum() == 2 * (dom >= 0).sum()  # two MoE layers, padding not counted
    # Each expert takes ceil(16 * 2 / 4) = 8 tokens of the micro-batch; padding tokens are not counted.
    assert 0 < t.counts.sum() <= 2 * 4 * 8


def test_hash_table_hand_example_and_balance():
    # Frequencies 10, 6, 4, 3, 1 on two experts, k=1: 10->e0, 6->e1, 4->e1 (6 < 10), 3->e0 (tie 10:10 ->
    # lower id), 1->e1 (10 < 13).
    table = greedy_hash_table(np.array([10.0, 6.0, 4.0, 3.0, 1.0]), 2, 1)
    assert table[:, 0].tolist() == [0, 1, 1, 0, 1]
    rng = np.random.default_rng(0)
    freq = rng.zipf(1.5, size=500).astype(float)
    for k in (1, 2, 3):
        table = greedy_hash_table(freq, 8, k)
        assert all(len(set(row)) == k for row in table.tolist())  # k distinct experts
        load = np.zeros(8)
        np.add.at(load, table.reshape(-1), np.repeat(freq, k))
        assert load.max() - load.mean() <= freq.max() + 1e-9  # the greedy (LPT) bound


def test_hash_router_routes_by_token_id_with_constant_gates():
    router, cfg = router_for("hash")
    ids = torch.tensor([0, 5, 0, 63])
    dec = router(x_for(cfg, 4), ctx(S=4, token_ids_T=ids))
    assert torch.equal(dec.idx_TK[0], dec.idx_TK[2])
    assert torch.equal(dec.idx_TK, router.table_VK[ids])
    assert torch.equal(dec.gate_TK, torch.full((4, 2), 0.5))
    assert not list(router.parameters())
    # The most frequent token (id 0 in the toy table) got the least-loaded experts first: 0 and 1.
    assert sorted(router.table_VK[0].tolist()) == [0, 1]


def test_random_frozen_never_changes():
    cfg = make_cfg("random_frozen", "eb")
    model = make_model(cfg)
    before = [layer.router.weight.detach().clone() for layer in model.moe_layers]
    assert not any(layer.router.weight.requires_grad for layer in model.moe_layers)
    train(model, cfg, steps=3)
    for layer, w in zip(model.moe_layers, before):
        assert torch.equal(layer.router.weight, w)  # bitwise


def test_frozen_router_trains_then_freezes_and_stays_frozen_after_resume():
    cfg = make_cfg("frozen", "lbl", **{"routing.freeze_after": 2})
    model = make_model(cfg)
    w0 = model.moe_layers[0].router.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    from torch.nn.functional import cross_entropy

    snapshots = []
    for step in range(4):
        ids, tgt, dom = batch(step)
        out = model(ids, RoutingContext(training=True, seq_len=8, domain_ids_T=dom, step=step))
        (cross_entropy(out.logits.reshape(-1, VOCAB), tgt.reshape(-1)) + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_optimizer_step(step + 1)
        snapshots.append(model.moe_layers[0].router.weight.detach().clone())
    assert not torch.equal(snapshots[0], w0) and not torch.equal(snapshots[1], snapshots[0])  # learned for 2 steps
    assert torch.equal(snapshots[1], snapshots[2]) and torch.equal(snapshots[2], snapshots[3])  # then frozen
    assert model.moe_layers[0].router.frozen
    # A fresh model resumed at step 3 is frozen too.
    resumed = make_model(cfg)
    assert not resumed.moe_layers[0].router.frozen
    for layer in resumed.moe_layers:
        layer.router.sync_after_resume(3)
    assert all(layer.router.frozen for layer in resumed.moe_layers)


def test_random_per_step_redraws_and_is_a_function_of_seed_and_step():
    router, cfg = router_for("random_per_step")
    x = x_for(cfg)
    w0 = router.weight_at(0, x.device).clone()
    p0 = router(x, ctx()).probs_TE
    router.after_optimizer_step(1)
    p1 = router(x, ctx()).probs_TE
    assert not torch.allclose(p0, p1)
    assert torch.equal(router(x, ctx(training=False)).probs_TE, p1)  # evaluation uses the current step
    # A second router with the same seed buffer, resumed at step 1, routes identically.
    other, _ = router_for("random_per_step")
    other.load_state_dict({"seed": router.seed.clone() + 0})
    other.sync_after_resume(1)
    assert torch.equal(other(x, ctx()).probs_TE, p1)
    assert torch.equal(other.weight_at(0, x.device), w0)
    assert not list(router.parameters())


def test_prefix_mean():
    v = torch.tensor([[[1.0], [3.0], [5.0]]])
    torch.testing.assert_close(prefix_mean(v), torch.tensor([[[1.0], [2.0], [3.0]]]))


def test_sequence_level_prefix_does_not_see_later_tokens_through_the_model():
    cfg = make_cfg("sequence_level", "lbl")
    model = make_model(cfg).eval()
    captured = []
    for layer in model.moe_layers:
        layer.router.register_forward_hook(lambda m, i, o: captured.append(o.idx_TK.clone()))
    ids, _, dom = batch(0, B=2, S=8, pad=0)
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 7) % VOCAB
    with torch.no_grad():
        model(ids, RoutingContext(seq_len=8, domain_ids_T=dom))
        a = [c.view(2, 8, -1) for c in captured]
        captured.clear()
        model(changed, RoutingContext(seq_len=8, domain_ids_T=dom))
        b = [c.view(2, 8, -1) for c in captured]
    for x, y in zip(a, b):
        assert torch.equal(x[:, :5], y[:, :5])
    assert any(not torch.equal(x[:, 5:], y[:, 5:]) for x, y in zip(a, b))  # later tokens did change something


def test_sequence_level_routes_by_running_mean_of_logits():
    router, cfg = router_for("sequence_level")
    x = x_for(cfg)
    logits = (x @ router.weight.T).view(2, 8, 4)
    want = torch.softmax(logits.cumsum(1) / torch.arange(1, 9)[None, :, None], -1).view(16, 4)
    torch.testing.assert_close(router(x, ctx()).probs_TE, want)


def domains_T():
    return torch.tensor([0] * 8 + [1] * 5 + [-1] * 3)


@pytest.mark.parametrize("name, extra", [("reference", {}), ("reference", {"routing.inner": "learned"}),
                                         ("domain_guided", {})])  # fmt: skip
def test_domain_routers_send_every_token_to_its_group(name, extra):
    router, cfg = router_for(name, **extra)
    groups = make_info(cfg)["groups"]
    dom = domains_T()
    dec = router(x_for(cfg), ctx(domain_ids_T=dom))
    for t, d in enumerate(dom.tolist()):
        chosen = dec.idx_TK[t].tolist()
        assert len(set(chosen)) == 2
        if d >= 0:
            assert set(chosen) <= set(groups[d]), (t, d, chosen)
    with pytest.raises(ValueError, match="domain"):
        router(x_for(cfg), ctx())


def test_reference_uniform_is_round_robin_balanced_within_group():
    cfg = make_cfg("reference", **{"model.n_experts": 8})
    router = build_router(cfg, 0, 0, make_info(cfg))
    dom = torch.tensor([0] * 12 + [1] * 12)  # groups: [0..3] and [4..7]
    dec = router(torch.zeros(24, cfg.model.d_model), ctx(S=12, domain_ids_T=dom))
    load = torch.bincount(dec.idx_TK.reshape(-1), minlength=8)
    assert load.tolist() == [6] * 8
    assert dec.idx_TK[:2].tolist() == [[0, 1], [2, 3]]
    assert torch.equal(dec.gate_TK, torch.full((24, 2), 0.5))


def test_domain_guided_eb_bias_cannot_leave_the_group():
    router, cfg = router_for("domain_guided", "eb")
    router.balancer.bias_E.copy_(torch.tensor([100.0, 100.0, -100.0, -100.0]))
    dom = torch.tensor([1] * 16)  # group of domain 1: experts 2, 3
    dec = router(x_for(cfg), ctx(domain_ids_T=dom))
    assert (dec.idx_TK.sort(-1).values == torch.tensor([2, 3])).all()


def test_group_limited_routing_keeps_tokens_in_topk_groups():
    cfg = make_cfg("softmax_topk", **{"model.n_experts": 8, "routing.n_groups": 4, "routing.topk_groups": 1})
    assert cfg.validate() is None
    router = build_router(cfg, 0, 0, make_info(cfg))
    dec = router(x_for(cfg, 32), ctx())
    groups = dec.idx_TK // 2
    assert (groups[:, 0] == groups[:, 1]).all()  # both experts from the one chosen group
    probs = dec.probs_TE.view(32, 4, 2)
    best_group = probs.topk(2, -1).values.sum(-1).argmax(-1)
    assert torch.equal(groups[:, 0], best_group)


def test_domain_routers_reject_small_explicit_groups():
    from moe_testbed.routing.registry import combination_problem

    cfg = make_cfg("reference", **{"routing.groups": {"code": [0], "prose": [1, 2]}})
    assert "fewer than routing.top_k" in combination_problem(cfg)


def test_jitter_equals_transformers_switch_router_and_only_in_training():
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersTop1Router

    router, cfg = router_for("softmax_topk", **{"routing.jitter": 0.2})
    hf = SwitchTransformersTop1Router(SwitchTransformersConfig(
        d_model=cfg.model.d_model, num_experts=cfg.model.n_experts, router_jitter_noise=0.2, router_bias=False,
        expert_capacity=64,
    )).train()  # fmt: skip
    with torch.no_grad():
        hf.classifier.weight.copy_(router.weight)
    x = x_for(cfg)
    torch.manual_seed(7)
    ours = router.score(x, ctx())
    torch.manual_seed(7)
    _, _, theirs = hf(x.clone()[None])  # the same uniform draw on the router's input, then the classifier
    torch.testing.assert_close(ours, theirs[0], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ours, x @ router.weight.T)  # jitter moved the logits
    assert torch.equal(router.score(x, ctx(training=False)), torch.nn.functional.linear(x, router.weight))


def test_jitter_is_refused_where_no_router_input_is_learned():
    from moe_testbed.config import ConfigError
    from moe_testbed.routing.registry import check_combination

    with pytest.raises(ConfigError, match=r"routing.jitter=0.1 perturbs a learned router's input.*routing.jitter=0"):
        check_combination(make_cfg("hash", **{"routing.jitter": 0.1}))
