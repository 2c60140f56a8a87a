"""The study's report: ``moe_testbed.analysis.report`` on every complete run, when that module exists.

The import is guarded so that a build without the analysis part still runs
studies and writes the results table; the report is then skipped with a note.
Re-running a finished study does not redraw an up-to-date report (drawing
takes seconds per run).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from pathlib import Path

from moe_testbed.study.progress import format_seconds
from moe_testbed.study.results import read_plan
from moe_testbed.study.summary import SUMMARY_FILE, read_verdicts


def report_is_current(study_dir: Path) -> bool:
    """Nothing was recorded since the report was written (a re-run of a finished study)."""
    page = study_dir / "report" / "report.html"
    if not page.is_file():
        return False
    newest = max((p.stat().st_mtime for p in (study_dir / "results").glob("*.json")), default=0.0)
    return newest < page.stat().st_mtime


def write_study_report(run_dirs: list[Path], out_dir: Path, say: Callable[[str], None]) -> int:
    """Write ``out_dir/report.html`` (the study's directory is ``out_dir``'s parent); 1 when it failed, else 0."""
    try:
        from moe_testbed.analysis.report import write_report
        from moe_testbed.analysis.study_page import StudyOverview
    except ImportError as exc:
        say(f"report    skipped: moe_testbed.analysis.report is not available ({exc})")
        return 0
    t0 = time.time()
    try:
        overview = StudyOverview(**study_overview(Path(out_dir).parent))
        path = write_report(run_dirs, out_dir, overview=overview)
    except Exception as exc:  # noqa: BLE001 - the results are safe; say what went wrong with the report
        say(f"report    failed: {type(exc).__name__}: {exc} (the results table is complete)")
        return 1
    say(f"report    {path} ({format_seconds(time.time() - t0)})")
    return 0


def study_overview(study_dir: Path) -> dict:
    """What the report leads with: the verdicts, the summary rows and the seeds of each configuration."""
    plan = read_plan(study_dir)
    try:
        with open(study_dir / SUMMARY_FILE, newline="") as fh:
            summary = list(csv.DictReader(fh))
    except OSError:
        summary = []
    groups: dict[str, list[str]] = {}
    for name in plan.get("runs", []):
        groups.setdefault(plan.get("configs", {}).get(name, name), []).append(name)
    return {"name": plan.get("study", Path(study_dir).name), "description": plan.get("description", ""),
            "verdicts": read_verdicts(study_dir), "summary": summary, "groups": groups}  # fmt: skip
