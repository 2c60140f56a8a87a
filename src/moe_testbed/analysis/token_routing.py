"""Analyses of per-token routing (a trace, routing/trace.py): which tokens experts take, not only how many.

Array legend: L MoE layers, N traced tokens, K experts per token, E experts, V vocabulary,
Q token classes. Every count is over *kept* slots (a slot evaluation capacity dropped
went to no expert). Definitions, with their sources, are in docs/metrics.md#token-level.
"""

from __future__ import annotations

import math
import re
import unicodedata

import numpy as np

from moe_testbed.routing.metrics import nanmean, nmi, purity
from moe_testbed.routing.trace import Trace

TOKEN_CLASSES = ("whitespace", "punctuation", "digits", "word", "identifier", "other")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def token_class(text: str) -> str:
    """The class of one decoded token (the testbed's own classes, docs/metrics.md#token-level)."""
    core = text.strip()
    if not core:
        return "whitespace"
    if "\ufffd" in core:  # a byte-level piece of a multi-byte character
        return "other"
    if all(unicodedata.category(ch)[0] in "PS" for ch in core):
        return "punctuation"
    if core.isdigit():
        return "digits"
    if core.isalpha():
        return "word"
    if _IDENTIFIER.match(core):  # letters with digits or underscores: names in code
        return "identifier"
    return "other"


def token_class_ids(tokens_N: np.ndarray, decode) -> np.ndarray:
    """The index in TOKEN_CLASSES of each token id of ``tokens_N`` (``decode([id]) -> str``; each distinct id
    decoded once), int8."""
    ids, inverse = np.unique(tokens_N, return_inverse=True)
    classes = np.array([TOKEN_CLASSES.index(token_class(decode([int(i)]))) for i in ids], dtype=np.int8)
    return classes[inverse.reshape(-1)]


def vocabulary_classes(decode, vocab_size: int) -> np.ndarray:
    """``class_V``: the class index of every token id of the vocabulary."""
    return token_class_ids(np.arange(vocab_size), decode).astype(np.int64)


def trace_classes(trace: Trace, class_V: np.ndarray | None) -> np.ndarray | None:
    """Each traced token's class: the trace's own column, else ``class_V`` of its id, else None (unknown)."""
    if trace.token_class is not None:
        return trace.token_class
    return None if class_V is None else class_V[trace.token]


def _slot_counts(trace: Trace, layer: int, label_N: np.ndarray, n_labels: int) -> np.ndarray:
    """``n[e, label]`` over the layer's kept slots: [E, n_labels]."""
    E = int(trace.meta.get("n_experts", trace.experts.max() + 1))
    e = trace.experts[layer]
    lab = np.broadcast_to(label_N[:, None], e.shape)
    keep = trace.kept[layer]
    out = np.zeros((E, n_labels), dtype=np.int64)
    np.add.at(out, (e[keep], lab[keep]), 1)
    return out


def syntax_or_topic(trace: Trace, class_V: np.ndarray | None) -> list[dict[str, float]]:
    """Per layer: how much of the routing the token's class explains, beside how much its domain does.

    ``nmi_class`` = NMI(expert; token class) and ``nmi_domain`` = NMI(expert; domain) over
    the kept slots, with the purities beside them. A router that specialises by syntax has
    the larger class NMI; by topic, the larger domain NMI (the design-choices paper's
    token-level vs sequence-level finding, arXiv 2402.13089). Without the token classes
    (no tokenizer to decode the ids with) the class columns are NaN.
    """
    cls_N, Q, C = trace_classes(trace, class_V), len(TOKEN_CLASSES), len(trace.domains)
    out = []
    for layer in range(trace.experts.shape[0]):
        n_dom = _slot_counts(trace, layer, trace.domain, C)
        n_cls = _slot_counts(trace, layer, cls_N, Q) if cls_N is not None else None
        out.append({"nmi_class": nmi(n_cls) if n_cls is not None else math.nan, "nmi_domain": nmi(n_dom),
                    "purity_class": purity(n_cls) if n_cls is not None else math.nan,
                    "purity_domain": purity(n_dom)})  # fmt: skip
    return out


def vocabulary_specialization(trace: Trace, min_count: int = 8, top: int = 10) -> list[dict[str, float]]:
    """Per layer, the OLMoE view of vocabulary specialization (Muennighoff et al. 2024, sec. 5).

    ``token_concentration``: over token ids with at least ``min_count`` kept slots, the
    share of an id's slots on its most frequent expert (slot-weighted mean; 1/E..1, 1 =
    every occurrence of an id goes to one expert). ``expert_top_tokens``: the share of an
    expert's slots taken by its ``top`` most frequent ids (mean over experts with slots).
    """
    V = int(trace.token.max()) + 1 if trace.token.size else 1
    out = []
    for layer in range(trace.experts.shape[0]):
        n_EV = _slot_counts(trace, layer, trace.token, V)
        per_V = n_EV.sum(0)
        common = per_V >= min_count
        conc = n_EV[:, common].max(0).sum() / max(per_V[common].sum(), 1) if common.any() else math.nan
        per_E = n_EV.sum(1)
        used = per_E > 0
        top_share = np.sort(n_EV[used], axis=1)[:, -top:].sum(1) / per_E[used]
        out.append({"token_concentration": float(conc), "expert_top_tokens": float(top_share.mean())})
    return out


