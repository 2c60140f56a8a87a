"""Routing: routers, balancing methods, scope, capacity, statistics and the metrics computed from them.

Everything that happens to a token's routing lives here, on one road
(``Router.forward``): decide (the router and its balancing method) -> capacity
-> observe (balancing state) -> record (statistics). The model calls the road
once per MoE layer; the trainer calls ``after_optimizer_step`` hooks. Routing
knows nothing of training or of the model.

    context.py    RoutingContext: what a router may know besides the hidden states
    router.py     Router: the decide pipeline, the road, the config-time rules (traits)
    balancer.py   Balancer: how a balancing method plugs into the pipeline (z-loss built in)
    registry.py   name -> class for routers/ and balancing/; knobs; combination checks
    capacity.py   expert capacity and token dropping
    scope.py      balancing scope units and the process-group interface
    recorder.py   n[layer, expert, domain] counted on the device
    tables.py     RoutingTables: the recorded tables, saved and loaded in one place
    metrics.py    the metrics of record computed from the tables

This package is imported lazily: ``moe_testbed.routing.names`` (the config's
vocabulary) must stay importable without torch.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Balancer": "moe_testbed.routing.balancer",
    "Router": "moe_testbed.routing.router",
    "RoutingContext": "moe_testbed.routing.context",
    "RoutingDecision": "moe_testbed.routing.context",
    "RoutingTables": "moe_testbed.routing.tables",
    "BALANCERS": "moe_testbed.routing.registry",
    "ROUTERS": "moe_testbed.routing.registry",
    "build_router": "moe_testbed.routing.registry",
    "check_combination": "moe_testbed.routing.registry",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_testbed.routing' has no attribute {name!r}")
