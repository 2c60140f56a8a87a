"""SQL from MariaDB's regression tests (``*.test``), mysqltest commands removed.

A ``.test`` file mixes SQL with commands of the mysqltest driver: ``--echo``,
``--error``, ``let $x=``, ``if (...) {``, ``connect``, ...
Those lines are dropped, and so are the bodies of ``--perl`` /
``--write_file`` / ``--append_file`` blocks, which run until ``EOF`` (or the
terminator the command names). The ``.result`` files are echoed query output,
not SQL, and are not used.
"""

from __future__ import annotations

import re

from moe_testbed.data.packages import Deb
from moe_testbed.data.sources.base import register
from moe_testbed.data.sources.files import DebFiles

# First word of a mysqltest command (after an optional leading "--").
COMMANDS = frozenset(
    [
        "let",
        "eval",
        "if",
        "while",
        "source",
        "connect",
        "connection",
        "disconnect",
        "echo",
        "error",
        "perl",
        "send",
        "reap",
        "sleep",
        "real_sleep",
        "exec",
        "execw",
        "remove_file",
        "remove_files_wildcard",
        "write_file",
        "append_file",
        "cat_file",
        "copy_file",
        "copy_files_wildcard",
        "move_file",
        "file_exists",
        "diff_files",
        "list_files",
        "list_files_write_file",
        "list_files_append_file",
        "mkdir",
        "rmdir",
        "force-rmdir",
        "sorted_result",
        "partially_sorted_result",
        "lowercase_result",
        "query_vertical",
        "query_horizontal",
        "vertical_results",
        "horizontal_results",
        "delimiter",
        "inc",
        "dec",
        "die",
        "exit",
        "skip",
        "system",
        "change_user",
        "character_set",
        "result_format",
        "send_eval",
        "send_quit",
        "send_shutdown",
        "shutdown_server",
        "start_timer",
        "end_timer",
        "save_master_pos",
        "sync_slave_with_master",
        "sync_with_master",
        "wait_for_slave_to_stop",
        "query_get_value",
        "ping",
        "chmod",
        "require",
        "dirty_close",
        "disable_abort_on_error",
        "output",
        "expr",
        "sleep_ms",
    ]
)
COMMAND_PREFIXES = ("replace_", "disable_", "enable_", "wait_for_", "sync_", "query_attributes")
BLOCK_COMMANDS = frozenset({"perl", "write_file", "append_file"})
_WORD = re.compile(r"[A-Za-z_][\w-]*")


def _command(line: str) -> str | None:
    """The mysqltest command a line starts with, or None for SQL."""
    s = line.strip()
    m = _WORD.match(s)
    if not m:
        return None
    word = m.group(0).lower()
    rest = s[m.end() :].lstrip()
    if word in COMMANDS or word.startswith(COMMAND_PREFIXES):
        # "if (" / "while (" need the parenthesis: "IF(...)" inside SQL is a function call.
        if word in ("if", "while") and not rest.startswith("("):
            return None
        return word
    return None


def clean_mysqltest(text: str) -> str:
    """SQL statements and their continuation lines, without mysqltest commands."""
    out, terminator = [], None
    for line in text.split("\n"):
        s = line.strip()
        if terminator is not None:
            if s.rstrip(";") == terminator:
                terminator = None
            continue
        if s.startswith("--"):  # "--echo", "--source", and SQL comments alike
            cmd = _command(s[2:])
            if cmd in BLOCK_COMMANDS:
                args = s[2:].split()
                terminator = args[2] if cmd != "perl" and len(args) > 2 else "EOF"
            continue
        if s.startswith("#") or s in ("{", "}", "} else {", "end", "end;"):
            continue
        if s.startswith(("}", "{")) and not s.strip("{}; \t"):
            continue
        cmd = _command(s)
        if cmd is not None:
            if cmd in BLOCK_COMMANDS:
                args = s.rstrip(";").split()
                terminator = args[2] if cmd != "perl" and len(args) > 2 else "EOF"
            continue
        out.append(line.rstrip())
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


@register
class MariadbTests(DebFiles):
    name = "mariadb_tests"
    domain = "sql"
    licence = "GPL-2.0"
    description = "MariaDB 10.11 regression tests (*.test) with the mysqltest commands removed"
    packages = (Deb("mariadb-test-data", "1:10.11.19-0+deb12u1"),)
    under, suffixes = "/usr/share/mysql/mysql-test/", (".test",)
    min_chars = 150

    def clean(self, text: str) -> str:
        return clean_mysqltest(text)
