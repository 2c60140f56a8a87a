"""The ground floor's one concept: what counts as a user error.

A :class:`UserError` is a mistake the user can fix (a bad config value, a
missing file, a corrupted checkpoint): its message is one line naming the
problem and the fix. The command line prints ``error: <message>`` and exits
with status 2, without a traceback. Every package raises its own subclass
(``DataError``, ``CheckpointError``, ``StudyError``, ...), so that the CLI needs
to know only this base class.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake the user can fix; the message is one line naming the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A user error in a configuration: one line, names the key and the fix."""


def exit_status(command: Callable[[], int | None]) -> int:
    """Run a command: a UserError prints ``error: <message>`` and gives 2, Ctrl-C gives 130."""
    try:
        return int(command() or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
