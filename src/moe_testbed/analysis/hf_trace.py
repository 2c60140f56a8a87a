"""The per-token side of ``moe-testbed hf``: the probed tokens' trace, its analyses and drill-down page.

The trace (routing/trace.py) is in the checkpoint's token ids, which the mix's
tokenizer cannot decode, so each token's class (analysis/token_routing.py) is
decided here with the checkpoint's tokenizer and stored in the trace
(``token_class``), and the drill-down page is written here too. ``moe-testbed
report`` then reads an hf run's token-level table like a trained run's.

Gates and scores of a pretrained router: the gate weights are the router's own
float [tokens, k] output where it returns one (the weights the model mixes
with), else its scores at the chosen experts, else the softmax of its logits
there; the entropy and margin columns are over the softmax of the router's
logits for every family (for sigmoid-scored families such as DeepSeek-V3 or
Llama4 that is the softmax view of the same logits, not the scores they select by).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from moe_testbed.analysis.drilldown import write_drilldown
from moe_testbed.analysis.token_routing import analyse, token_class_ids
from moe_testbed.io import atomic_write_json
from moe_testbed.routing.trace import RoutingTrace, load_trace, save_trace, trace_path


def write_hf_trace(out: Path, trace: RoutingTrace, layers: list[str], domains: list[str], tokenizer,
                   meta: dict) -> dict:  # fmt: skip
    """Write ``traces/step_000000.parquet``, ``analyses.json`` and ``drilldown.html`` into ``out``; the analyses."""
    table = trace.table(layers, domains, {"step": 0, **meta})
    decode = tokenizer.decode
    classes = token_class_ids(table.column("token").to_numpy(), decode)
    table = table.append_column("token_class", pa.array(classes, type=pa.int8()))
    path = trace_path(out, 0)
    save_trace(path, table)
    saved = load_trace(path)
    analyses = analyse(saved)
    atomic_write_json(out / "analyses.json", {**meta, **analyses})
    write_drilldown(out / "drilldown.html", saved, decode, f"{meta.get('model', out.name)} on {meta.get('mix', '')}")
    return analyses
