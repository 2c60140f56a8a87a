"""No balancing: plain top-k on the router's scores (z-loss may still apply)."""

from moe_testbed.routing.balancer import Balancer
from moe_testbed.routing.registry import register_balancer


@register_balancer
class NoBalancing(Balancer):
    """Plain top-k on the router's scores, no auxiliary loss (z-loss may still apply)."""

    name = "none"
