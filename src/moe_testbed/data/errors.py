"""The one exception type of the data layer.

A :class:`DataError` is a *user* error: a missing package, a bad path, a budget
the data cannot meet. Its message is one line that names the problem and the
fix; the CLI prints it as ``error: <msg>`` and exits with status 2.
"""

from __future__ import annotations

from moe_testbed.errors import UserError


class DataError(UserError):
    """A user error in the data layer: one line, names the problem and the fix."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line so that the CLI output stays one line.
        super().__init__(" ".join(str(message).split()))
