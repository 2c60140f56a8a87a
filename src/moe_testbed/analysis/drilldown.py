"""A page to browse which text each expert takes: its top domains and tokens, and snippets with its tokens marked.

Written by ``moe-testbed eval`` beside the trace (``drilldown.html``), one section per MoE
layer and expert, from the trace alone (routing/trace.py) and the mix's tokenizer. A
snippet is a window of the trace's tokens around one token whose first expert (its
highest kept gate) is this expert; inside the window every token that expert took is
marked, so runs of marked text show what it specialises in.
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

import numpy as np

from moe_testbed.analysis.token_routing import first_experts
from moe_testbed.io import atomic_write_text
from moe_testbed.routing.trace import Trace

STYLE = ("body{font-family:sans-serif;max-width:70em;margin:auto}mark{background:#fd6}"
         ".snip{font-family:monospace;white-space:pre-wrap;border-left:3px solid #ccc;padding:2px 8px;margin:4px 0}"
         "h3{margin-bottom:2px}.meta{color:#555}")  # fmt: skip


def expert_sections(trace: Trace, layer: int, decode, snippets: int = 3, window: int = 12, seed: int = 0) -> list[str]:
    """HTML of every used expert of ``layer``: its slot share by domain, its commonest tokens, a few snippets."""
    first = first_experts(trace)[layer]
    rng = np.random.default_rng(seed)
    out = []
    for e in np.unique(first[first >= 0]):
        rows = np.flatnonzero(first == e)
        doms = Counter(trace.domains[d] for d in trace.domain[rows])
        toks = Counter(trace.token[rows].tolist())
        head = ", ".join(f"{html.escape(d)} {n / len(rows):.0%}" for d, n in doms.most_common(3))
        common = ", ".join(f"<code>{html.escape(repr(decode([t])))}</code> {n}" for t, n in toks.most_common(8))
        parts = [f"<h3>expert {e}</h3><div class='meta'>{len(rows)} tokens as first expert; domains: {head}; "
                 f"tokens: {common}</div>"]  # fmt: skip
        for r in sorted(rng.choice(rows, size=min(snippets, len(rows)), replace=False)):
            same = np.flatnonzero(trace.seq == trace.seq[r])
            lo, hi = max(same[0], r - window), min(same[-1], r + window)
            pieces = [
                f"<mark>{html.escape(decode([trace.token[i]]))}</mark>" if first[i] == e
                else html.escape(decode([trace.token[i]]))
                for i in range(lo, hi + 1)
            ]  # fmt: skip
            parts.append(f"<div class='snip'>[{html.escape(trace.domains[trace.domain[r]])}] {''.join(pieces)}</div>")
        out.append("".join(parts))
    return out


def write_drilldown(path: Path, trace: Trace, decode, title: str, layers: list[int] | None = None) -> Path:
    """The page for ``layers`` (default: the first and the last MoE layer)."""
    L = trace.experts.shape[0]
    layers = layers if layers is not None else sorted({0, L - 1})
    body = [f"<h1>{html.escape(title)}</h1><p>Which text each expert takes as a token's first expert (highest kept "
            "gate), from the evaluation trace; marked: the expert's tokens inside each snippet.</p>"]  # fmt: skip
    for layer in layers:
        body.append(f"<h2>{html.escape(trace.layers[layer])}</h2>")
        body += expert_sections(trace, layer, decode)
    page = f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>"
    atomic_write_text(path, page + "".join(body))
    return path
