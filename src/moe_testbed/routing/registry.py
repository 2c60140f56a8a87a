"""Name -> class registries for routers and balancing methods.

Adding a router or a method touches one file: drop a module into
``routing/routers/`` or ``routing/balancing/`` that decorates its class with
``@register_router`` / ``@register_balancer``. Modules there are imported on
first use, and their ``check`` classmethods decide at config time which
combinations are valid.
"""

from __future__ import annotations

import importlib
import pkgutil

from moe_testbed.config import ConfigError

ROUTERS: dict[str, type] = {}
BALANCERS: dict[str, type] = {}
_loaded = False


def register_router(cls):
    ROUTERS[cls.name] = cls
    return cls


def register_balancer(cls):
    BALANCERS[cls.name] = cls
    return cls


def load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for pkg_name in ("moe_testbed.routing.routers", "moe_testbed.routing.balancing"):
        pkg = importlib.import_module(pkg_name)
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg_name}.{mod.name}")


def combination_problem(cfg) -> str | None:
    """Why a router x method x scope x capacity combination is invalid, or None."""
    load_all()
    r, b = cfg.routing.router, cfg.balance.method
    if r not in ROUTERS:
        return f"routing.router={r!r} is not allowed: choose one of {', '.join(sorted(ROUTERS))}"
    if b not in BALANCERS:
        return f"balance.method={b!r} is not allowed: choose one of {', '.join(sorted(BALANCERS))}"
    return ROUTERS[r].check(cfg) or BALANCERS[b].check(cfg)


def check_combination(cfg) -> None:
    problem = combination_problem(cfg)
    if problem:
        raise ConfigError(problem)


def build_router(cfg, layer: int, info: dict):
    """Instantiate the configured router (with its balancer) for MoE layer ``layer``."""
    load_all()
    m = cfg.model
    balancer = BALANCERS[cfg.balance.method](m.n_experts, cfg.routing.top_k, cfg.balance, layer)
    router_cls = ROUTERS[cfg.routing.router]
    return router_cls(m.d_model, m.n_experts, cfg.routing.top_k, cfg.routing, balancer, layer, info)
