"""Routing metrics of record, computed from slot counts.

Pure numpy: every function takes counts that the model accumulated (numpy arrays,
or torch tensors, which are moved to the CPU) and returns plain floats. The
definitions are those of docs/metrics.md; each docstring states its formula.

Shape legend (torchtitan-style suffixes):
    L  MoE layers            E  routed experts        D  domains
    n_ED      routed slots of domain-d tokens processed by expert e (one layer);
              dropped slots are *not* in n, they are in drops
    counts_LED the same for every MoE layer
    drops_LD  slots dropped by capacity, per layer and domain
    f_E       expert load shares, sum to 1

An empty layer (no routed slots) gives NaN, never an exception, so that logging
a step in which a layer saw no tokens cannot crash a run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

# Fraction of the even share 1/E below which an expert counts as dead.
DEAD_FRACTION = 0.1


def as_array(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """numpy view of ``x``; torch tensors are detached and moved to the CPU first."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# ---- load-based metrics (utilization) -------------------------------------


def load(n_ED: Any) -> np.ndarray:
    """Load shares ``f_e = sum_d n[e, d] / sum n``; all NaN when the layer is empty."""
    n_ED = as_array(n_ED)
    per_expert_E = n_ED.sum(axis=-1) if n_ED.ndim == 2 else n_ED
    total = per_expert_E.sum()
    if total <= 0:
        return np.full(per_expert_E.shape, np.nan)
    return per_expert_E / total


def utilization(f_E: Any) -> float:
    """``U = sum_e min(f_e, 1/E)``, in [1/E, 1]; equals ``1 - TV(f, uniform)``.

    Why this form: the mass above 1/E on overloaded experts equals the mass missing
    on underloaded ones, so summing the capped shares measures how much of the
    load sits where an even router would put it.
    """
    f_E = as_array(f_E)
    return float(np.minimum(f_E, 1.0 / f_E.size).sum())


def load_entropy(f_E: Any) -> float:
    """Normalized load entropy ``H(f) / log E = -sum_e f_e log f_e / log E`` (0 log 0 = 0).

    NaN for E = 1, where log E = 0 and every router is trivially even.
    """
    f_E = as_array(f_E)
    if f_E.size < 2 or np.isnan(f_E).any():
        return math.nan
    nz = f_E[f_E > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(f_E.size))


def max_vio(f_E: Any) -> float:
    """``MaxVio = max_e f_e * E - 1``: how far the busiest expert exceeds the even load (0 = even)."""
    f_E = as_array(f_E)
    return float(f_E.max() * f_E.size - 1.0)


def dead_share(f_E: Any, threshold: float = DEAD_FRACTION) -> float:
    """Share of experts with ``f_e < 0.1 / E`` (``threshold / E``)."""
    f_E = as_array(f_E)
    if np.isnan(f_E).any():
        return math.nan
    return float((f_E < threshold / f_E.size).mean())


# ---- domain-based metrics (specialization) --------------------------------


def purity(n_ED: Any) -> float:
    """``P = sum_e max_d n[e, d] / sum n``.

    The share of slots that went to an expert whose majority domain is their own.
    """
    n_ED = as_array(n_ED)
    total = n_ED.sum()
    if total <= 0:
        return math.nan
    return float(n_ED.max(axis=1).sum() / total)


def chance_purity(n_ED: Any) -> float:
    """Purity of a router that ignores domains: ``P_chance = max_d m_d / M``.

    Such a router sends every domain to expert e in the same proportion f_e, so its
    table of slot shares is the outer product ``n_chance[e, d] = f_e * m_d / M``
    (``m_d`` = routed slots of domain d, ``M = sum_d m_d``). Every expert's majority
    domain is then the largest one and ``sum_e max_d f_e m_d / M = max_d m_d / M``,
    whatever the loads. It is computed from the same table as P, so both refer to
    the same data.
    """
    n_ED = as_array(n_ED)
    m_D = n_ED.sum(axis=0)
    total = m_D.sum()
    if total <= 0:
        return math.nan
    return float(m_D.max() / total)


