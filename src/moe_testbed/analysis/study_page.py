"""The head of a study's report: its verdicts, its per-configuration summary, intervals and seed bands.

A study (moe_testbed.study) hands the report a :class:`StudyOverview`: the
verdicts of its claims, its summary table (mean and 95% interval over seeds of
every metric, per configuration) and which runs are the seeds of which
configuration. The report then leads with the verdicts, shows one compact
table that fits a laptop screen, a scatter of the configurations with their
intervals, learning curves with seed bands (the range over seeds), and one
section per configuration drawn from its first seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from moe_testbed.analysis.plots import _layer_colors, series
from moe_testbed.analysis.rundir import Run

# (column title, summary metric): the compact table
SUMMARY_COLUMNS = (
    ("val loss", "val/loss"),
    ("util (val)", "val/util/mean"),
    ("util (train)", "train/util/mean"),
    ("purity", "val/purity/mean"),
    ("specialization", "val/specialization/mean"),
    ("drop (train)", "train/drop_rate/mean"),
)
BAND_METRICS = (("specialization", "val/specialization/mean"), ("utilization", "val/util/mean"),
                ("validation loss", "val/loss"))  # fmt: skip


@dataclass
class StudyOverview:
    name: str
    description: str = ""
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # study/summary.py: verdicts.json
    summary: list[dict[str, Any]] = field(default_factory=list)  # study/summary.py: summary.csv rows
    groups: dict[str, list[str]] = field(default_factory=dict)  # configuration -> run names, first seed first
    notes: list[str] = field(default_factory=list)


def interval_of(row: dict[str, Any], metric: str) -> tuple[float, float | None, float | None] | None:
    """(mean, low, high) of a summary.csv row's metric; no bounds with one seed; None without a mean."""
    mean, lo, hi = (row.get(f"{metric} {k}") for k in ("mean", "low", "high"))
    if not _finite(mean):
        return None
    if not (_finite(lo) and _finite(hi)):
        return float(mean), None, None
    return float(mean), float(lo), float(hi)


def mean_text(row: dict[str, Any], metric: str) -> str:
    """``mean ± half-width`` of the 95% interval (the mean alone for one seed)."""
    iv = interval_of(row, metric)
    if iv is None:
        return "–"
    mean, lo, hi = iv
    return f"{mean:.3f}" if lo is None else f"{mean:.3f} ± {(hi - lo) / 2:.3f}"


def summary_table(overview: StudyOverview) -> tuple[list[str], list[list[str]]]:
    columns = ["configuration", "seeds", *(title for title, _ in SUMMARY_COLUMNS)]
    rows = [[r["config"], str(r.get("seeds", "")), *(mean_text(r, m) for _, m in SUMMARY_COLUMNS)]
            for r in overview.summary]  # fmt: skip
    return columns, rows


def verdict_table(overview: StudyOverview) -> tuple[list[str], list[list[str]]]:
    rows = []
    for v in overview.verdicts:
        eff = v.get("effect") or {}
        est, lo, hi = eff.get("estimate"), eff.get("low"), eff.get("high")
        if est is None:
            effect = "–"
        elif lo is None or hi is None:
            effect = f"{est:+.3f} (no interval)"
        else:
            effect = f"{est:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        rows.append([v["claim"], v["verdict"], effect, v.get("source") or ""])
    return ["claim", "verdict", "effect [95% interval]", "source"], rows


def interval_scatter_figure(overview: StudyOverview, ref_util: float) -> Figure | None:
    """Specialization vs utilization per configuration: the mean over seeds and its 95% interval."""
    pts = []
    for r in overview.summary:
        x, y = (r.get(f"{m} mean") for m in ("val/util/mean", "val/specialization/mean"))
        if _finite(x) and _finite(y):
            err = [_half(r, m) for m in ("val/util/mean", "val/specialization/mean")]
            pts.append((r["config"], float(x), float(y), *err))
    if not pts:
        return None
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    ax.axhline(1.0, color="tab:red", ls="--", lw=1)
    ax.axhline(0.0, color="0.5", ls=":", lw=1)
    if math.isfinite(ref_util):
        ax.scatter([ref_util], [1.0], marker="*", s=220, color="tab:red", zorder=3, label="reference router")
    for name, x, y, ex, ey in pts:
        ax.errorbar([x], [y], xerr=[ex], yerr=[ey], fmt="o", ms=5, capsize=3, color="tab:blue", zorder=3)
        ax.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set_xlim(min([0.5, *(p[1] - p[3] for p in pts)]) - 0.02, 1.02)
    ax.set_xlabel("utilization U (1 = even load)")
    ax.set_ylabel("specialization (0 = chance, 1 = reference)")
    ax.set_title("per configuration: mean over seeds, bars = 95% interval")
    ax.grid(alpha=0.3)
    if math.isfinite(ref_util):
        ax.legend(fontsize=8, loc="lower left")
    return fig


def seed_band_figure(groups: dict[str, list[Run]]) -> Figure | None:
    """Validation metrics over training: the mean over seeds per configuration, the band their range."""
    fig = Figure(figsize=(14, 4), layout="constrained")
    axes = fig.subplots(1, len(BAND_METRICS))
    colors = _layer_colors(len(groups), cmap="tab10" if len(groups) <= 10 else "tab20")
    drawn = False
    for color, (config, runs) in zip(colors, groups.items()):
        for ax, (_, key) in zip(axes, BAND_METRICS):
            curves = [series(r, key) for r in runs]
            curves = [c for c in curves if c[0].size]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c[0].tolist()) for c in curves)))
            if not steps:
                continue
            vals = np.array([[dict(zip(c[0].tolist(), c[1].tolist()))[s] for s in steps] for c in curves])
            ax.plot(steps, vals.mean(0), color=color, lw=1.6, label=config)
            if len(curves) > 1:
                ax.fill_between(steps, vals.min(0), vals.max(0), color=color, alpha=0.18, lw=0)
            drawn = True
    if not drawn:
        return None
    for ax, (title, _) in zip(axes, BAND_METRICS):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle("over training, per configuration: mean over seeds (line) and their range (band)", fontsize=11)
    return fig


def _half(row: dict[str, Any], metric: str) -> float:
    lo, hi = row.get(f"{metric} low"), row.get(f"{metric} high")
    return (float(hi) - float(lo)) / 2 if _finite(lo) and _finite(hi) else 0.0


def _finite(value: Any) -> bool:
    try:
        return value is not None and value != "" and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def first_seeds(overview: StudyOverview, names: Sequence[str]) -> list[str]:
    """The run drawn for each configuration: its first seed that is among ``names``."""
    have = set(names)
    return [next(n for n in runs if n in have) for runs in overview.groups.values() if any(n in have for n in runs)]
