"""Sinkhorn scaling and the balanced-assignment auction against exact solvers (SciPy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment, linprog

from moe_testbed.routing.assignment import balanced_assignment, unit_capacities
from moe_testbed.routing.sinkhorn import sinkhorn_log


def lp_optimum(a_TE: np.ndarray, k: int, cap_E: np.ndarray) -> float:
    """Exact optimum of max sum a*x, row sums k, column sums cap, 0 <= x <= 1 (integral: the LP is totally unimodular)."""
    T, E = a_TE.shape
    A_eq = np.zeros((T + E, T * E))
    for t in range(T):
        A_eq[t, t * E : (t + 1) * E] = 1
    for e in range(E):
        A_eq[T + e, e::E] = 1
    res = linprog(-a_TE.reshape(-1), A_eq=A_eq, b_eq=np.concatenate([np.full(T, k), cap_E]), bounds=(0, 1))
    assert res.status == 0
    return -res.fun


def lsa_optimum(a_TE: np.ndarray, cap_E: np.ndarray) -> float:
    """k = 1: SciPy's linear_sum_assignment with every expert replicated into cap_e slot columns."""
    cols = np.repeat(np.arange(a_TE.shape[1]), cap_E)
    rows, picked = linear_sum_assignment(a_TE[:, cols], maximize=True)
    return float(a_TE[rows, cols[picked]].sum())


def solve(a_TE: torch.Tensor, k: int, eps=1e-3, **kw):
    T, E = a_TE.shape
    cap = unit_capacities(torch.arange(1), T, k, E)
    res = balanced_assignment(a_TE[None], k, cap, eps=eps, **kw)
    return res, res.idx_UTK[0], cap[0]


def check_feasible(idx_TK: torch.Tensor, cap_E: torch.Tensor):
    E = cap_E.numel()
    assert torch.equal(torch.bincount(idx_TK.reshape(-1), minlength=E), cap_E)  # every expert exactly its capacity
    assert (idx_TK.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts per token


# -- Sinkhorn ---------------------------------------------------------------------


def test_sinkhorn_marginals():
    torch.manual_seed(0)
    U, T, E = 3, 40, 8
    L = torch.randn(U, T, E) * 3
    plan = sinkhorn_log(L, iters=200).exp()
    torch.testing.assert_close(plan.sum(1), torch.full((U, E), 1 / E), atol=1e-6, rtol=0)  # columns: uniform
    torch.testing.assert_close(plan.sum(2), torch.full((U, T), 1 / T), atol=1e-5, rtol=0)  # rows: 1/T each


def test_sinkhorn_is_a_per_expert_shift_of_the_scores():
    # log plan = L - f_t - g_e: within a row, differences to the input are constant over tokens.
    torch.manual_seed(1)
    L = torch.randn(1, 16, 4)
    diff = sinkhorn_log(L, 20) - L
    row_free = diff - diff[:, :, :1]
    torch.testing.assert_close(row_free, row_free[:, :1].expand_as(row_free), atol=1e-5, rtol=0)


def test_sinkhorn_hand_example():
    # Two tokens, two experts, both prefer expert 0 equally: the plan splits evenly.
    L = torch.log(torch.tensor([[[0.9, 0.1], [0.9, 0.1]]]))
    plan = sinkhorn_log(L, 50).exp()
    torch.testing.assert_close(plan, torch.full((1, 2, 2), 0.25), atol=1e-6, rtol=0)


# -- balanced assignment --------------------------------------------------------------


SOLVERS = ["repair", "auction"]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("T, E", [(12, 3), (20, 4), (24, 6)])
def test_ba_k1_matches_scipy_linear_sum_assignment(T, E, solver):
    for seed in range(3):
        a = torch.randn(T, E, generator=torch.Generator().manual_seed(seed)).log_softmax(-1)
        res, idx, cap = solve(a, 1, solver=solver)
        check_feasible(idx, cap)
        got = a.gather(1, idx).sum().item()
        best = lsa_optimum(a.double().numpy(), cap.numpy())
        assert best - T * 1e-3 - 1e-4 <= got <= best + 1e-4  # within T*eps of the optimum


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("T, E, k", [(16, 4, 2), (15, 4, 2), (18, 6, 3), (30, 8, 2)])
def test_ba_topk_matches_linprog_optimum(T, E, k, solver):
    for seed in range(3):
        a = (3 * torch.randn(T, E, generator=torch.Generator().manual_seed(seed))).log_softmax(-1)
        res, idx, cap = solve(a, k, solver=solver)
        check_feasible(idx, cap)
        got = a.gather(1, idx).sum().item()
        best = lp_optimum(a.double().numpy(), k, cap.numpy())
        assert best - T * k * 1e-3 - 1e-4 <= got <= best + 1e-4


def test_ba_error_stays_within_the_epsilon_bound_for_large_eps():
    # With a coarse eps the auction may stop early, but never more than T*k*eps below the optimum.
    T, E, k, eps = 24, 4, 2, 0.05
    for seed in range(5):
        a = torch.randn(T, E, generator=torch.Generator().manual_seed(10 + seed)).log_softmax(-1)
        res, idx, cap = solve(a, k, eps=eps, price_iters=0, max_rounds=10_000, solver="auction")
        assert res.completed
        check_feasible(idx, cap)
        gap = lp_optimum(a.double().numpy(), k, cap.numpy()) - a.gather(1, idx).sum().item()
        assert -1e-4 <= gap <= T * k * eps + 1e-4


def test_ba_replicated_scipy_bound_for_topk():
    # Replicating tokens (k rows) and experts (cap columns) in linear_sum_assignment relaxes "distinct
    # experts": its optimum bounds ours from above.
    T, E, k = 16, 4, 2
    a = torch.randn(T, E, generator=torch.Generator().manual_seed(3)).log_softmax(-1)
    res, idx, cap = solve(a, k)
    rows = np.repeat(np.arange(T), k)
    relaxed = lsa_optimum(a.double().numpy()[rows], cap.numpy())
    assert a.gather(1, idx).sum().item() <= relaxed + 1e-4


@pytest.mark.parametrize("solver", SOLVERS)
def test_ba_hand_example(solver):
    # Every token prefers expert 0; capacity 2 each: the two tokens with the largest margin get it.
    a = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.55, 0.45]]))
    res, idx, cap = solve(a, 1, solver=solver)
    assert idx[:, 0].tolist() == [0, 1, 0, 1]


