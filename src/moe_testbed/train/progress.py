"""Progress display: a rich bar on a terminal, a few plain lines in CI logs."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, mode: str = "auto", enabled: bool = True, start: int = 0):
        self.total, self.start_step = total, start
        if not enabled or mode == "none":
            mode = "none"
        elif mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.t0 = time.time()
        self._next_log = start
        self._bar = None
        if mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), transient=False,
            )  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, record: dict) -> None:
        info = f"loss {record['loss']:.3f}  {record['tokens_per_s']:.0f} tok/s"
        if "util/mean" in record:
            info += f"  util {record['util/mean']:.2f}  purity {record['purity/mean']:.2f}"
        if self.mode == "bar":
            self._bar.update(self._task, completed=step, info=info)
        elif self.mode == "log" and (step >= self._next_log or step == self.total):
            # About ten lines per run keeps CI logs readable.
            self._next_log = step + max(1, self.total // 10)
            elapsed = time.time() - self.t0
            done = max(step - self.start_step, 1)
            eta = elapsed / done * (self.total - step)
            print(f"step {step}/{self.total}  {info}  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.mode == "bar":
            self._bar.console.print(text)
        elif self.mode == "log":
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
