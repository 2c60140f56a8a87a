"""`moe-testbed report`: one self-contained HTML page (plus the PNGs) for one or several runs.

The page opens offline: images are embedded as base64 data URIs, there is no
JavaScript and no external stylesheet. The PNG files are written beside it so
that they can go into a paper or a chat message on their own. A results.csv
with the table is written too, for further analysis.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure

from moe_testbed.analysis import plots
from moe_testbed.analysis.rundir import ReportError, Run, flatten, load_run
from moe_testbed.analysis.study_page import (
    StudyOverview,
    first_seeds,
    interval_scatter_figure,
    seed_band_figure,
    summary_table,
    verdict_table,
)
from moe_testbed.analysis.token_section import drilldown_page, token_level_table
from moe_testbed.routing.metrics import load, nanmean, utilization

# Config keys shown for every run, whether or not they vary.
KEY_CONFIG = (
    "routing.router", "routing.top_k", "balance.method", "balance.scope", "balance.capacity_factor",
    "balance.coeff", "model.n_experts", "model.n_layers", "model.d_model", "model.dense", "data.preset",
    "train.steps", "train.seed",
)  # fmt: skip
# Keys that differ between runs without changing the experiment.
IGNORED_KEYS = ("run.", "train.device", "train.threads", "data.dir", "data.auto_build")
# (column title, key in the final eval scalars); the metrics of record, mean over layers.
METRIC_COLUMNS = (
    ("val loss", "val/loss"),
    ("utilization", "val/util/mean"),
    ("purity", "val/purity/mean"),
    ("purity chance", "val/purity_chance/mean"),
    ("NMI", "val/nmi/mean"),
    ("specialization", "val/specialization/mean"),
    ("drop rate", "val/drop_rate/mean"),
)


def default_out_dir(run_dirs: Sequence[Path]) -> Path:
    """The run dir itself for one run; ``<common parent>/report`` for several."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0])
    return Path(os.path.commonpath([str(Path(p).resolve()) for p in run_dirs])) / "report"


def write_report(
    run_dirs: list[Path], out_dir: Path, steps: Sequence[int] | None = None, overview: StudyOverview | None = None
) -> Path:
    """Write ``report.html``, its PNGs and ``results.csv`` into ``out_dir``; return the HTML path.

    ``steps``: training steps at which to draw the expert x domain heatmaps in
    addition to the final one (the nearest routing snapshot is used).
    ``overview``: a study's verdicts, summary and seed groups (analysis/study_page.py):
    the page then leads with them and draws one section per configuration.
    """
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = [load_run(p) for p in run_dirs]
    names = _unique_names([r.name for r in runs])
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"--out {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    page = _Page(out_dir)

    varied = varied_keys(runs)
    columns, rows = results_table(runs, names, varied)
    if overview is not None:
        _study_head(page, overview, runs)
        page.h(2, "Every run")
        page.raw("<details><summary>the results table of every run (one row per seed)</summary><div class='scroll'>")
        page.table(columns, rows)
        page.raw("</div></details>")
        _write_csv(out_dir / "results.csv", columns, rows)
        by_name = dict(zip(names, runs))
        page.h(2, "Configurations, each drawn from its first seed")
        for name in first_seeds(overview, names):
            _run_section(page, by_name[name], name, f"{_slug(name)}-", steps)
        html_path = out_dir / "report.html"
        html_path.write_text(page.render(), encoding="utf-8")
        return html_path
    page.h(1, "moe-testbed report")
    page.p(f"{len(runs)} run{'s' if len(runs) > 1 else ''}; generated {_dt.datetime.now():%Y-%m-%d %H:%M}.")
    page.raw("<ul>" + "".join(f"<li><b>{_e(n)}</b>: {_e(_tokens_text(r))}</li>" for n, r in zip(names, runs)) + "</ul>")
    if len(runs) > 1:
        page.p(
            "Config keys that differ between runs: "
            + (", ".join(f"<code>{_e(k)}</code>" for k in varied) or "none (the runs differ only in their names)"),
            escape=False,
        )
    page.h(2, "Results")
    page.p(
        "Validation metrics at the last evaluation, mean over MoE layers, sorted by specialization "
        "(0 = a domain-blind router, 1 = the reference router). Definitions: docs/metrics.md."
    )
    page.table(columns, rows)
    _write_csv(out_dir / "results.csv", columns, rows)

    if len(runs) > 1:
        ref_util = _reference_utilization(runs)
        util = [_num(r.final.get("val/util/mean")) for r in runs]
        spec = [_num(r.final.get("val/specialization/mean")) for r in runs]
        page.figure(
            plots.scatter_figure(names, util, spec, ref_util),
            "scatter.png",
            "Each point is a run; the star is the reference router, which routes by domain label.",
        )
        page.figure(plots.domain_loss_comparison_figure(runs, names), "domain_loss_runs.png")

    for run, name in zip(runs, names):
        prefix = "" if len(runs) == 1 else f"{_slug(name)}-"
        _run_section(page, run, name, prefix, steps)

    html_path = out_dir / "report.html"
    html_path.write_text(page.render(), encoding="utf-8")
    return html_path


