"""Tables (rich on a terminal, Markdown for the docs) and the JSON file of a bench run."""

from __future__ import annotations

import json
from pathlib import Path


def _ms(q: dict | None) -> str:
    if not q:
        return "-"
    return (
        f"{q['median']:.2f} [{q['q1']:.2f}-{q['q3']:.2f}]"
        if q["median"] < 100
        else (f"{q['median']:.0f} [{q['q1']:.0f}-{q['q3']:.0f}]")
    )


def _ratio(q: dict | None, pct: bool = False) -> str:
    if not q:
        return "-"
    if pct:
        return f"{q['median']:+.1f}% [{q['q1']:+.1f}, {q['q3']:+.1f}]"
    return f"{q['median']:.3f} [{q['q1']:.3f}-{q['q3']:.3f}]"


def _mib(row: dict) -> str:
    return f"{row['peak_mib']:.1f}" if "peak_mib" in row else "-"


def _guard(row: dict) -> str:
    g = row.get("guard")
    if g is None:
        return "n/a"
    return f"ok {g['max_rel_err']:.1e}" if g["ok"] else f"REFUSED: {g['message']}"


def tables(result: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every section present, targets last."""
    out = []
    if "layer" in result:
        rows = []
        for s in result["layer"]["shapes"]:
            sh = s["shape"]
            desc = f"{s['name']} (d{sh['d_model']} H{sh['expert_hidden']} E{sh['n_experts']} k{sh['top_k']} T{sh['tokens']})"
            for name, v in s["variants"].items():
                r = s["ratios"].get(f"{name}/dense")
                extra = ""
                if name == "moe" and "hf_best/moe" in s["ratios"]:
                    hb = s["ratios"]["hf_best/moe"]
                    extra = f"{hb['median']:.3f}x vs {hb['versus']}"
                rows.append([desc, v["label"], _ms(v.get("ms")), "1" if name == "dense" else _ratio(r),
                             extra, _mib(v), _guard(v)])  # fmt: skip
                desc = ""
        out.append(("MoE layer, forward + backward (ms per call; ratio = per-pair median [IQR])",
                    ["shape", "variant", "ms", "ratio to dense", "speed-up over HF best", "peak MiB", "guard"], rows))  # fmt: skip
    if "step" in result:
        s = result["step"]
        rows = []
        for name, v in s["variants"].items():
            tps = f"{v['tokens_per_s']:.0f}" if "tokens_per_s" in v else "-"
            r = s["ratios"].get("moe_tokens_per_s/dense") if name == "moe" else None
            rows.append([v["label"], _ms(v.get("ms")), tps, _ratio(r) if r else ("1" if name == "dense" else "-"),
                         _mib(v)])  # fmt: skip
        out.append((f"Training step of the quick model ({s['tokens_per_step']} tokens, grad_accum {s['grad_accum']})",
                    ["variant", "ms per step", "tokens/s", "tokens/s ratio to dense", "peak MiB"], rows))  # fmt: skip
    if "balance" in result:
        s = result["balance"]
        rows = []
        for name, v in s["variants"].items():
            pct = s["overhead_pct"].get(name)
            rows.append([name, _ms(v.get("ms")), "0 (baseline)" if name == "none" else _ratio(pct, pct=True), _mib(v)])
        for name, why in s.get("skipped", {}).items():
            rows.append([name, "skipped", why, "-"])
        out.append((f"Balancing methods: extra time of a whole quick-model step over method none "
                    f"(grad_accum {s.get('grad_accum', '?')})",
                    ["method@scope", "ms per step", "extra step time", "peak MiB"], rows))  # fmt: skip
    if "stats" in result:
        s = result["stats"]
        rows = [[v["label"], _ms(v.get("ms")), _mib(v)] for v in s["variants"].values()]
        o = s.get("overhead_pct")
        if o:
            rows.append(["recording, per step", _ratio(o["record"], pct=True), ""])
            rows.append([f"host read every {o['log_every']} steps", f"{o['host_read_ms']:.2f} ms = "
                         f"{o['host_read_amortised']:.2f}%", ""])  # fmt: skip
            rows.append(["total", f"{o['total']:+.2f}%", ""])
        out.append((f"Routing statistics (RoutingRecorder), quick-model step, grad_accum {s.get('grad_accum', '?')}",
                    ["variant", "ms per step", "peak MiB"], rows))  # fmt: skip
    if result.get("targets"):
        rows = []
        for t in result["targets"]:
            v = "-" if t["value"] is None else f"{t['value']:.3f}"
            rows.append([t["target"], v, f"{t['op']} {t['limit']}", "PASS" if t["pass"] else "MISS"])
        out.append(("Targets", ["target", "measured", "limit", "result"], rows))
    return out


def print_rich(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    m = result["meta"]
    console.print(f"[bold]moe-testbed bench[/] torch {m['torch']}, transformers {m.get('transformers')}, "
                  f"{m['device']} {m['dtype']}, {m['threads']} threads, {m.get('processor', '')}; "
                  f"{m.get('duration_s', '?')} s{' (QUICK: not a measurement)' if m['quick'] else ''}")  # fmt: skip
    for title, header, rows in tables(result):
        table = Table(title=title, title_justify="left")
        for h in header:
            table.add_column(h)
        for r in rows:
            style = "red" if r[-1] == "MISS" or str(r[-1]).startswith("REFUSED") else None
            table.add_row(*r, style=style)
        console.print(table)


def markdown(result: dict) -> str:
    parts = []
    for title, header, rows in tables(result):
        parts.append(f"**{title}**\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "---|" * len(header))
        parts += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        parts.append("")
    return "\n".join(parts)


def write_json(result: dict, path: str | Path) -> None:
    from moe_testbed.io import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