def chance_counts(n_ED: Any) -> np.ndarray:
    """``n_chance[e, d] = f_e * m_d``: the chance table scaled to ``sum n``.

    Same expert loads and domain totals as ``n``, but expert and domain independent.
    """
    n_ED = as_array(n_ED)
    total = n_ED.sum()
    if total <= 0:
        return np.zeros_like(n_ED)
    return np.outer(n_ED.sum(axis=1), n_ED.sum(axis=0)) / total


def nmi(n_ED: Any) -> float:
    """Normalized mutual information between expert and domain of a slot.

    ``I(e; d) = sum_{e,d} p(e,d) log(p(e,d) / (p(e) p(d)))`` with ``p = n / sum n``, and
    ``NMI = I / ((H(e) + H(d)) / 2)``: arithmetic-mean normalisation, scikit-learn's
    default for ``normalized_mutual_info_score``. Its conventions are kept so the
    two agree exactly: 1 when only one expert and one domain occur (both entropies
    are 0), 0 when the mutual information is 0. NaN for an empty table.
    """
    n_ED = as_array(n_ED)
    total = n_ED.sum()
    if total <= 0:
        return math.nan
    p_ED = n_ED / total
    p_E, p_D = p_ED.sum(axis=1), p_ED.sum(axis=0)
    if (p_E > 0).sum() == 1 and (p_D > 0).sum() == 1:
        return 1.0
    if (p_E > 0).sum() == 1 or (p_D > 0).sum() == 1:
        return 0.0  # one side has a single label, so I = 0 (sklearn returns 0 here too)
    e_idx, d_idx = np.nonzero(p_ED)
    p = p_ED[e_idx, d_idx]
    mi = float(np.clip((p * np.log(p / (p_E[e_idx] * p_D[d_idx]))).sum(), 0.0, None))
    if mi <= 1e-15:  # independent: avoid dividing rounding noise
        return 0.0
    normalizer = (_entropy(p_E) + _entropy(p_D)) / 2.0
    return float(mi / max(normalizer, np.finfo(np.float64).eps))


def _entropy(p: np.ndarray) -> float:
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def specialization(p: float, p_ref: float, p_chance: float, eps: float = 1e-12) -> float:
    """``(P - P_chance) / (P_ref - P_chance)``: 0 = chance, 1 = as pure as the reference router.

    NaN when the reference is no purer than chance (e.g. a single domain), where
    the ratio has no meaning.
    """
    if any(math.isnan(x) for x in (p, p_ref, p_chance)) or abs(p_ref - p_chance) < eps:
        return math.nan
    return float((p - p_chance) / (p_ref - p_chance))


def reference_counts(slots_per_domain_D: Any, groups: Sequence[Sequence[int]], n_experts: int) -> np.ndarray:
    """Counts ``n_ref[E, D]`` of the reference router on data with ``m_d`` slots per domain.

    The reference router spreads domain d's slots evenly over its group g_d:
    ``n_ref[e, d] = m_d / |g_d|`` for e in g_d, else 0. Groups may overlap (when
    E < D * k); then an expert serves several domains and ``P_ref < 1``.
    """
    m_D = as_array(slots_per_domain_D)
    if len(groups) != m_D.size:
        raise ValueError(f"groups has {len(groups)} entries but there are {m_D.size} domains")
    n_ref_ED = np.zeros((n_experts, m_D.size))
    for d, group in enumerate(groups):
        experts = np.unique(np.asarray(list(group), dtype=np.int64))
        if experts.size == 0:
            raise ValueError(f"domain {d} has an empty expert group")
        if experts.min() < 0 or experts.max() >= n_experts:
            raise ValueError(f"domain {d}: expert ids {experts.tolist()} out of range [0, {n_experts})")
        n_ref_ED[experts, d] = m_D[d] / experts.size
    return n_ref_ED


# ---- capacity and gates ------------------------------------------------------


def drop_rate(routed_slots: float, dropped_slots: float) -> float:
    """``dropped / (routed + dropped)``: slots dropped by capacity over all slots."""
    total = routed_slots + dropped_slots
    return float(dropped_slots / total) if total > 0 else math.nan


