"""The token-level table of a run's report: the analyses of its last evaluation's trace (analysis/token_routing.py)."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from moe_testbed.analysis.drilldown import write_drilldown
from moe_testbed.analysis.token_routing import analyse, router_saturation, vocabulary_classes
from moe_testbed.data.paths import preset_dir
from moe_testbed.data.storage import read_manifest
from moe_testbed.io import atomic_write_text
from moe_testbed.routing.trace import load_trace

COLUMNS = ["layer", "NMI expert~token class", "NMI expert~domain", "token concentration", "expert top-10 share",
           "top partner share", "score entropy / log E", "k vs k+1 margin", "next-layer predictability"]  # fmt: skip


def _mix_dir(config: dict) -> Path | None:
    """The run's mix, if it is on this machine (never built here: a report does not build data)."""
    data = config.get("data", {}) or {}
    path = Path(data["dir"]).expanduser() if data.get("dir") else preset_dir(str(data.get("preset", "default")))
    return path if read_manifest(path) is not None else None


@lru_cache(maxsize=4)
def _domain_mix(mix: Path):
    """The mix (its tokenizer), opened once for all the runs of a report that share it."""
    from moe_testbed.data import DomainMix

    return DomainMix(mix)


@lru_cache(maxsize=4)
def _classes(mix: Path) -> np.ndarray:
    """Every token id's class under the mix's tokenizer (a study's runs share one mix: decoded once)."""
    m = _domain_mix(mix)
    return vocabulary_classes(m.decode, m.vocab_size)


def token_level_table(run_path: Path, config: dict) -> tuple[str, list[str], list[list]] | None:
    """(caption, columns, rows) for the run's last trace, or None without one."""
    traces = sorted((Path(run_path) / "traces").glob("step_*.parquet"))
    if not traces:
        return None
    trace = load_trace(traces[-1])
    mix = _mix_dir(config)
    # An hf trace carries its classes (the checkpoint's token ids); a trained run's come from its mix,
    # and without the mix on this machine they are unknown (the class column stays empty).
    a = analyse(trace, _classes(mix) if mix is not None and trace.token_class is None else None)
    rows = []
    for i, name in enumerate(a["layers"]):
        st, vo, co, ga = (a[k]["per_layer"][i] for k in ("syntax_or_topic", "vocabulary", "co_activation", "gates"))
        pairs = a["layer_consistency"]["per_pair"]
        rows.append([name, None if math.isnan(st["nmi_class"]) else st["nmi_class"], st["nmi_domain"],
                     vo["token_concentration"],
                     vo["expert_top_tokens"], co["top_partner_share"], ga["entropy"], ga["margin"],
                     pairs[i]["predictability"] if i < len(pairs) else None])  # fmt: skip
    caption = (f"Token-level routing of {a['tokens']} validation tokens at step {trace.meta.get('step', '?')} "
               f"({traces[-1].name}); definitions in docs/metrics.md#token-level-analyses.")  # fmt: skip
    if len(traces) > 1:  # router saturation: how much of the final routing each evaluation already had
        sat = router_saturation([load_trace(p) for p in traces[:-1]] + [trace])
        caption += (
            " Router saturation (share of a token's final top-k already chosen): "
            + ", ".join(f"step {r['step']} {r['mean']:.2f}" for r in sat)
            + "."
        )
    return caption, COLUMNS, rows


def drilldown_page(run_path: Path, config: dict, out: Path, title: str) -> Path | None:
    """Write ``out``, the page of which text each expert takes at the run's last trace; None without one.

    A trained run's page is drawn from its trace and its mix's tokenizer; an hf probe
    writes its own (``drilldown.html`` in the run directory, with the checkpoint's
    tokenizer), which is copied.
    """
    own = Path(run_path) / "drilldown.html"
    if own.is_file():
        atomic_write_text(out, own.read_text(encoding="utf-8"))
        return out
    traces = sorted((Path(run_path) / "traces").glob("step_*.parquet"))
    mix = _mix_dir(config)
    if not traces or mix is None:
        return None
    trace = load_trace(traces[-1])
    return write_drilldown(out, trace, _domain_mix(mix).decode, f"{title} at step {trace.meta.get('step', '?')}")
