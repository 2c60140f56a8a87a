"""Routing metrics of record, computed from slot counts.

Pure numpy: every function takes counts that the model accumulated (numpy arrays,
or torch tensors, which are moved to the CPU) and returns plain floats. The
definitions are those of docs/metrics.md; each docstring states its formula.

Shape legend (torchtitan-style suffixes, one alphabet for the whole package):
    L  MoE layers            E  routed experts        C  domains (classes of the labels)
    n_EC      routed slots of domain-c tokens processed by expert e (one layer);
              dropped slots are *not* in n, they are in drops
    counts_LEC the same for every MoE layer
    drops_LC  slots dropped by capacity, per layer and domain
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


def load(n_EC: Any) -> np.ndarray:
    """Load shares ``f_e = sum_d n[e, d] / sum n``; all NaN when the layer is empty."""
    n_EC = as_array(n_EC)
    per_expert_E = n_EC.sum(axis=-1) if n_EC.ndim == 2 else n_EC
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


def purity(n_EC: Any) -> float:
    """``P = sum_e max_d n[e, d] / sum n``.

    The share of slots that went to an expert whose majority domain is their own.
    """
    n_EC = as_array(n_EC)
    total = n_EC.sum()
    if total <= 0:
        return math.nan
    return float(n_EC.max(axis=1).sum() / total)


def chance_purity(n_EC: Any) -> float:
    """Purity of a router that ignores domains: ``P_chance = max_d m_d / M``.

    Such a router sends every domain to expert e in the same proportion f_e, so its
    table of slot shares is the outer product ``n_chance[e, d] = f_e * m_d / M``
    (``m_d`` = routed slots of domain d, ``M = sum_d m_d``). Every expert's majority
    domain is then the largest one and ``sum_e max_d f_e m_d / M = max_d m_d / M``,
    whatever the loads. It is computed from the same table as P, so both refer to
    the same data.
    """
    n_EC = as_array(n_EC)
    m_C = n_EC.sum(axis=0)
    total = m_C.sum()
    if total <= 0:
        return math.nan
    return float(m_C.max() / total)


def chance_counts(n_EC: Any) -> np.ndarray:
    """``n_chance[e, d] = f_e * m_d``: the chance table scaled to ``sum n``.

    Same expert loads and domain totals as ``n``, but expert and domain independent.
    """
    n_EC = as_array(n_EC)
    total = n_EC.sum()
    if total <= 0:
        return np.zeros_like(n_EC)
    return np.outer(n_EC.sum(axis=1), n_EC.sum(axis=0)) / total


def nmi(n_EC: Any) -> float:
    """Normalized mutual information between expert and domain of a slot.

    ``I(e; d) = sum_{e,d} p(e,d) log(p(e,d) / (p(e) p(d)))`` with ``p = n / sum n``, and
    ``NMI = I / ((H(e) + H(d)) / 2)``: arithmetic-mean normalisation, scikit-learn's
    default for ``normalized_mutual_info_score``. Its conventions are kept so the
    two agree exactly: 1 when only one expert and one domain occur (both entropies
    are 0), 0 when the mutual information is 0. NaN for an empty table.
    """
    n_EC = as_array(n_EC)
    total = n_EC.sum()
    if total <= 0:
        return math.nan
    p_EC = n_EC / total
    p_E, p_C = p_EC.sum(axis=1), p_EC.sum(axis=0)
    if (p_E > 0).sum() == 1 and (p_C > 0).sum() == 1:
        return 1.0
    if (p_E > 0).sum() == 1 or (p_C > 0).sum() == 1:
        return 0.0  # one side has a single label, so I = 0 (sklearn returns 0 here too)
    e_idx, c_idx = np.nonzero(p_EC)
    p = p_EC[e_idx, c_idx]
    mi = float(np.clip((p * np.log(p / (p_E[e_idx] * p_C[c_idx]))).sum(), 0.0, None))
    if mi <= 1e-15:  # independent: avoid dividing rounding noise
        return 0.0
    normalizer = (_entropy(p_E) + _entropy(p_C)) / 2.0
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


def reference_counts(slots_per_domain_C: Any, groups: Sequence[Sequence[int]], n_experts: int) -> np.ndarray:
    """Counts ``n_ref[E, C]`` of the reference router on data with ``m_d`` slots per domain.

    The reference router spreads domain d's slots evenly over its group g_d:
    ``n_ref[e, d] = m_d / |g_d|`` for e in g_d, else 0. Groups may overlap (when
    E < D * k); then an expert serves several domains and ``P_ref < 1``.
    """
    m_C = as_array(slots_per_domain_C)
    if len(groups) != m_C.size:
        raise ValueError(f"groups has {len(groups)} entries but there are {m_C.size} domains")
    n_ref_EC = np.zeros((n_experts, m_C.size))
    for d, group in enumerate(groups):
        experts = np.unique(np.asarray(list(group), dtype=np.int64))
        if experts.size == 0:
            raise ValueError(f"domain {d} has an empty expert group")
        if experts.min() < 0 or experts.max() >= n_experts:
            raise ValueError(f"domain {d}: expert ids {experts.tolist()} out of range [0, {n_experts})")
        n_ref_EC[experts, d] = m_C[d] / experts.size
    return n_ref_EC


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
    n_EC: Any,
    drops_C: Any = None,
    gate_mass_sum_C: Any = None,
    tokens_C: Any = None,
    ref_EC: Any = None,
) -> dict[str, float]:
    """Every metric of record for one layer, keyed by the short names of routing_scalars()."""
    n_EC = as_array(n_EC)
    if n_EC.ndim != 2:
        raise ValueError(f"expected counts of shape [E, C], got {n_EC.shape}")
    f_E = load(n_EC)
    empty = bool(np.isnan(f_E).any())
    out = {
        "util": math.nan if empty else utilization(f_E),
        "entropy": load_entropy(f_E),
        "maxvio": math.nan if empty else max_vio(f_E),
        "dead": dead_share(f_E),
        "purity": purity(n_EC),
        "nmi": nmi(n_EC),
        "purity_chance": chance_purity(n_EC),
    }
    if drops_C is not None:
        out["drop_rate"] = drop_rate(float(n_EC.sum()), float(as_array(drops_C).sum()))
    if gate_mass_sum_C is not None and tokens_C is not None:
        out["gate_mass"] = gate_mass(float(as_array(gate_mass_sum_C).sum()), float(as_array(tokens_C).sum()))
    if ref_EC is not None:
        p_ref = purity(ref_EC)
        out["purity_ref"] = p_ref
        out["specialization"] = specialization(out["purity"], p_ref, out["purity_chance"])
    return out


def routing_scalars(
    counts_LEC: Any,
    layer_names: list[str],
    drops_LC: Any = None,
    gate_mass_sum_LC: Any = None,
    tokens_LC: Any = None,
    ref_counts_LEC: Any = None,
    prefix: str = "",
) -> dict[str, float]:
    """Scalars ``{prefix}{metric}/{layer}`` for every layer and ``{prefix}{metric}/mean``.

    metric is util, purity, nmi, entropy, maxvio, dead, purity_chance; drop_rate
    when drops are given; gate_mass when gate mass and tokens are given;
    specialization and purity_ref when reference counts are given. The mean is
    over layers, skipping NaN (empty) layers; NaN when every layer is NaN. A model
    without MoE layers (L = 0) gives an empty dict.
    """
    counts_LEC = as_array(counts_LEC)
    if counts_LEC.ndim != 3:
        raise ValueError(f"expected counts of shape [L, E, C], got {counts_LEC.shape}")
    if len(layer_names) != counts_LEC.shape[0]:
        raise ValueError(f"{len(layer_names)} layer names for {counts_LEC.shape[0]} layers")

    drops_LC = None if drops_LC is None else as_array(drops_LC)
    ref_counts_LEC = None if ref_counts_LEC is None else as_array(ref_counts_LEC)
    has_gate = gate_mass_sum_LC is not None and tokens_LC is not None
    gate_LC = as_array(gate_mass_sum_LC) if has_gate else None
    tokens_LC = as_array(tokens_LC) if has_gate else None
    per_layer = [
        layer_metrics(
            counts_LEC[i],
            drops_C=None if drops_LC is None else drops_LC[i],
            gate_mass_sum_C=None if gate_LC is None else gate_LC[i],
            tokens_C=None if tokens_LC is None else tokens_LC[i],
            ref_EC=None if ref_counts_LEC is None else ref_counts_LEC[i],
        )
        for i in range(counts_LEC.shape[0])
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
