"""Every router x method x scope x capacity either trains or is rejected at config time with a reason."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch

from moe_testbed.config import ConfigError
from moe_testbed.routing.registry import BALANCERS, ROUTERS, combination_problem, load_all

from .toy import evaluate, make_cfg, make_model, train

load_all()
REPO = Path(__file__).resolve().parents[2]
ROUTER_VARIANTS = [(r, {}) for r in sorted(ROUTERS) if r != "reference"] + [
    ("reference", {"routing.inner": "uniform"}),
    ("reference", {"routing.inner": "learned"}),
]
METHODS = sorted(BALANCERS)
SCOPES = ["sequence", "microbatch", "global"]
CAPACITIES = [None, 1.0]


def all_combinations():
    for (router, extra), method, scope, cap in itertools.product(ROUTER_VARIANTS, METHODS, SCOPES, CAPACITIES):
        label = f"{router}{'-' + extra['routing.inner'] if extra else ''}-{method}-{scope}-cap{cap}"
        yield pytest.param(router, extra, method, scope, cap, id=label)


@pytest.mark.parametrize("router, extra, method, scope, cap", list(all_combinations()))
def test_combination_trains_or_is_rejected(router, extra, method, scope, cap):
    cfg = make_cfg(router, method, scope, cap, **extra)
    # z-loss rides along wherever the router allows it.
    with_z = cfg.replace({"balance.z_loss": 1e-3})
    if combination_problem(with_z) is None:
        cfg = with_z
    problem = combination_problem(cfg)
    if problem is not None:
        assert len(problem) > 20 and ("routing." in problem or "balance." in problem), problem
        with pytest.raises(ConfigError):
            cfg.validate()
        return
    cfg.validate()
    model = make_model(cfg)
    losses = train(model, cfg, steps=2, grad_accum=2)
    assert all(math.isfinite(x) for x in losses), losses
    assert math.isfinite(evaluate(model, cfg))


def test_every_router_and_method_has_some_valid_combination():
    for router, extra in ROUTER_VARIANTS:
        assert combination_problem(make_cfg(router, "none", **extra)) is None, router
    for method in METHODS:
        assert combination_problem(make_cfg("softmax_topk", method)) is None, method


def test_combinations_doc_is_up_to_date():
    spec = importlib.util.spec_from_file_location("gen_combinations", REPO / "scripts" / "gen_combinations.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    doc = (REPO / "docs" / "combinations.md").read_text()
    assert doc == gen.render(), "docs/combinations.md is stale: run python scripts/gen_combinations.py"


def test_grad_flows_to_learned_router_weights():
    cfg = make_cfg("softmax_topk", "lbl")
    model = make_model(cfg)
    before = model.moe_layers[0].router.weight.detach().clone()
    train(model, cfg, steps=1, grad_accum=1)
    assert not torch.equal(before, model.moe_layers[0].router.weight)


@pytest.mark.parametrize(
    "router, method, dotted",
    [
        ("softmax_topk", "lbl", {"routing.n_groups": 2, "routing.topk_groups": 1}),
        ("sigmoid_topk", "eb", {"routing.n_groups": 2, "routing.topk_groups": 1, "balance.scope": "global"}),
        ("noisy_topk", "none", {"routing.n_groups": 4, "routing.topk_groups": 2, "balance.capacity_factor": 1.0}),
        ("expert_choice", "none", {"routing.seq_capacity": 2.0, "balance.scope": "sequence"}),
        ("sigmoid_topk", "lbl", {"routing.top_k": 1, "balance.scope": "sequence"}),
        ("softmax_topk", "ba", {"routing.top_k": 3, "balance.capacity_factor": 0.5, "balance.drop_policy": "position"}),
        ("frozen", "eb", {"routing.freeze_after": 1}),
    ],
)
def test_more_variants_train(router, method, dotted):
    cfg = make_cfg(router, method, **dotted)
    cfg.validate()
    model = make_model(cfg)
    assert all(math.isfinite(x) for x in train(model, cfg, steps=2))
    assert math.isfinite(evaluate(model, cfg))


def test_invalid_group_limits_are_rejected():
    for dotted, needle in [
        ({"routing.n_groups": 3}, "must divide"),
        ({"routing.n_groups": 2, "routing.topk_groups": 3}, "topk_groups"),
        ({"routing.n_groups": 4, "routing.topk_groups": 1}, "fewer than routing.top_k"),
    ]:
        assert needle in combination_problem(make_cfg("softmax_topk", "none", **dotted))
    assert "n_groups" in combination_problem(make_cfg("softmax_topk", "sh", **{"routing.n_groups": 2}))


def test_every_registered_component_has_behavioural_tests_of_its_own():
    """This file only checks that combinations train; each router and method needs tests that pin what it does."""
    others = [p for p in Path(__file__).parent.glob("test_*.py") if p.name not in ("test_combinations.py",
                                                                                   "test_extending.py")]  # fmt: skip
    text = "\n".join(p.read_text() for p in others)
    missing = [name for name in [*ROUTERS, *BALANCERS] if f'"{name}"' not in text]
    assert not missing, f"no behavioural test names {missing}: add one to tests/routing/ (docs/extending.md)"
