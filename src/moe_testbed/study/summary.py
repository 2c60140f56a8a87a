"""Per configuration, over its seeds: the summary table and the verdicts of the study's claims.

A configuration is a run without its seed (``lbl-global`` for the runs
``lbl-global-s0``, ``lbl-global-s1``, ...). ``summary.csv`` has one row per
configuration: the number of seeds and, for every metric, the mean, the sample
standard deviation and the 95% Student t interval of the mean (study/stats.py).
``verdicts.json`` and ``verdicts.csv`` hold every claim of the spec with its
verdict and effect (study/claims.py); ``tables.md`` both as Markdown
(study/markdown.py). All are rebuilt with the results table,
from the same records, so a resumed or partial study's files are always current.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe_testbed.io import atomic_write_json, atomic_write_text, csv_text
from moe_testbed.study.claims import Verdict, evaluate, format_effect, parse_claim
from moe_testbed.study.markdown import tables_markdown
from moe_testbed.study.stats import mean_interval, sample_std

SUMMARY_FILE, VERDICTS_FILE, TABLES_FILE = "summary.csv", "verdicts.json", "tables.md"


def seed_values(rows: list[dict[str, Any]], metrics: list[str]) -> dict[str, dict[str, dict[int, float]]]:
    """``{metric: {config: {seed: value}}}`` of the complete runs."""
    out: dict[str, dict[str, dict[int, float]]] = {m: {} for m in metrics}
    for row in rows:
        if row.get("status") != "complete":
            continue
        for m in metrics:
            value = row.get(m)
            if isinstance(value, int | float):
                out[m].setdefault(row["config"], {})[int(row.get("seed") or 0)] = float(value)
    return out


def summary_rows(rows: list[dict[str, Any]], metrics: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per configuration (in the order of the runs): seeds, then mean/std/low/high of every metric."""
    values = seed_values(rows, metrics)
    configs = list(dict.fromkeys(r["config"] for r in rows))
    columns = ["config", "seeds"] + [f"{m} {s}" for m in metrics for s in ("mean", "std", "low", "high")]
    out = []
    for config in configs:
        seeds = sorted({int(r.get("seed") or 0) for r in rows if r["config"] == config and r["status"] == "complete"})
        row: dict[str, Any] = {"config": config, "seeds": len(seeds)}
        for m in metrics:
            vals = list(values[m].get(config, {}).values())
            iv = mean_interval(vals)
            row.update({f"{m} mean": iv.estimate, f"{m} std": sample_std(vals), f"{m} low": iv.low,
                        f"{m} high": iv.high})  # fmt: skip
        out.append(row)
    return out, columns


def study_verdicts(plan: dict[str, Any], rows: list[dict[str, Any]]) -> list[Verdict]:
    claims = [parse_claim(entry, "plan.json claims") for entry in plan.get("claims", [])]
    metrics = sorted({m for c in claims for m in c.metrics()})
    values = seed_values(rows, metrics)
    moe = plan.get("moe_configs") or list(dict.fromkeys(r["config"] for r in rows))
    return [evaluate(c, values, moe) for c in claims]


def write_summary(study_dir: Path, plan: dict[str, Any], rows: list[dict[str, Any]], metrics: list[str]) -> None:
    table, columns = summary_rows(rows, metrics)
    atomic_write_text(Path(study_dir) / SUMMARY_FILE, csv_text(table, columns))
    verdicts = study_verdicts(plan, rows)
    atomic_write_json(Path(study_dir) / VERDICTS_FILE, [v.to_json() for v in verdicts])
    vrows = [{"claim": v.claim.text, "verdict": v.verdict, "effect": format_effect(v.effect), "detail": v.detail,
              "source": v.claim.source} for v in verdicts]  # fmt: skip
    atomic_write_text(
        Path(study_dir) / "verdicts.csv", csv_text(vrows, ["claim", "verdict", "effect", "detail", "source"])
    )
    name = plan.get("study") or Path(study_dir).name
    atomic_write_text(Path(study_dir) / TABLES_FILE, tables_markdown(name, table, [v.to_json() for v in verdicts]))


def read_verdicts(study_dir: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((Path(study_dir) / VERDICTS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def verdict_lines(verdicts: list[dict[str, Any]]) -> list[str]:
    """The verdict table for the terminal: one line per claim."""
    if not verdicts:
        return []
    width = max(len(v["claim"]) for v in verdicts)
    lines = [f"{'claim':<{width}}  {'verdict':<13}  effect [95% interval]"]
    for v in verdicts:
        eff = v.get("effect")
        text = "-" if not eff else _effect_text(eff)
        lines.append(f"{v['claim']:<{width}}  {v['verdict']:<13}  {text}")
    return lines


def _effect_text(eff: dict[str, Any]) -> str:
    est, lo, hi = (eff.get(k) for k in ("estimate", "low", "high"))
    if est is None:
        return "-"
    if lo is None or hi is None:
        return f"{est:+.3g} (no interval: {eff.get('n', 0)} seed{'s' if eff.get('n') != 1 else ''})"
    return f"{est:+.3g} [{lo:+.3g}, {hi:+.3g}]"
