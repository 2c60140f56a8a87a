"""Expert groups per domain for the reference and domain-guided routers.

The default grouping splits the E experts into D contiguous groups of near-equal
size (every expert belongs to one domain, so the reference router uses them
all) when ``E >= D * k``; otherwise each domain gets ``k`` consecutive experts,
wrapping around (groups overlap and the reference purity drops below 1, which
the metrics account for). An explicit mapping
``routing.groups: {domain: [experts]}`` overrides it.
"""

from __future__ import annotations

import torch

from moe_testbed.errors import ConfigError


def reference_groups(
    domains: list[str], n_experts: int, top_k: int, explicit: dict[str, list[int]] | None = None
) -> list[list[int]]:
    """Experts of each domain's group, indexed like ``domains``."""
    if explicit:
        unknown = [d for d in explicit if d not in domains]
        if unknown:
            raise ConfigError(
                f"routing.groups names {unknown[0]!r}, which is not a domain of the mix: its domains are "
                f"{', '.join(domains)}"
            )
        missing = [d for d in domains if d not in explicit]
        if missing:
            raise ConfigError(
                f"routing.groups has no group for domain {missing[0]!r}: give every domain of the mix a list of experts"
            )
        groups = []
        for d in domains:
            g = sorted(set(explicit[d]))
            if not g or min(g) < 0 or max(g) >= n_experts:
                raise ConfigError(f"routing.groups.{d}={explicit[d]} must list experts in 0..{n_experts - 1}")
            if len(g) < top_k:
                raise ConfigError(f"routing.groups.{d} has {len(g)} experts, fewer than routing.top_k={top_k}")
            groups.append(g)
        return groups
    D = max(len(domains), 1)
    if n_experts >= D * top_k:
        bounds = [round(d * n_experts / D) for d in range(D + 1)]
        return [list(range(bounds[d], bounds[d + 1])) for d in range(len(domains))]
    return [sorted({(d * top_k + j) % n_experts for j in range(top_k)}) for d in range(len(domains))]


def describe_groups(domains: list[str], groups: list[list[int]]) -> str:
    return ", ".join(f"{d}->{g}" for d, g in zip(domains, groups))


def group_members(groups: list[list[int]], n_experts: int) -> torch.Tensor:
    """Bool [D + 1, E]: row d marks domain d's group; the last row (padding, id -1) allows every expert."""
    member = torch.zeros(len(groups) + 1, n_experts, dtype=torch.bool)
    for d, g in enumerate(groups):
        member[d, g] = True
    member[-1] = True
    return member


def groups_from_info(
    info: dict, n_experts: int, top_k: int, router: str, explicit: dict[str, list[int]] | None = None
) -> list[list[int]]:
    """The domain -> experts groups the trainer passes in ``info`` (or derived from ``info["domains"]``)."""
    if info.get("groups") is not None:
        return info["groups"]
    if info.get("domains") is not None:
        return reference_groups(list(info["domains"]), n_experts, top_k, explicit)
    raise ValueError(
        f"routing.router={router} needs the mix's domains: pass info={{'domains': [...], 'groups': [...]}} "
        "(the trainer does)"
    )


def check_explicit_groups(cfg) -> str | None:
    """Config-time check of ``routing.groups`` (domain names are checked when the mix is known)."""
    E, k = cfg.model.n_experts, cfg.routing.top_k
    for d, g in (cfg.routing.groups or {}).items():
        g = set(g)
        if not g or min(g) < 0 or max(g) >= E:
            return f"routing.groups.{d}={sorted(g)} must list experts in 0..{E - 1}"
        if len(g) < k:
            return f"routing.groups.{d} has {len(g)} experts, fewer than routing.top_k={k}"
    return None
