"""The study's report: ``moe_testbed.analysis.report`` on every complete run, when that module exists.

The import is guarded so that a build without the analysis part still runs
studies and writes the results table; the report is then skipped with a note.
Re-running a finished study does not redraw an up-to-date report (drawing
takes seconds per run).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from moe_testbed.study.progress import format_seconds


def report_is_current(study_dir: Path) -> bool:
    """Nothing was recorded since the report was written (a re-run of a finished study)."""
    page = study_dir / "report" / "report.html"
    if not page.is_file():
        return False
    newest = max((p.stat().st_mtime for p in (study_dir / "results").glob("*.json")), default=0.0)
    return newest < page.stat().st_mtime


def write_study_report(run_dirs: list[Path], out_dir: Path, say: Callable[[str], None]) -> int:
    """Write ``out_dir/report.html``; returns 1 when the report failed, else 0."""
    try:
        from moe_testbed.analysis.report import write_report
    except ImportError as exc:
        say(f"report    skipped: moe_testbed.analysis.report is not available ({exc})")
        return 0
    t0 = time.time()
    try:
        path = write_report(run_dirs, out_dir)
    except Exception as exc:  # noqa: BLE001 - the results are safe; say what went wrong with the report
        say(f"report    failed: {type(exc).__name__}: {exc} (the results table is complete)")
        return 1
    say(f"report    {path} ({format_seconds(time.time() - t0)})")
    return 0