def co_activation(trace: Trace, layer: int) -> np.ndarray:
    """``P[i, j]``: the share of tokens holding expert i that also hold j (every pair of a token's top-k).

    OLMoE's analysis script counts only the adjacent pairs of the ordered top-k; this
    counts all ``K (K - 1) / 2`` pairs. The diagonal is 0. Rows of unused experts are 0.
    """
    E = int(trace.meta.get("n_experts", trace.experts.max() + 1))
    e, keep = trace.experts[layer], trace.kept[layer]
    both = np.zeros((E, E), dtype=np.int64)
    K = e.shape[1]
    for a in range(K):
        for b in range(K):
            if a != b:
                ok = keep[:, a] & keep[:, b]
                np.add.at(both, (e[ok, a], e[ok, b]), 1)
    holders = np.zeros(E, dtype=np.int64)
    np.add.at(holders, e[keep], 1)
    return both / np.maximum(holders, 1)[:, None]


def co_activation_summary(trace: Trace) -> list[dict[str, float]]:
    """Per layer: the mean over used experts of their strongest partner's share (0 for top-1)."""
    out = []
    for layer in range(trace.experts.shape[0]):
        P = co_activation(trace, layer)
        used = P.sum(1) > 0
        out.append({"top_partner_share": float(P[used].max(1).mean()) if used.any() else 0.0})
    return out


def layer_consistency(trace: Trace) -> list[dict[str, float]]:
    """For each adjacent pair of MoE layers: how predictable a token's first expert at l+1 is from l's.

    The first expert is the token's highest-gate kept slot. ``nmi`` = NMI(first expert at
    l; at l+1); ``predictability`` = the share of tokens whose expert at l+1 is the most
    common one among tokens sharing their expert at l (1/E..1). The testbed's own definitions.
    """
    E = int(trace.meta.get("n_experts", trace.experts.max() + 1))
    first = first_experts(trace)
    out = []
    for layer in range(first.shape[0] - 1):
        a, b = first[layer], first[layer + 1]
        ok = (a >= 0) & (b >= 0)
        n = np.zeros((E, E), dtype=np.int64)
        np.add.at(n, (a[ok], b[ok]), 1)
        out.append({"nmi": nmi(n), "predictability": float(n.max(1).sum() / max(n.sum(), 1))})
    return out


def first_experts(trace: Trace) -> np.ndarray:
    """Each token's highest-gate kept expert per layer, [L, N] (-1 where every slot was dropped)."""
    gates = np.where(trace.kept, trace.gates, -np.inf)
    best = gates.argmax(-1)
    first = np.take_along_axis(trace.experts, best[..., None], -1)[..., 0]
    return np.where(np.isfinite(gates.max(-1)), first, -1)


def gate_statistics(trace: Trace) -> list[dict[str, float]]:
    """Per layer: mean score entropy over log E (0 = certain, 1 = uniform), mean k-th vs (k+1)-th margin, top gate."""
    E = int(trace.meta.get("n_experts", trace.experts.max() + 1))
    out = []
    for layer in range(trace.experts.shape[0]):
        out.append({"entropy": nanmean(trace.entropy[layer]) / math.log(E) if E > 1 else 0.0,
                    "margin": float(np.nanmean(trace.margin[layer])) if np.isfinite(trace.margin[layer]).any()
                    else math.nan, "top_gate": float(trace.gates[layer].max(-1).mean())})  # fmt: skip
    return out


def router_saturation(traces: list[Trace]) -> list[dict]:
    """Per trace (in step order): the mean share of a token's top-k at that step that it still has at the last.

    OLMoE's router saturation (Muennighoff et al. 2024, sec. 5): ``|S_t ∩ S_final| / k``
    for each token's expert set S, averaged over tokens, per layer. The traces of one run
    hold the same first validation tokens at every evaluation, so no checkpoint is needed.
    Kept and dropped slots alike: saturation is about the router's choice.
    """
    final = traces[-1]
    E = int(final.meta.get("n_experts", final.experts.max() + 1))

    def onehot(t: Trace, n: int) -> np.ndarray:  # [L, n, E]
        out = np.zeros((*t.experts.shape[:1], n, E), dtype=bool)
        L, _, K = t.experts.shape
        for k in range(K):
            np.put_along_axis(out, t.experts[:, :n, k : k + 1], True, axis=2)
        return out

    out = []
    for t in traces:
        n = min(t.token.size, final.token.size)
        if not np.array_equal(t.token[:n], final.token[:n]):
            raise ValueError("router_saturation needs traces of the same tokens (one run's evaluations)")
        overlap_L = (onehot(t, n) & onehot(final, n)).sum(-1).mean(-1) / t.experts.shape[2]
        out.append({"step": t.meta.get("step"), "per_layer": overlap_L.tolist(), "mean": float(overlap_L.mean())})
    return out


def analyse(trace: Trace, class_V: np.ndarray | None = None) -> dict:
    """Every analysis of one trace, per layer (names as the trace has them) and as means over layers."""
    parts = {"syntax_or_topic": syntax_or_topic(trace, class_V), "vocabulary": vocabulary_specialization(trace),
             "co_activation": co_activation_summary(trace), "gates": gate_statistics(trace)}  # fmt: skip
    out: dict = {"layers": trace.layers, "tokens": int(trace.token.size)}
    for name, rows in parts.items():
        out[name] = {"per_layer": rows, "mean": {k: nanmean([r[k] for r in rows]) for k in rows[0]}}
    pairs = layer_consistency(trace)
    out["layer_consistency"] = {"per_pair": pairs, "mean": {k: nanmean([r[k] for r in pairs]) for k in
                                                             pairs[0]} if pairs else {}}  # fmt: skip
    return out
