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


def _keep(capacity_scope: str, scope: str):
    import moe_testbed.routing.context as context
    from tests.routing.toy import batch, make_cfg, make_model

    cfg = make_cfg("softmax_topk", "none", scope, 1.0, **{"balance.capacity_scope": capacity_scope})
    model = make_model(cfg)
    kept = []
    model.moe_layers[0].router.register_forward_hook(lambda m, a, dec: kept.append(dec.keep_TK.clone()))
    ids, _, dom = (torch.cat(x) for x in zip(batch(1, 2, 8, 0), batch(2, 2, 8, 0)))
    model(ids, context.RoutingContext(training=True, seq_len=8, domain_ids_T=dom, microbatch_size=2))
    return kept[0]


def test_drops_depend_on_the_capacity_unit_not_on_the_balancing_scope():
    per_mb = [_keep("microbatch", scope) for scope in ("sequence", "microbatch", "global")]
    assert (~per_mb[0]).any()  # capacity factor 1 with a random router: some slots are dropped
    assert all(torch.equal(per_mb[0], other) for other in per_mb[1:])
    assert not torch.equal(_keep("sequence", "microbatch"), per_mb[0])  # the capacity knob does change them


def test_a_shorter_last_unit_gets_its_own_capacity():
    idx = torch.zeros(6, 1, dtype=torch.long)  # 6 tokens, all to expert 0; units of 4 and 2
    keep = capacity_keep(idx, torch.ones(6, 1), 2, 1.0, "position", unit_len=4)
    assert keep.view(-1).tolist() == [True, True, False, False, True, False]  # capacities ceil(4/2), ceil(2/2)
