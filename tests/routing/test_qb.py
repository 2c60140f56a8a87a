"""Quantile balancing (routing/balancing/qb.py): the proposal on a hand example, the LP optimum (SciPy), scopes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from moe_testbed.routing.balancing.qb import column_quantile, margins
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import BALANCERS, load_all

from .toy import make_cfg, make_model, train

load_all()


def qb(E, k, scope="microbatch", ema=0.9):
    cfg = make_cfg("softmax_topk", "qb", scope, **{"model.n_experts": E, "routing.top_k": k, "balance.qb_ema": ema})
    return BALANCERS["qb"](E, k, cfg.balance, 0)


def forward(method, probs, step=0, microbatch=0, seq_len=None, microbatch_size=1, training=True):
    ctx = RoutingContext(training=training, seq_len=seq_len or probs.shape[0], step=step, microbatch=microbatch,
                         microbatch_size=microbatch_size)  # fmt: skip
    return method.selection_scores(probs, ctx)


HAND = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)


def test_the_proposal_is_each_experts_balanced_quantile_of_its_margins():
    # E = 2, k = 1: a token's threshold for one expert is its score for the other, so the margins are
    # log(p0 / p1) for expert 0 and their negatives for expert 1; c = 4 * 1 // 2 = 2 tokens an expert,
    # so each price is the 3rd largest margin: log 1.5 (0.6 / 0.4) and -log 4 (0.2 / 0.8).
    M = margins(HAND.log(), torch.zeros(2, dtype=torch.float64), 1)
    q = column_quantile(M[None], 1)[0]
    assert q.tolist() == pytest.approx([math.log(1.5), -math.log(4)])
    method = qb(2, 1, ema=0.9)
    sel = forward(method, HAND)
    assert torch.equal(sel, HAND.float().log())  # the first step routes by the zero prices (scores in fp32)
    method.after_optimizer_step()  # beta <- 0.9 * 0 + 0.1 * q, centred
    half = 0.1 * (math.log(1.5) + math.log(4)) / 2
    assert method.beta_E.tolist() == pytest.approx([half, -half])


def test_evaluation_routes_by_the_prices_and_moves_nothing():
    method = qb(2, 1)
    method.beta_E.copy_(torch.tensor([0.5, -0.5]))
    sel = forward(method, HAND.float(), training=False)
    assert torch.allclose(sel, HAND.float().log() - torch.tensor([0.5, -0.5]))
    method.after_optimizer_step()
    assert method.beta_E.tolist() == [0.5, -0.5]  # no training forward: no proposal, no move


def lp_optimum(S: np.ndarray, k: int) -> float:
    """max sum S x  s.t. every token k experts, every expert T*k/E tokens, 0 <= x <= 1 (SciPy HiGHS)."""
    T, E = S.shape
    rows = [np.kron(np.eye(T)[t], np.ones(E)) for t in range(T)] + [np.tile(np.eye(E)[e], T) for e in range(E)]
    res = linprog(-S.reshape(-1), A_eq=np.array(rows), b_eq=[k] * T + [T * k // E] * E, bounds=(0, 1),
                  method="highs")  # fmt: skip
    assert res.status == 0
    return -res.fun


@pytest.mark.parametrize("T, E, k, seed", [(12, 3, 1, 0), (8, 4, 2, 1), (24, 6, 2, 2), (64, 8, 2, 3)])
def test_iterated_on_fixed_scores_the_prices_reach_the_lp_optimum(T, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2 * torch.randn(T, E, generator=g, dtype=torch.float64), -1)
    method = qb(E, k, ema=0.5)
    for step in range(200):
        forward(method, probs, step=step)
        method.after_optimizer_step()
    sel = forward(method, probs, training=False)
    idx = sel.topk(k, -1).indices
    assert torch.bincount(idx.reshape(-1), minlength=E).tolist() == [T * k // E] * E  # exactly balanced
    S = probs.float().log().double()  # the method scores in fp32
    assert S.gather(1, idx).sum().item() == pytest.approx(lp_optimum(S.numpy(), k), abs=1e-4)


def test_the_literal_k_plus_1_threshold_stalls_unbalanced():
    # Every token's threshold = its (k+1)-th priced score, also for experts it does not hold (see qb.py).
    g = torch.Generator().manual_seed(0)
    S = torch.log_softmax(2 * torch.randn(12, 3, generator=g, dtype=torch.float64), -1)
    beta = torch.zeros(3, dtype=torch.float64)
    for _ in range(200):
        M = S - (S - beta).topk(2, dim=-1).values[:, -1:]
        beta = 0.5 * beta + 0.5 * column_quantile(M[None], 1)[0]
        beta -= beta.mean()
    loads = torch.bincount((S - beta).argmax(-1), minlength=3).tolist()
    assert loads != [4, 4, 4]


def test_microbatch_scope_averages_the_units_proposals_and_a_rerun_replaces_its_own():
    g = torch.Generator().manual_seed(4)
    a, b = (torch.softmax(torch.randn(8, 4, generator=g, dtype=torch.float64), -1) for _ in range(2))
    zero = torch.zeros(4, dtype=torch.float64)
    want = column_quantile(margins(a.log(), zero, 2)[None], 2) + column_quantile(margins(b.log(), zero, 2)[None], 2)
    method = qb(4, 2, ema=0.0)
    forward(method, a, microbatch=0)
    forward(method, b, microbatch=1)
    forward(method, b, microbatch=1)  # activation recomputation: the same micro-batch again
    method.after_optimizer_step()
    expect = (want[0] / 2).float()
    assert torch.allclose(method.beta_E, expect - expect.mean(), atol=1e-6)


def test_global_scope_proposes_from_the_whole_step_in_any_number_of_forwards():
    g = torch.Generator().manual_seed(5)
    step = torch.softmax(torch.randn(16, 4, generator=g, dtype=torch.float64), -1)
    whole, split = qb(4, 2, "global", ema=0.0), qb(4, 2, "global", ema=0.0)
    forward(whole, step, seq_len=4, microbatch_size=2)  # 2 micro-batches of 2 sequences of 4 tokens
    forward(split, step[:8], seq_len=4, microbatch_size=2, microbatch=0)
    forward(split, step[8:], seq_len=4, microbatch_size=2, microbatch=1)
    whole.after_optimizer_step()
    split.after_optimizer_step()
    q = column_quantile(margins(step.log().float(), torch.zeros(4), 2)[None], 2)[0]
    assert torch.allclose(whole.beta_E, q - q.mean()) and torch.equal(whole.beta_E, split.beta_E)


def test_quantile_balancing_trains_the_toy_model_toward_balance():
    cfg = make_cfg("softmax_topk", "qb", "microbatch", **{"balance.qb_ema": 0.5})
    model = make_model(cfg)
    losses = train(model, cfg, steps=6)
    assert all(math.isfinite(x) for x in losses)
    assert any(layer.router.balancer.beta_E.abs().sum() > 0 for layer in model.moe_layers)


def test_top_k_equal_to_the_experts_is_refused():
    from moe_testbed.config import ConfigError
    from moe_testbed.routing.registry import check_combination

    with pytest.raises(ConfigError, match=r"balance.method=qb needs routing.top_k < model.n_experts"):
        check_combination(make_cfg("softmax_topk", "qb", **{"model.n_experts": 2, "routing.top_k": 2}))
