"""Studies: many runs that differ in one or two knobs, run in parallel and compared side by side.

A study is a YAML spec (a base config, overrides, a grid, extra runs; see
docs/studies.md). ``moe-testbed study SPEC`` expands it (:mod:`.plan`), runs each
run in its own worker process (:mod:`.runner`, :mod:`.worker`), collects one
result per run into ``results.parquet`` / ``results.csv`` (:mod:`.results`) and
writes the report.

This module stays import-light (no torch): the main CLI imports it only to
learn :class:`StudyError`.
"""

from __future__ import annotations

from moe_testbed.errors import UserError


class StudyError(UserError):
    """A user error in a study (bad spec, unknown preset, busy study directory).

    The CLI prints ``error: <message>`` and exits with status 2.
    """


__all__ = ["StudyError"]