def test_ba_remainder_is_spread_and_rotates():
    cap = unit_capacities(torch.arange(5), 10, 1, 4)  # 10 slots over 4 experts: 2 experts get 3
    assert (cap.sum(1) == 10).all()
    assert sorted(cap[0].tolist()) == [2, 2, 3, 3]
    assert (cap.sum(0).max() - cap.sum(0).min()) <= 2  # over units no expert is favoured
    torch.manual_seed(0)
    a = torch.randn(10, 4).log_softmax(-1)
    res, idx, c = solve(a, 1)
    check_feasible(idx, c)


@pytest.mark.parametrize("solver", SOLVERS)
def test_ba_batched_units_and_duplicate_tokens(solver):
    # Identical tokens (ties everywhere) and several units solved at once.
    U, T, E, k = 3, 32, 4, 2
    a = torch.randn(U, 1, E).log_softmax(-1).expand(U, T, E).contiguous()
    cap = unit_capacities(torch.arange(U), T, k, E)
    res = balanced_assignment(a, k, cap, solver=solver)
    for u in range(U):
        check_feasible(res.idx_UTK[u], cap[u])


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("T", [64, 61])  # 61*2 slots over 8 experts: uneven capacities
def test_ba_greedy_completion_keeps_capacities_exact(T, solver):
    torch.manual_seed(0)
    a = (5 * torch.randn(T, 8)).log_softmax(-1)
    res, idx, cap = solve(a, 2, max_rounds=1, price_iters=0, solver=solver)
    assert not res.completed  # forced to stop early
    check_feasible(idx, cap)


@pytest.mark.parametrize("solver", SOLVERS)
def test_ba_quick_shape_completes(solver):
    torch.manual_seed(0)
    a = (2 * torch.randn(512, 16)).log_softmax(-1)
    res, idx, cap = solve(a, 2, max_rounds=50, solver=solver)
    assert res.completed and res.rounds <= 50
    check_feasible(idx, cap)
    assert math.isfinite(a.gather(1, idx).sum().item())


def test_ba_repair_is_exact_on_a_larger_problem():
    # The repair solver reaches the LP optimum itself (no eps): compare at 1e-4 on 96 tokens x 8 experts.
    a = (2 * torch.randn(96, 8, generator=torch.Generator().manual_seed(7))).log_softmax(-1)
    res, idx, cap = solve(a, 2, price_iters=3)
    assert res.rounds > 0  # the repair did some work
    check_feasible(idx, cap)
    assert a.gather(1, idx).sum().item() == pytest.approx(lp_optimum(a.double().numpy(), 2, cap.numpy()), abs=1e-4)


# A real repair input from a quick-model run (top-4 of 24, BA at sequence scope, step 42):
# float rounding made a zero-cost cycle look negative, the split table referred back to
# itself and tracing a path grew a list without end (the run was killed for 23 GB).
ROUNDING_CASE = """
import resource, sys, torch
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a runaway fails fast, not the machine
from moe_testbed.routing.repair import _trace, shortest_path_repair
assert _trace([[-1, 1], [-1, -1]], 0, 1, 2) is None  # via[0][1] = 1: splits into itself
assert _trace([[-1, 2, 1], [-1, -1, -1], [-1, -1, -1]], 0, 1, 3) is None  # 0->1 via 2, 0->2 via 1
a, held, cap, max_augment = torch.load(sys.argv[1])
out, n_aug = shortest_path_repair(a, held, cap, max_augment)
print(n_aug, bool((out.sum(1) == cap).all()), bool((out.sum(2) == held.sum(2)).all()))
"""


def test_ba_repair_survives_float_rounding_cycles():
    import subprocess
    import sys
    from pathlib import Path

    case = Path(__file__).parent / "data" / "ba_rounding_cycle.pt"
    proc = subprocess.run([sys.executable, "-c", ROUNDING_CASE, str(case)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_aug, exact, k_each = proc.stdout.split()
    assert exact == "True" and k_each == "True"  # every expert at capacity, every token keeps k experts
    assert 0 < int(n_aug) < 50
