"""analysis/token_routing.py and routing/trace.py: token-level analyses on hand-made traces with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_testbed.analysis.token_routing import (
    TOKEN_CLASSES,
    analyse,
    co_activation,
    co_activation_summary,
    gate_statistics,
    layer_consistency,
    router_saturation,
    syntax_or_topic,
    token_class,
    vocabulary_specialization,
)
from moe_testbed.routing.decision import RoutingDecision
from moe_testbed.routing.trace import RoutingTrace, Trace, load_trace, save_trace


def make_trace(experts, tokens, domains, gates=None, kept=None, n_experts=None, domain_names=None) -> Trace:
    experts = np.asarray(experts)  # [L, N, K]
    L, N, K = experts.shape
    gates = np.ones((L, N, K)) / K if gates is None else np.asarray(gates, dtype=float)
    kept = np.ones((L, N, K), bool) if kept is None else np.asarray(kept)
    E = n_experts or int(experts.max()) + 1
    names = domain_names or [f"d{i}" for i in range(max(domains) + 1)]
    return Trace(
        seq=np.zeros(N, np.int32),
        pos=np.arange(N),
        token=np.asarray(tokens),
        domain=np.asarray(domains),
        experts=experts,
        gates=gates,
        kept=kept,
        entropy=np.zeros((L, N)),
        margin=np.zeros((L, N)),
        meta={"layers": [f"layer{i}" for i in range(L)], "domains": names, "top_k": K, "n_experts": E},
    )


@pytest.mark.parametrize("text, cls", [(" ", "whitespace"), ("\n\t", "whitespace"), (",", "punctuation"),
                                       (" ()", "punctuation"), ("+=", "punctuation"), ("123", "digits"),
                                       (" hello", "word"), ("héllo", "word"), ("foo_bar", "identifier"),
                                       ("x1", "identifier"), ("\ufffd", "other"), ("a-b", "other")])  # fmt: skip
def test_token_classes(text, cls):
    assert token_class(text) == cls


CLASS_V = np.array([TOKEN_CLASSES.index(c) for c in ["other"] * 5 + ["word", "digits", "digits"]])


def test_routing_by_token_class_and_not_by_domain_reads_as_syntax():
    # expert 0 takes the word (token 5) in both domains, expert 1 the digits (tokens 6, 7) in both
    trace = make_trace([[[0], [0], [1], [1]]], tokens=[5, 5, 6, 7], domains=[0, 1, 0, 1])
    (row,) = syntax_or_topic(trace, CLASS_V)
    assert row["nmi_class"] == pytest.approx(1.0) and row["purity_class"] == 1.0
    assert row["nmi_domain"] == 0.0 and row["purity_domain"] == 0.5
    swapped = make_trace([[[0], [1], [0], [1]]], tokens=[5, 5, 6, 7], domains=[0, 1, 0, 1])  # by domain instead
    (row,) = syntax_or_topic(swapped, CLASS_V)
    assert row["nmi_domain"] == pytest.approx(1.0) and row["nmi_class"] < 0.5


def test_vocabulary_specialization_on_a_hand_trace():
    trace = make_trace([[[0], [0], [1], [1]]], tokens=[5, 5, 6, 7], domains=[0, 1, 0, 1])
    (row,) = vocabulary_specialization(trace, min_count=1, top=1)
    assert row["token_concentration"] == 1.0  # every id's slots on one expert
    assert row["expert_top_tokens"] == pytest.approx((2 / 2 + 1 / 2) / 2)  # expert 1 splits over ids 6 and 7
    split = make_trace([[[0], [1], [1], [1]]], tokens=[5, 5, 6, 7], domains=[0, 1, 0, 1])
    (row,) = vocabulary_specialization(split, min_count=2)
    assert row["token_concentration"] == 0.5  # only id 5 has 2 slots, half on each expert


def test_co_activation_counts_every_pair_of_a_tokens_experts():
    trace = make_trace([[[0, 1], [1, 0], [0, 2]]], tokens=[1, 2, 3], domains=[0, 0, 0])
    P = co_activation(trace, 0)
    assert (
        P[0].tolist() == pytest.approx([0, 2 / 3, 1 / 3]) and P[1].tolist() == [1, 0, 0] and P[2].tolist() == [1, 0, 0]
    )
    assert co_activation_summary(trace)[0]["top_partner_share"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    dropped = make_trace([[[0, 1], [1, 0], [0, 2]]], tokens=[1, 2, 3], domains=[0, 0, 0],
                         kept=[[[True, True], [True, True], [True, False]]])  # fmt: skip
    assert co_activation(dropped, 0)[0].tolist() == pytest.approx([0, 2 / 3, 0])  # a dropped slot pairs with nobody


def test_layer_consistency_from_a_permutation_and_from_independence():
    permuted = make_trace([[[0], [0], [1], [1]], [[1], [1], [0], [0]]], tokens=[1, 2, 3, 4], domains=[0, 0, 0, 0])
    (pair,) = layer_consistency(permuted)
    assert pair["nmi"] == pytest.approx(1.0) and pair["predictability"] == 1.0
    independent = make_trace([[[0], [0], [1], [1]], [[0], [1], [0], [1]]], tokens=[1, 2, 3, 4], domains=[0] * 4)
    (pair,) = layer_consistency(independent)
    assert pair["nmi"] == 0.0 and pair["predictability"] == 0.5


def test_the_first_expert_is_the_highest_kept_gate():
    experts = [[[0, 1], [0, 1]], [[2, 3], [2, 3]]]
    gates = [[[0.3, 0.7], [0.3, 0.7]], [[0.9, 0.1], [0.9, 0.1]]]
    kept = [[[True, False], [True, True]], [[True, True], [True, True]]]  # token 0's best slot was dropped
    trace = make_trace(experts, tokens=[1, 2], domains=[0, 0], gates=gates, kept=kept, n_experts=4)
    (pair,) = layer_consistency(trace)
    assert pair["predictability"] == 1.0  # first experts 0 then 1 at layer 0, both 2 at layer 1


def test_a_trace_round_trips_through_parquet(tmp_path):
    rec = RoutingTrace(n_layers=2, top_k=2, budget=5)
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    dom = torch.tensor([[0, 0, 0], [1, 1, -1]])  # the last token is padding: not traced
    rec.begin(ids, dom, first_seq=10)
    probs = torch.tensor([[0.5, 0.3, 0.2]] * 6)
    for layer in range(2):
        idx = torch.tensor([[0, 1]] * 6) + layer
        dec = RoutingDecision(idx_TK=idx % 3, gate_TK=torch.full((6, 2), 0.5), probs_TE=probs,
                              keep_TK=torch.tensor([[True, layer == 0]] * 6))  # fmt: skip
        rec.record(layer, dec)
    rec.begin(ids, dom, first_seq=12)  # beyond the budget of 5 real tokens: nothing more
    rec.record(0, dec)
    save_trace(tmp_path / "t.parquet", rec.table(["a", "b"], ["x", "y"], {"n_experts": 3}))
    t = load_trace(tmp_path / "t.parquet")
    assert t.token.tolist() == [3, 4, 5, 6, 7] and t.domain.tolist() == [0, 0, 0, 1, 1]
    assert t.seq.tolist() == [10, 10, 10, 11, 11] and t.pos.tolist() == [0, 1, 2, 0, 1]
    assert t.experts.shape == (2, 5, 2) and t.experts[1, 0].tolist() == [1, 2]
    assert t.kept[0].all() and not t.kept[1, :, 1].any()
    H = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert t.entropy[0].tolist() == pytest.approx([H] * 5) and t.margin[0].tolist() == pytest.approx([0.1] * 5)
    assert t.layers == ["a", "b"] and t.domains == ["x", "y"]
    assert gate_statistics(t)[0]["entropy"] == pytest.approx(H / math.log(3))
    out = analyse(t, np.zeros(9, dtype=np.int64))
    assert set(out) >= {"syntax_or_topic", "vocabulary", "co_activation", "gates", "layer_consistency"}


def test_router_saturation_is_the_share_of_the_final_top_k_already_chosen():
    early = make_trace([[[0, 1], [2, 3]]], tokens=[1, 2], domains=[0, 0], n_experts=4)
    late = make_trace([[[1, 0], [2, 0]]], tokens=[1, 2], domains=[0, 0], n_experts=4)
    early.meta["step"], late.meta["step"] = 10, 20
    first, last = router_saturation([early, late])
    assert first["step"] == 10 and first["mean"] == pytest.approx((2 / 2 + 1 / 2) / 2)  # {0,1}={1,0}; {2,3}~{2,0}
    assert last["mean"] == 1.0
    other = make_trace([[[0, 1], [2, 3]]], tokens=[5, 6], domains=[0, 0], n_experts=4)
    with pytest.raises(ValueError, match="the same tokens"):
        router_saturation([other, late])


def test_the_drilldown_marks_the_tokens_an_expert_takes(tmp_path):
    from moe_testbed.analysis.drilldown import write_drilldown

    # one sequence of 4 tokens: expert 0 takes tokens 1 and 3 (domain d0), expert 1 tokens 2 and 4
    trace = make_trace([[[0], [1], [0], [1]]], tokens=[1, 2, 3, 4], domains=[0, 0, 0, 0])
    page = write_drilldown(tmp_path / "d.html", trace, lambda ids: f"w{ids[0]} ", "t").read_text()
    assert "<h3>expert 0</h3>" in page and "<h3>expert 1</h3>" in page
    assert "2 tokens as first expert; domains: d0 100%" in page
    assert "[d0] <mark>w1 </mark>w2 <mark>w3 </mark>w4 " in page  # expert 0's snippet: its tokens marked
    assert "[d0] w1 <mark>w2 </mark>w3 <mark>w4 </mark>" in page
