"""Overall progress of a study: a rich display on a terminal, one plain line per event otherwise.

Progress is counted in optimizer steps summed over the runs still to do (read
from the tail of each running run's metrics.jsonl), so the time estimate is
right even when runs differ in length or some resume half-way.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def current_step(run_dir: Path) -> int | None:
    """The last step logged in ``metrics.jsonl`` (reads only the file's tail)."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 4096))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut in half by a writer still going
    return None


def describe_result(record: dict[str, Any]) -> str:
    status = record.get("status", "?")
    if status != "complete":
        return f"{status}: {record.get('reason') or ''}".rstrip(": ")
    final = record.get("final", {})
    parts = ["complete"]
    for label, key in (("val loss", "val/loss"), ("util", "val/util/mean"), ("purity", "val/purity/mean")):
        value = final.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(f"{label} {value:.3f}")
    if record.get("wall_s"):
        parts.append(f"({format_seconds(record['wall_s'])})")
    return "  ".join(parts)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class StudyProgress:
    """``mode``: auto (rich on a terminal), bar, log (plain lines) or none.

    ``total_steps``: the optimizer steps still to do over all runs of this invocation.
    """

    def __init__(self, n_runs: int, total_steps: int, mode: str = "auto", stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "log"
        self.mode, self.n_runs, self.done = mode, n_runs, 0
        # run -> (step at start, step now, last step); overall progress counts steps done in
        # this invocation, so that a resumed run does not look like a burst of speed.
        self.steps: dict[str, tuple[int, int, int]] = {}
        self.finished_steps = 0
        self.t0 = time.time()
        self._bar = None
        if mode == "bar":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), console=Console(file=self.stream), transient=False,
            )  # fmt: skip
            self._bar.start()
            self._total = self._bar.add_task(self._title(), total=max(total_steps, 1))
            self._tasks: dict[str, Any] = {}

    def _title(self) -> str:
        return f"[bold]study[/bold] {self.done}/{self.n_runs} runs"

    def note(self, text: str) -> None:
        if self.mode == "bar":
            self._bar.console.print(text, markup=False, highlight=False)
        elif self.mode == "log":
            print(text, file=self.stream, flush=True)

    def started(self, name: str, detail: str, start_step: int, steps: int) -> None:
        self.steps[name] = (start_step, start_step, steps)
        if self._bar is not None:
            self._tasks[name] = self._bar.add_task(f"  {name}", total=max(steps, 1), completed=start_step)
            self._refresh()
        self.note(f"start  {name}{f' ({detail})' if detail else ''}")

    def update(self, name: str, step: int | None) -> None:
        if step is None or name not in self.steps:
            return
        start, _, steps = self.steps[name]
        self.steps[name] = (start, min(step, steps), steps)
        if self._bar is not None:
            self._bar.update(self._tasks[name], completed=min(step, steps))
            self._refresh()

    def finished(self, name: str, record: dict[str, Any]) -> None:
        self.done += 1
        start, _, steps = self.steps.pop(name, (0, 0, 0))
        self.finished_steps += steps - start
        if self._bar is not None and name in self._tasks:
            self._bar.remove_task(self._tasks.pop(name))
            self._refresh()
        self.note(f"[{self.done}/{self.n_runs}] {name}  {describe_result(record)}")

    def _refresh(self) -> None:
        running = sum(now - start for start, now, _ in self.steps.values())
        self._bar.update(self._total, completed=self.finished_steps + running, description=self._title())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
