"""Public-domain Bibles from the SWORD modules, rendered with ``diatheke``.

``diatheke -f plain`` repeats a psalm's heading before *every* verse of that
psalm ("A Psalm of David ..." appears thousands of times). A verse starts at the line
``Book C:V: text``; see :func:`parse_plain` for how leaked headings are told
from poetry lines that continue a verse. Strong's-number tags ``<G1234>`` are
removed. One chapter is one document, one verse per line.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from typing import ClassVar

from moe_testbed.data.packages import Deb
from moe_testbed.data.sources.base import Doc, Source, SourceEnv, decode, normalize, register

VERSE = re.compile(r"^\s*(?P<book>\S.*?) (?P<chapter>\d+):(?P<verse>\d+):\s?(?P<text>.*)$")
TAG = re.compile(r"<[^<>\n]{1,40}>")


def parse_plain(lines: list[str]) -> Iterator[tuple[str, str]]:
    """``(chapter id, chapter text)`` from diatheke's plain output, leaked headings dropped.

    A line that is not a verse start is a *continuation* of the verse above it
    when it follows that verse with no blank line between, unless it is a
    *heading*: a line seen at least twice directly before a verse start (a
    leaked heading precedes every verse of its psalm). Lines after a blank line
    that are not verse starts are headings or trailers and are dropped.
    """
    kinds = ["V" if VERSE.match(ln) else ("B" if not ln.strip() else "T") for ln in lines]
    before_verse = Counter(lines[i] for i in range(len(lines) - 1) if kinds[i] == "T" and kinds[i + 1] == "V")
    headings = {ln for ln, n in before_verse.items() if n >= 2}
    chapter, verses, attached = None, [], False  # attached: inside a verse's block, no blank since
    for ln, kind in zip(lines, kinds):
        if kind == "B":
            attached = False
        elif kind == "V":
            m = VERSE.match(ln)
            assert m is not None
            key = f"{m['book']} {m['chapter']}"
            if key != chapter:
                if chapter is not None and verses:
                    yield chapter, "\n".join(verses)
                chapter, verses = key, []
            verses.append(m["text"].strip())
            attached = True
        elif attached and ln not in headings and verses:
            verses[-1] += " " + ln.strip()
    if chapter is not None and verses:
        yield chapter, "\n".join(verses)


def clean_verse_text(text: str) -> str:
    return " ".join(TAG.sub("", text).split())


class SwordBible(Source):
    module: ClassVar[str]
    span: ClassVar[str] = "Gen 1:1 - Rev 22:21"
    min_chars = 100

    def iter_docs(self, env: SourceEnv) -> Iterator[Doc]:
        proc = subprocess.run(
            ["diatheke", "-b", self.module, "-f", "plain", "-k", self.span],
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )
        text, bad = decode(proc.stdout, env.encoding_errors, f"diatheke output of {self.module}")
        first = True
        for chapter, body in parse_plain(text.split("\n")):
            verses = [clean_verse_text(v) for v in body.split("\n")]
            yield Doc(f"{self.module}/{chapter}", normalize("\n".join(v for v in verses if v)), bad if first else 0)
            first = False


@register
class BibleWeb(SwordBible):
    name, domain, module = "bible_web", "en_prose", "engWEB2015eb"
    licence = "public domain"
    description = "World English Bible with Deuterocanon (SWORD module engWEB2015eb)"
    packages = (Deb("diatheke", "1.9.0+dfsg-4+b4", mode="install"), Deb("sword-text-web", "426.0-1", mode="install"))


@register
class BibleKjv(SwordBible):
    name, domain, module = "bible_kjv", "en_prose", "engKJV2006eb"
    licence = "public domain"
    description = "King James Version (SWORD module engKJV2006eb)"
    packages = (Deb("diatheke", "1.9.0+dfsg-4+b4", mode="install"), Deb("sword-text-kjv", "14.3-1", mode="install"))


@register
class BibleRv1909(SwordBible):
    name, domain, module = "bible_rv1909", "es", "spaRV1909eb"
    licence = "public domain"
    description = "Reina-Valera 1909 (SWORD module spaRV1909eb)"
    packages = (Deb("diatheke", "1.9.0+dfsg-4+b4", mode="install"), Deb("sword-text-sparv", "2.60-1", mode="install"))
