"""Causal Soft MoE (routing/routers/soft_moe.py): prefix-mixed slots, combine weights, its counts and its rules."""

import pytest
import torch

from moe_testbed.errors import ConfigError
from moe_testbed.model.params import count_params
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.recorder import RoutingRecorder
from moe_testbed.routing.registry import check_combination
from tests.routing.toy import VOCAB, batch, make_cfg, make_model, train


def soft_cfg(**dotted):
    return make_cfg("soft_moe", "none", **{"routing.top_k": 1, **dotted})  # the tables count 1 expert a token


def naive_layer(layer, x_BSD):
    """The module docstring's formulas, one position and one expert at a time."""
    B, S, D = x_BSD.shape
    W, E = layer.router.weight.detach(), layer.router.n_experts
    out = torch.zeros_like(x_BSD)
    for b in range(B):
        logits_SE = x_BSD[b] @ W.T
        for t in range(S):
            c_E = logits_SE[t].softmax(-1)
            for e in range(E):
                w_J = logits_SE[: t + 1, e].softmax(0)  # the prefix only
                slot_D = (w_J[:, None] * x_BSD[b, : t + 1]).sum(0)
                y_D = layer.experts(slot_D[None], torch.tensor([[e]]), torch.ones(1, 1))[0]
                out[b, t] += c_E[e] * y_D
    return out


@torch.no_grad()
def test_the_layer_equals_the_formulas_of_the_docstring():
    model = make_model(soft_cfg())
    layer = model.moe_layers[0]
    x = torch.randn(2, 5, 16)
    got = layer(x, RoutingContext(seq_len=5))
    torch.testing.assert_close(got, naive_layer(layer, x), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_equal_logits_make_each_slot_the_mean_of_the_prefix():
    model = make_model(soft_cfg())
    layer = model.moe_layers[0]
    layer.router.weight.zero_()  # every logit 0: uniform dispatch over the prefix, combine 1/E
    x = torch.arange(4.0).repeat_interleave(16).view(1, 4, 16)  # x_t = t everywhere
    got = layer(x, RoutingContext(seq_len=4))
    E = layer.router.n_experts
    for t in range(4):
        slot = torch.full((1, 16), t / 2)  # mean of 0..t
        want = sum(layer.experts(slot, torch.tensor([[e]]), torch.ones(1, 1)) for e in range(E)) / E
        torch.testing.assert_close(got[0, t : t + 1], want, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_no_position_sees_a_later_token():
    model = make_model(soft_cfg()).eval()
    ids, _, _ = batch(0, B=2, S=8, pad=0)
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 7) % VOCAB
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3  # the change itself does show


@pytest.mark.parametrize("k", [1, 2])
def test_tables_count_each_token_at_its_largest_combine_weights_and_gate_mass_is_their_sum(k):
    model = make_model(soft_cfg(**{"routing.top_k": k})).eval()
    ids, _, dom = batch(1, B=2, S=8)
    rec = RoutingRecorder(2, 4, 2)
    with torch.no_grad():
        model(ids, RoutingContext(seq_len=8, domain_ids_T=dom, recorder=rec))
    tables = rec.tables()
    real = int((dom >= 0).sum())
    assert (tables.counts.sum((1, 2)) == k * real).all() and (tables.tokens.sum(1) == real).all()
    mean_gate = tables.gate_mass_sum.sum(1) / real
    assert ((mean_gate > k / 4 - 1e-9) & (mean_gate <= 1)).all()
    trace_x = []  # the counted experts are the largest combine weights of the layer's input
    hook = model.moe_layers[0].register_forward_pre_hook(lambda mod, args: trace_x.append(args[0]))
    rec = RoutingRecorder(2, 4, 2)
    with torch.no_grad():
        model(ids, RoutingContext(seq_len=8, domain_ids_T=dom, recorder=rec))
    hook.remove()
    logits = trace_x[0].reshape(-1, 16) @ model.moe_layers[0].router.weight.detach().T
    top = logits.softmax(-1).topk(k, dim=-1).indices[dom >= 0]
    want = torch.stack([torch.bincount(top[dom[dom >= 0] == d].flatten(), minlength=4) for d in range(2)], 1)
    assert (rec.tables().counts[0] == want.numpy()).all()


def test_it_trains_every_expert_counts_as_active_and_the_rules_refuse_what_does_not_apply():
    cfg = soft_cfg()
    model = make_model(cfg)
    ids, _, _ = batch(2, B=2, S=8, pad=0)
    model(ids).logits.square().mean().backward()
    for layer in model.moe_layers:  # the router learns through the dispatch and the combine weights
        assert layer.router.weight.grad.abs().sum() > 0
    model.zero_grad()
    assert all(torch.isfinite(torch.tensor(train(model, cfg, steps=2))))
    params = count_params(model)
    assert params["active"] == params["total"]  # every expert computes for every token
    for dotted, message in [({"balance.method": "lbl"}, "balance.method=lbl needs"),
                            ({"balance.method": "eb"}, "balance.method=eb needs"),
                            ({"balance.capacity_factor": 1.25}, "nothing is dropped"),
                            ({"balance.seq_aux_coeff": 0.001}, "set balance.seq_aux_coeff=0")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            check_combination(soft_cfg(**dotted))
    check_combination(soft_cfg(**{"balance.z_loss": 0.001, "routing.jitter": 0.01}))
