"""Build progress on stderr: one line per step, a live status line on a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.t0 = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._status = False
        self._last_status = 0.0

    def _prefix(self) -> str:
        return f"[data {time.monotonic() - self.t0:6.1f}s] "

    def log(self, msg: str) -> None:
        """A line that stays."""
        if self.quiet:
            return
        self._clear()
        print(self._prefix() + msg, file=self.stream, flush=True)

    def status(self, msg: str) -> None:
        """A transient line (overwritten on a terminal, at most every 10 s otherwise)."""
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\033[K" + self._prefix() + msg)
            self.stream.flush()
            self._status = True
        elif now - self._last_status >= 10.0:
            self._last_status = now
            print(self._prefix() + msg, file=self.stream, flush=True)

    def _clear(self) -> None:
        if self._status:
            self.stream.write("\r\033[K")
            self._status = False

    def elapsed(self) -> float:
        return time.monotonic() - self.t0
