"""A new balancing method or router is one file plus its registration (docs/extending.md).

The toy method and router below are defined and registered inside the test, as
a new file would define them, with a knob each. Without editing any other file
they pass config validation (type, range, combination rules), train through the
real trainer, appear on the combinations page and in the benchmark's method list,
and get the z-loss every method gets.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from moe_testbed.config import ConfigError, load_config
from moe_testbed.knobs import Knob, positive
from moe_testbed.routing.balancer import Balancer
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.registry import BALANCERS, ROUTERS, load_all, register_balancer, register_router
from moe_testbed.routing.router import Router
from moe_testbed.train.trainer import run_training
from tests.routing.toy import make_cfg, make_model
from tests.train.runs import REPO, tiny_cfg


@pytest.fixture
def toy_components():
    load_all()

    @register_balancer
    class ToyMethod(Balancer):
        """Toy method: a loss that pushes the router's probabilities towards uniform."""

        name = "toy_method"
        requires = ("learned", "scores")
        knobs = {"toy_strength": Knob(0.5, float, "weight of the toy loss", positive)}
        overhead_budget_pct = 50.0

        def balance_losses(self, probs_TE, idx_TK, ctx):
            return {"toy": self.cfg.toy_strength * (probs_TE - 1.0 / self.n_experts).square().mean()}

    @register_router
    class ToyRouter(Router):
        """Toy router: softmax top-k of the logits divided by a temperature."""

        name = "toy_router"
        knobs = {"toy_temperature": Knob(1.0, float, "softmax temperature", positive)}

        def score(self, x_TD, ctx):
            return super().score(x_TD, ctx) / self.cfg.toy_temperature

    yield ToyMethod, ToyRouter
    del BALANCERS["toy_method"], ROUTERS["toy_router"]


TOY = ["routing.router=toy_router", "balance.method=toy_method"]


def test_config_knows_the_new_knobs_and_rules(toy_components):
    cfg = load_config(None, [*TOY, "balance.toy_strength=0.25", "routing.toy_temperature=2"])
    assert cfg.balance.toy_strength == 0.25 and cfg.routing.toy_temperature == 2.0
    assert load_config(None, TOY).balance.toy_strength == 0.5  # the declared default
    assert "toy_strength: 0.25" in cfg.to_yaml()  # written into config.yaml like any key
    with pytest.raises(ConfigError, match=r"balance.toy_strength=-1.0 must be > 0"):
        load_config(None, [*TOY, "balance.toy_strength=-1"])
    with pytest.raises(ConfigError, match=r"routing.toy_temperature='hot' has the wrong type"):
        load_config(None, [*TOY, "routing.toy_temperature=hot"])
    with pytest.raises(ConfigError, match=r"balance.method=toy_method needs a router whose scores are trained"):
        load_config(None, ["routing.router=hash", "balance.method=toy_method"])


def test_the_new_components_train_and_get_z_loss(toy_components, tiny_data_dir, tmp_path):
    cfg = tiny_cfg(tiny_data_dir, *TOY, "train.steps=2", "train.log_every=1", "balance.z_loss=0.01")
    run_dir, _ = run_training(cfg, tmp_path / "run", log=lambda *_: None)
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert len(train) == 2 and all(r["aux/toy"] > 0 and r["aux/z"] > 0 for r in train)
    saved = load_config(run_dir / "config.yaml")
    assert (saved.routing.router, saved.balance.method, saved.balance.toy_strength) == ("toy_router", "toy_method", 0.5)


def test_the_router_sees_its_knob(toy_components):
    _, ToyRouter = toy_components
    hot = make_model(make_cfg("toy_router", "none", **{"routing.toy_temperature": 100.0}))
    cold = make_model(make_cfg("toy_router", "none", **{"routing.toy_temperature": 0.01}))
    x = torch.randn(16, 16)
    p_hot = hot.moe_layers[0].router.decide(x, RoutingContext(seq_len=16)).probs_TE
    p_cold = cold.moe_layers[0].router.decide(x, RoutingContext(seq_len=16)).probs_TE
    assert isinstance(hot.moe_layers[0].router, ToyRouter)
    assert p_hot.max() < 0.3 < 0.99 < p_cold.max()  # 4 experts: near uniform vs near one-hot


def test_combinations_page_and_benchmark_list_them(toy_components):
    spec = importlib.util.spec_from_file_location("gen_combinations", REPO / "scripts" / "gen_combinations.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    page = gen.render().splitlines()
    header = next(line for line in page if line.startswith("| router | `none`"))
    assert "`toy_method`" in header
    row = next(line for line in page if line.startswith("| `toy_router` |"))
    assert row.count("yes") >= 2  # at least none and the toy method
    assert "- method `toy_method`: Toy method: a loss that pushes the router's probabilities towards uniform." in page

    from moe_testbed.bench.step import balance_variants, overhead_budget

    variants, _ = balance_variants(load_config(REPO / "configs/tiny.yaml"))
    names = [name for name, _ in variants]
    assert {"toy_method@sequence", "toy_method@microbatch", "toy_method@global"} <= set(names)
    assert overhead_budget("toy_method") == 50.0