def gate_mass(gate_mass_sum: float, tokens: float) -> float:
    """Mean over tokens of ``sum_{e chosen} g_e``: ``gate_mass_sum / tokens``."""
    return float(gate_mass_sum / tokens) if tokens > 0 else math.nan


# ---- everything at once ---------------------------------------------------


def layer_metrics(
    n_ED: Any,
    drops_D: Any = None,
    gate_mass_sum_D: Any = None,
    tokens_D: Any = None,
    ref_ED: Any = None,
) -> dict[str, float]:
    """Every metric of record for one layer, keyed by the short names of routing_scalars()."""
    n_ED = as_array(n_ED)
    if n_ED.ndim != 2:
        raise ValueError(f"expected counts of shape [E, D], got {n_ED.shape}")
    f_E = load(n_ED)
    empty = bool(np.isnan(f_E).any())
    out = {
        "util": math.nan if empty else utilization(f_E),
        "entropy": load_entropy(f_E),
        "maxvio": math.nan if empty else max_vio(f_E),
        "dead": dead_share(f_E),
        "purity": purity(n_ED),
        "nmi": nmi(n_ED),
        "purity_chance": chance_purity(n_ED),
    }
    if drops_D is not None:
        out["drop_rate"] = drop_rate(float(n_ED.sum()), float(as_array(drops_D).sum()))
    if gate_mass_sum_D is not None and tokens_D is not None:
        out["gate_mass"] = gate_mass(float(as_array(gate_mass_sum_D).sum()), float(as_array(tokens_D).sum()))
    if ref_ED is not None:
        p_ref = purity(ref_ED)
        out["purity_ref"] = p_ref
        out["specialization"] = specialization(out["purity"], p_ref, out["purity_chance"])
    return out


def routing_scalars(
    counts_LED: Any,
    layer_names: list[str],
    drops_LD: Any = None,
    gate_mass_sum_LD: Any = None,
    tokens_LD: Any = None,
    ref_counts_LED: Any = None,
    prefix: str = "",
) -> dict[str, float]:
    """Scalars ``{prefix}{metric}/{layer}`` for every layer and ``{prefix}{metric}/mean``.

    metric is util, purity, nmi, entropy, maxvio, dead, purity_chance; drop_rate
    when drops are given; gate_mass when gate mass and tokens are given;
    specialization and purity_ref when reference counts are given. The mean is
    over layers, skipping NaN (empty) layers; NaN when every layer is NaN. A model
    without MoE layers (L = 0) gives an empty dict.
    """
    counts_LED = as_array(counts_LED)
    if counts_LED.ndim != 3:
        raise ValueError(f"expected counts of shape [L, E, D], got {counts_LED.shape}")
    if len(layer_names) != counts_LED.shape[0]:
        raise ValueError(f"{len(layer_names)} layer names for {counts_LED.shape[0]} layers")

    drops_LD = None if drops_LD is None else as_array(drops_LD)
    ref_counts_LED = None if ref_counts_LED is None else as_array(ref_counts_LED)
    has_gate = gate_mass_sum_LD is not None and tokens_LD is not None
    gate_LD = as_array(gate_mass_sum_LD) if has_gate else None
    tokens_LD = as_array(tokens_LD) if has_gate else None
    per_layer = [
        layer_metrics(
            counts_LED[i],
            drops_D=None if drops_LD is None else drops_LD[i],
            gate_mass_sum_D=None if gate_LD is None else gate_LD[i],
            tokens_D=None if tokens_LD is None else tokens_LD[i],
            ref_ED=None if ref_counts_LED is None else ref_counts_LED[i],
        )
        for i in range(counts_LED.shape[0])
    ]
    out: dict[str, float] = {}
    for name, metrics in zip(layer_names, per_layer):
        for key, value in metrics.items():
            out[f"{prefix}{key}/{name}"] = value
    for key in per_layer[0] if per_layer else ():
        out[f"{prefix}{key}/mean"] = nanmean([m[key] for m in per_layer])
    return out


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN (without numpy's RuntimeWarning) when there are none."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0 or np.isnan(arr).all():
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(arr))
