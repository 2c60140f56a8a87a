"""train/ddp.py: DDP without ``find_unused_parameters`` needs a gradient for every trainable parameter.

The two-rank behaviour (averaging once a step, no_sync, a router that freezes) is
tested under torchrun in test_distributed.py; here, in one process, the property
DDP relies on: every router and balancing method gives every parameter that trains
a gradient in every backward (the experts of a layer are one stacked tensor, so an
expert no token chose still gets zeros).
"""

from __future__ import annotations

import pytest

from moe_testbed.routing.registry import BALANCERS, ROUTERS, load_all
from moe_testbed.train.step import micro_step
from tests.routing.toy import batch, make_cfg, make_model

load_all()


def missing_gradients(cfg) -> list[str]:
    model = make_model(cfg)
    ids, tgt, dom = batch(0)
    micro_step(model, ids, tgt, dom, step=0, microbatch=0, accum=1, microbatch_size=2, whole_step=True)
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_gives_every_trainable_parameter_a_gradient(router):
    assert missing_gradients(make_cfg(router)) == []


@pytest.mark.parametrize("method", sorted(BALANCERS))
def test_every_balancing_method_gives_every_trainable_parameter_a_gradient(method):
    # capacity 1.0 drops slots, so some expert may receive none: its rows of the stacked tensor get zeros
    assert missing_gradients(make_cfg("softmax_topk", method, "microbatch", capacity=1.0)) == []


def test_the_dense_model_gives_every_parameter_a_gradient():
    assert missing_gradients(make_cfg(**{"model.dense": True})) == []