def _study_head(page: _Page, overview: StudyOverview, runs: list[Run]) -> None:
    page.h(1, f"moe-testbed study {overview.name}")
    if overview.description:
        page.p(overview.description)
    page.p(f"{len(overview.summary)} configurations, {len(runs)} complete runs; generated "
           f"{_dt.datetime.now():%Y-%m-%d %H:%M}. Intervals: 95%, Student t over seeds (paired by seed for "
           "differences; docs/studies.md#claims-and-verdicts).")  # fmt: skip
    for note in overview.notes:
        page.raw(f"<div class='warn'>{_e(note)}</div>")
    if overview.verdicts:
        page.h(2, "Verdicts")
        columns, rows = verdict_table(overview)
        head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>"
        body = "".join(
            "<tr>" + "".join(f"<td class='{_slug(r[1]) if i == 1 else ''}'>{_e(c)}</td>" for i, c in enumerate(r))
            + "</tr>" for r in rows
        )  # fmt: skip
        page.raw(f"<table class='results verdicts'>{head}{body}</table>")
    page.h(2, "Per configuration")
    page.p("Mean ± half-width of the 95% interval over seeds (validation metrics at the last evaluation, means "
           "over MoE layers; train: the last training log). Definitions: docs/metrics.md.")  # fmt: skip
    page.table(*summary_table(overview))
    page.figure(interval_scatter_figure(overview, _reference_utilization(runs)), "scatter.png",
                "Each point is a configuration; the star is the reference router.")  # fmt: skip
    by_name = {r.name: r for r in runs}
    groups = {c: [by_name[n] for n in names if n in by_name] for c, names in overview.groups.items()}
    page.figure(seed_band_figure({c: g for c, g in groups.items() if g}), "curves_by_configuration.png")


def _run_section(page: _Page, run: Run, name: str, prefix: str, steps: Sequence[int] | None) -> None:
    page.h(2, f"Run {name}")
    params = run.summary.get("params_total"), run.summary.get("params_active")
    facts = [
        ("directory", str(run.path)),
        ("status", run.status),
        ("tokens trained", _tokens_text(run)),
        ("parameters (total / active)", " / ".join(_int_text(p) for p in params)),
        ("tokens/s", _fmt(run.summary.get("tokens_per_s"))),
        ("wall time", _fmt(run.summary.get("wall_s"), " s")),
    ]
    if run.ep_load:  # expert parallelism: the busiest rank's slots over the mean rank's (docs/metrics.md)
        facts.append(("EP rank load, busiest / mean", ", ".join(f"{k} {v:.3f}" for k, v in run.ep_load.items())))
    flat = flatten(run.config)
    for key in (k for k in KEY_CONFIG if k in flat):
        value = flat[key]
        facts.append((key, "None (dropless)" if key == "balance.capacity_factor" and value is None else _fmt(value)))
    page.table(["", ""], [list(f) for f in facts], header=False)
    if run.warnings:
        page.raw(
            "<div class='warn'><b>warnings</b><ul>" + "".join(f"<li>{_e(w)}</li>" for w in run.warnings) + "</ul></div>"
        )

    if run.snapshots:
        final = run.snapshots[-1]
        page.figure(
            plots.heatmap_figure(final, name),
            f"{prefix}heatmap_final.png",
            "Columns: domains; rows: experts, sorted by the domain they mostly serve; each column sums to 1. "
            "P = purity, S = specialization of that layer. The last panel is the reference router.",
        )
        shown = {final.step}
        for want in steps or ():
            snap = run.snapshot_at(want)
            if snap.step in shown:
                continue
            shown.add(snap.step)
            note = "" if snap.step == want else f" (nearest snapshot to the requested step {want})"
            page.figure(
                plots.heatmap_figure(snap, name),
                f"{prefix}heatmap_step{snap.step:06d}.png",
                f"Expert x domain shares at step {snap.step}{note}.",
            )
    else:
        page.p("No routing snapshots (routing/step_*.npz) yet: no heatmaps.")
    page.figure(
        plots.curves_figure(run),
        f"{prefix}curves.png",
        "Validation metrics at each evaluation, per layer; dashed grey: the same on the training "
        "batches since the previous log line.",
    )
    page.figure(
        plots.expert_load_figure(run),
        f"{prefix}expert_load.png",
        "Load of each expert on the training batches between evaluations: red = overloaded, "
        "blue = underused, white = even.",
    )
    page.figure(plots.domain_loss_figure(run), f"{prefix}domain_loss.png")
    token_level = token_level_table(run.path, run.config)
    if token_level is not None:
        page.p(token_level[0])
        page.table(*token_level[1:])
    drilldown = drilldown_page(run.path, run.config, page.out_dir / f"{prefix}drilldown.html", name)
    if drilldown is not None:
        page.raw(f"<p><a href='{_e(drilldown.name)}'>Which text each expert takes</a> (the drill-down page of the "
                 "last evaluation's trace: every expert's domains, tokens and marked snippets).</p>")  # fmt: skip
    page.raw(
        f"<details><summary>full config</summary><pre>{_e(yaml.safe_dump(run.config, sort_keys=False))}</pre></details>"
    )


