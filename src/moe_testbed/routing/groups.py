"""Expert groups per domain for the reference and domain-guided routers.

The default grouping splits the E experts into D contiguous groups of near-equal
size (every expert belongs to one domain, so the reference router uses them
all) when ``E >= D * k``; otherwise each domain gets ``k`` consecutive experts,
wrapping around (groups overlap and the reference purity drops below 1, which
the metrics account for). An explicit mapping
``routing.groups: {domain: [experts]}`` overrides it.
"""

from __future__ import annotations

from moe_testbed.config import ConfigError


def reference_groups(
    domains: list[str], n_experts: int, top_k: int, explicit: dict[str, list[int]] | None = None
) -> list[list[int]]:
    """Experts of each domain's group, indexed like ``domains``."""
    if explicit:
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
