"""The ground floor's one concept: what counts as a user error.

A :class:`UserError` is a mistake the user can fix (a bad config value, a
missing file, a corrupted checkpoint): its message is one line naming the
problem and the fix. The command line prints ``error: <message>`` and exits
with status 2, without a traceback. Every package raises its own subclass
(``DataError``, ``CheckpointError``, ``StudyError``, ...), so that the CLI needs
to know only this base class.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message is one line naming the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A user error in a configuration: one line, names the key and the fix."""