def varied_keys(runs: Sequence[Run]) -> list[str]:
    """Dotted config keys whose values are not the same in every run (run.* and paths ignored)."""
    flat = [flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    missing = object()
    out = []
    for key in keys:
        if key.startswith(IGNORED_KEYS):
            continue
        values = [repr(f.get(key, missing)) for f in flat]
        if len(set(values)) > 1:
            out.append(key)
    return out


def results_table(runs: Sequence[Run], names: Sequence[str], varied: Sequence[str]) -> tuple[list[str], list[list]]:
    """Columns and rows (run name, varied keys, metrics, throughput), sorted by specialization, NaN last."""
    columns = ["run", *varied, *(title for title, _ in METRIC_COLUMNS), "tokens/s", "tokens", "status"]
    keyed = []
    for run, name in zip(runs, names):
        final = _final_with_snapshot(run)
        flat = flatten(run.config)
        metrics = [_num(final.get(key)) for _, key in METRIC_COLUMNS]
        tps = run.summary.get("tokens_per_s")
        if tps is None and run.train:
            tps = run.train[-1].get("tokens_per_s")
        row = [name, *(flat.get(k) for k in varied), *metrics, _num(tps), run.tokens, run.status]
        spec = _num(final.get("val/specialization/mean"))
        keyed.append(((0 if math.isfinite(spec) else 1, -spec if math.isfinite(spec) else 0.0, name), row))
    keyed.sort(key=lambda kr: kr[0])
    return columns, [row for _, row in keyed]


def _final_with_snapshot(run: Run) -> dict[str, Any]:
    # An eval line without routing scalars (older trainer, crash mid-write): recompute from the snapshot.
    final = run.final
    if run.snapshots and "val/util/mean" not in final:
        final = {**run.snapshots[-1].scalars(prefix="val/"), **final}
    return final


def _reference_utilization(runs: Sequence[Run]) -> float:
    for run in runs:
        snap = run.snapshots[-1] if run.snapshots else None
        if snap is not None and snap.tables.ref_counts is not None:
            return nanmean([utilization(load(ref_EC)) for ref_EC in snap.tables.ref_counts])
    return math.nan


class _Page:
    """Accumulates the HTML body; figures are saved as PNG files and embedded as base64."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.parts: list[str] = []

    def h(self, level: int, text: str) -> None:
        self.parts.append(f"<h{level}>{_e(text)}</h{level}>")

    def p(self, text: str, escape: bool = True) -> None:
        self.parts.append(f"<p>{_e(text) if escape else text}</p>")

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[Any]], header: bool = True) -> None:
        head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>" if header else ""
        body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
        self.parts.append(f"<table class='{'results' if header else 'facts'}'>{head}{body}</table>")

    def figure(self, fig: Figure | None, filename: str, caption: str = "") -> None:
        if fig is None:
            return
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        data = buf.getvalue()
        (self.out_dir / filename).write_bytes(data)
        b64 = base64.b64encode(data).decode("ascii")
        cap = f"<figcaption>{_e(caption)} <span class='file'>[{_e(filename)}]</span></figcaption>"
        self.parts.append(f"<figure><img src='data:image/png;base64,{b64}' alt='{_e(filename)}'>{cap}</figure>")

    def render(self) -> str:
        return (
            "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>moe-testbed report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(self.parts) + "\n</body></html>\n"
        )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td:first-child { text-align: left; font-weight: 600; }
table.facts td { text-align: left; } table.facts td:first-child { font-weight: normal; color: #555; }
figure { margin: 1em 0 2em; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } .file { color: #999; }
.warn { background: #fff4e0; border-left: 4px solid #e90; padding: 0.3em 1em; margin: 1em 0; }
h2 { border-bottom: 1px solid #ddd; margin-top: 2em; } code { background: #f4f4f4; padding: 0 0.2em; }
.scroll { overflow-x: auto; } td.holds { color: #1a7f37; font-weight: 600; } td.reversed { color: #cf222e;
font-weight: 600; } td.not_separated, td.n_a { color: #777; } table.verdicts td { text-align: left; }
"""


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows(rows)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float | np.floating | np.integer) else math.nan


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float | np.floating):
        if not math.isfinite(value):
            return "–"
        if abs(value) >= 1000:
            return f"{value:,.0f}{unit}"
        return f"{value:.3f}{unit}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}{unit}"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}{unit}"
    return f"{value}{unit}"


def _int_text(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, int | float) and math.isfinite(value) else "–"


def _tokens_text(run: Run) -> str:
    steps = run.summary.get("steps")
    if steps is None:
        steps = max([r["step"] for r in run.train + run.eval], default=None)
    return f"{_int_text(run.tokens)} tokens trained in {_int_text(steps)} steps ({run.status})"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out
