"""Advisory file locks (``fcntl.flock``) that the kernel releases when the holder dies.

That last property is why flock and not a lock *file* whose existence means
"locked": a worker killed with SIGKILL or a machine that loses power leaves no
stale lock behind, so a re-run never has to guess whether a lock is still held.

Three locks are used, each a file that is never deleted while in use:

- ``STUDY/.study.lock``: held by the ``moe-testbed study`` process for its whole
  life, so that two invocations never run the same study directory at once;
- ``STUDY/runs/NAME/.run.lock``: held by the worker training that run, so that a
  worker orphaned by a killed parent is never joined by a second one;
- ``STUDY/.table.lock``: held while the results table is rebuilt (results.py).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockBusy(Exception):
    """A non-blocking lock is held by another process."""


class FileLock:
    """``with FileLock(path):`` takes an exclusive lock; ``blocking=False`` raises LockBusy instead of waiting."""

    def __init__(self, path: str | Path, blocking: bool = True):
        self.path, self.blocking = Path(path), blocking
        self._fd: int | None = None

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(str(self.path)) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        # The holder's pid, for error messages only (the lock itself is the flock).
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(path: str | Path) -> bool:
    """Whether another process holds the lock at ``path`` right now."""
    if not Path(path).exists():
        return False
    try:
        with FileLock(path, blocking=False):
            return False
    except LockBusy:
        return True


def holder_pid(path: str | Path) -> str:
    try:
        return Path(path).read_text().strip() or "?"
    except OSError:
        return "?"
