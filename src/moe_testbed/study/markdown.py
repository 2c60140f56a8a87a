"""``STUDY/tables.md``: the verdicts and the per-configuration summary as Markdown, for docs and notes.

Written with summary.csv and verdicts.json from the same records, so a table pasted into a
document is the product's, not a hand copy. Cells are ``mean [low, high]``: the mean over
seeds and its 95% Student t interval (study/stats.py); one seed shows the value alone.
"""

from __future__ import annotations

from typing import Any

from moe_testbed.analysis.study_page import interval_of

# (column title, results column, digits) of the summary table, where the study has the column
COLUMNS = [
    ("val loss", "val/loss", 3),
    ("utilization", "val/util/mean", 3),
    ("purity", "val/purity/mean", 3),
    ("specialization", "val/specialization/mean", 3),
    ("train drop rate", "train/drop_rate/mean", 3),
]


def tables_markdown(study: str, summary: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> str:
    parts = [f"# {study}: verdicts and per-configuration means (95% intervals over seeds)", ""]
    if verdicts:
        parts += ["| claim | verdict | effect [95% interval] | source |", "| --- | --- | --- | --- |"]
        for v in verdicts:
            parts.append(f"| {v['claim']} | {v['verdict']} | {_effect(v.get('effect'))} | {v.get('source') or ''} |")
        parts.append("")
    # a column where some configuration has a value other than 0 (no drop-rate column in a dropless study)
    cols = [(t, key, d) for t, key, d in COLUMNS if any((interval_of(r, key) or (0,))[0] != 0 for r in summary)]
    parts += ["| configuration | seeds | " + " | ".join(t for t, _, _ in cols) + " |",
              "| --- | --- |" + " --- |" * len(cols)]  # fmt: skip
    for row in summary:
        cells = [_cell(row, key, d) for _, key, d in cols]
        parts.append(f"| {row['config']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(parts) + "\n"


def _cell(row: dict[str, Any], key: str, digits: int) -> str:
    iv = interval_of(row, key)
    if iv is None:
        return "-"
    mean, lo, hi = iv
    return f"{mean:.{digits}f}" if lo is None else f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _effect(eff: dict[str, Any] | None) -> str:
    if not eff or eff.get("estimate") is None:
        return "-"
    est, lo, hi = eff["estimate"], eff.get("low"), eff.get("high")
    if lo is None or hi is None:
        return f"{est:+.3g}"
    return f"{est:+.3g} [{lo:+.3g}, {hi:+.3g}]"
