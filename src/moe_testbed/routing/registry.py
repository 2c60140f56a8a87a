"""Name -> class registries for routers and balancing methods, their knobs, and which combinations are valid.

Adding a router or a method is one file: a module in ``routing/routers/`` or
``routing/balancing/`` whose class is decorated with ``@register_router`` /
``@register_balancer``. Modules there are imported on first use. The class
declares everything else itself: its knobs (config keys), the traits it offers
or requires, its ``check`` rules, its variants (docs/extending.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from moe_testbed.errors import ConfigError
from moe_testbed.knobs import Knob
from moe_testbed.routing.balancer import Balancer
from moe_testbed.routing.router import TRAITS, Router

ROUTERS: dict[str, type[Router]] = {}
BALANCERS: dict[str, type[Balancer]] = {}
PACKAGES = ("moe_testbed.routing.routers", "moe_testbed.routing.balancing")
_loaded = False
_knob_cache: dict[str, tuple] = {}


def register_router(cls: type[Router]) -> type[Router]:
    ROUTERS[cls.name] = cls
    return cls


def register_balancer(cls: type[Balancer]) -> type[Balancer]:
    BALANCERS[cls.name] = cls
    return cls


def load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg_name}.{mod.name}")


def declared_knobs(section: str) -> dict[str, Knob]:
    """Every knob of section ``routing`` (the routers') or ``balance`` (the methods'), by key.

    A knob shared by several classes (a mixin's) must be declared once: the same
    ``Knob`` object; two different declarations of one key are a programming error.
    """
    load_all()
    base, registry = {"routing": (Router, ROUTERS), "balance": (Balancer, BALANCERS)}[section]
    # Configs read knobs in the forward pass: keep the answer until the registry changes.
    key = (section, tuple(registry.items()))
    if _knob_cache.get(section, (None,))[0] == key:
        return _knob_cache[section][1]
    out: dict[str, Knob] = {}
    for cls in [base, *registry.values()]:
        for klass in reversed(cls.__mro__):
            for name, knob in vars(klass).get("knobs", {}).items():
                if out.get(name, knob) is not knob:
                    raise TypeError(f"{section}.{name} is declared twice, differently (again by {klass.__name__})")
                out[name] = knob
    _knob_cache[section] = (key, out)
    return out


def combination_problem(cfg) -> str | None:
    """Why a router x method x scope x capacity combination is invalid, or None."""
    load_all()
    r, b = cfg.routing.router, cfg.balance.method
    if r not in ROUTERS:
        return f"routing.router={r!r} is not allowed: choose one of {', '.join(sorted(ROUTERS))}"
    if b not in BALANCERS:
        return f"balance.method={b!r} is not allowed: choose one of {', '.join(sorted(BALANCERS))}"
    router, method = ROUTERS[r], BALANCERS[b]
    problem = router.check(cfg)
    if problem:
        return problem
    traits = router.traits(cfg)
    for trait in method.requires:
        if trait not in traits:
            return f"balance.method={b} needs {TRAITS[trait]}, but routing.router={r} {router.lacks(trait, cfg)}"
    return method.check(cfg)


def check_combination(cfg) -> None:
    problem = combination_problem(cfg)
    if problem:
        raise ConfigError(problem)


def build_router(cfg, layer: int, moe_index: int, info: dict) -> Router:
    """The configured router, with its balancing method, for block ``layer`` (the ``moe_index``-th MoE layer)."""
    load_all()
    balancer = BALANCERS[cfg.balance.method](cfg.model.n_experts, cfg.routing.top_k, cfg.balance, layer)
    return ROUTERS[cfg.routing.router](cfg, balancer, layer, moe_index, info)
