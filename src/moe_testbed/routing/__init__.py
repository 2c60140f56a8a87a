"""Routers, balancing methods, scope and capacity.

Routing knows nothing of training: the model calls a router, the trainer calls
``after_optimizer_step`` hooks; everything else lives here.
"""

from moe_testbed.routing.base import Balancer, Router, RoutingContext, RoutingDecision
from moe_testbed.routing.registry import BALANCERS, ROUTERS, build_router, check_combination

__all__ = [
    "BALANCERS",
    "ROUTERS",
    "Balancer",
    "Router",
    "RoutingContext",
    "RoutingDecision",
    "build_router",
    "check_combination",
]
