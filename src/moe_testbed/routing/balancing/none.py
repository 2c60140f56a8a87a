"""No balancing: plain top-k on the router's scores (z-loss may still apply)."""

from moe_testbed.routing.balancing.zloss import ZLossMixin
from moe_testbed.routing.base import Balancer
from moe_testbed.routing.registry import register_balancer


@register_balancer
class NoBalancing(ZLossMixin, Balancer):
    name = "none"
    description = "plain top-k, no balancing"
