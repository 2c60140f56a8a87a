"""Fortune cookie databases: short quotes, jokes and poems.

Entries are separated by a line holding ``%``; the ``.dat`` index files and the
``.u8`` symlinks are skipped, and so is the ``off/`` (offensive) collection.
A document is a run of consecutive entries of one file, about 16 kB (some
packages ship a single file of a megabyte, which would make a poor split).
"""

from __future__ import annotations

from collections.abc import Iterator

from moe_testbed.data.packages import Deb
from moe_testbed.data.sources.base import Doc, SourceEnv, deb_doc_path, normalize, read_file, register
from moe_testbed.data.sources.files import DebFiles


def split_fortunes(text: str) -> list[str]:
    """The entries of a fortune file (separated by ``%`` lines)."""
    entries, cur = [], []
    for ln in text.replace("\r\n", "\n").split("\n"):
        if ln.strip() == "%":
            entries.append("\n".join(cur).strip("\n"))
            cur = []
        else:
            cur.append(ln)
    entries.append("\n".join(cur).strip("\n"))
    return [e for e in entries if e.strip()]


def join_fortunes(text: str) -> str:
    """Entries separated by ``%`` lines become paragraphs separated by a blank line."""
    return "\n\n".join(split_fortunes(text))


def group_entries(entries: list[str], max_chars: int) -> Iterator[str]:
    """Consecutive entries joined by blank lines, in groups of about ``max_chars``."""
    group: list[str] = []
    size = 0
    for e in entries:
        if group and size + len(e) > max_chars:
            yield "\n\n".join(group)
            group, size = [], 0
        group.append(e)
        size += len(e) + 2
    if group:
        yield "\n\n".join(group)


class Fortunes(DebFiles):
    suffixes = ("",)  # fortune files have no suffix; the index files are excluded below
    exclude = r"(\.dat$|\.u8$|/off/)"
    min_chars = 100
    version = 2  # 2: files cut into groups of entries
    group_chars = 16_000

    def list_docs(self, env: SourceEnv) -> None:
        return None  # a streaming source: one file yields several documents

    def iter_docs(self, env: SourceEnv) -> Iterator[Doc]:
        for file_id in DebFiles.list_docs(self, env):
            text, bad = read_file(deb_doc_path(env, file_id), env, gz=False)
            for k, group in enumerate(group_entries(split_fortunes(text), self.group_chars)):
                yield Doc(f"{file_id}#{k}", normalize(group), bad if k == 0 else 0)


@register
class FortunesDe(Fortunes):
    name, domain = "fortunes_de", "de"
    licence = "GPL-2.0-or-later"
    description = "German fortune cookies"
    packages = (Deb("fortunes-de", "0.35-1"),)
    under = "/usr/share/games/fortunes/de/"


@register
class FortunesRu(Fortunes):
    name, domain = "fortunes_ru", "ru"
    licence = "GPL-2.0"
    description = "Russian fortune cookies"
    packages = (Deb("fortunes-ru", "1.52-3.1"),)
    under = "/usr/share/games/fortunes/ru/"


@register
class FortunesEs(Fortunes):
    name, domain = "fortunes_es", "es"
    licence = "GPL-2.0-or-later"
    description = "Spanish fortune cookies"
    packages = (Deb("fortunes-es", "1.36"),)
    under = "/usr/share/games/fortunes/es/"


@register
class FortunesIt(Fortunes):
    name, domain = "fortunes_it", "it"
    licence = "public domain"
    description = "Italian fortune cookies"
    packages = (Deb("fortunes-it", "1.99-4.1"),)
    under = "/usr/share/games/fortunes/it/"


@register
class FortunesEn(Fortunes):
    name, domain = "fortunes_en", "en_fortunes"
    licence = "BSD (collection)"
    description = "BSD fortune database (quotes, literature, jokes)"
    packages = (Deb("fortunes", "1:1.99.1-7.3"), Deb("fortunes-min", "1:1.99.1-7.3"))
    under = "/usr/share/games/fortunes/"
    exclude = r"(\.dat$|\.u8$|/off/|/fortunes/[a-z][a-z]/)"
