import math

import torch

from moe_testbed.routing.capacity import capacity, capacity_keep


def test_capacity_formula():
    assert capacity(100, 2, 8, 1.0) == math.ceil(100 * 2 / 8)
    assert capacity(10, 1, 4, 1.5) == 4  # ceil(3.75)


def test_probs_policy_keeps_highest_gates():
    # 4 tokens all to expert 0, E=2, k=1, factor 1 -> capacity 2.
    idx = torch.zeros(4, 1, dtype=torch.long)
    gate = torch.tensor([[0.1], [0.9], [0.5], [0.7]])
    keep = capacity_keep(idx, gate, 2, 1.0, "probs", unit_len=4)
    assert keep.view(-1).tolist() == [False, True, False, True]


def test_position_policy_keeps_first_choices_then_earliest():
    # E=2, k=2, T=2, factor 0.5 -> capacity ceil(2*2/2*0.5) = 1 per expert.
    idx = torch.tensor([[1, 0], [0, 1]])
    gate = torch.ones(2, 2)
    keep = capacity_keep(idx, gate, 2, 0.5, "position", unit_len=2)
    # First choices: token0 -> e1, token1 -> e0; both fit. Second choices are dropped.
    assert keep.tolist() == [[True, False], [True, False]]


def test_capacity_is_per_unit_and_never_exceeded():
    torch.manual_seed(0)
    T, K, E, unit = 64, 2, 4, 16
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    idx[:32] = torch.tensor([0, 1])  # skew the first half
    gate = torch.rand(T, K)
    keep = capacity_keep(idx, gate, E, 1.0, "probs", unit_len=unit)
    cap = capacity(unit, K, E, 1.0)
    for u in range(T // unit):
        sl = slice(u * unit, (u + 1) * unit)
        kept = torch.bincount(idx[sl][keep[sl]], minlength=E)
        assert (kept <= cap).all()
        wanted = torch.bincount(idx[sl].reshape(-1), minlength=E)
        assert torch.equal(kept, torch.minimum(wanted, torch.full_like(wanted, cap)))


def test_dropless_returns_none():
    assert capacity_keep(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), 2, None, "probs", 3) is None
