"""Formal mathematics: the Metamath ``set.mm`` database (CC0).

60% of the raw file is compressed proofs (``$= ( ... ) ABCDEF... $.``),
random-looking upper-case strings: each ``$= ... $.`` span becomes ``$.``,
leaving the statement. Comments
(``$( ... $)``) are kept verbatim, even when they mention ``$=``. The file is
split into documents at its section headers (a comment whose first line is a
row of ``#*#*``, ``=-=-``, ``-.-.`` or ``####``), about 1,500 documents;
sections over 50,000 characters are cut at blank lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from moe_testbed.data.packages import Deb
from moe_testbed.data.sources.base import Doc, Source, SourceEnv, normalize, register

_TOKEN = re.compile(r"\$[()=.]")
_HEADER = re.compile(r"^\s*\$\(\s*\n\s*(#\*#\*|=-=-|-\.-\.|####)", re.M)
_TITLE = re.compile(r"^\s*(?:#\*#\*|=-=-|-\.-\.|####)[#*=.\- ]*\n\s*(.+?)\s*$", re.M)


def strip_proofs(text: str) -> str:
    """Remove ``$= ... $.`` proofs outside comments; keep ``$.`` so statements stay well formed."""
    out, pos, in_comment, in_proof = [], 0, False, False
    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        if in_comment:
            if tok == "$)":
                in_comment = False
        elif in_proof:
            if tok == "$.":
                in_proof = False
                pos = m.start()  # resume output at the "$." that ends the proof
        elif tok == "$(":
            in_comment = True
        elif tok == "$=":
            out.append(text[pos : m.start()].rstrip() + " ")
            in_proof = True
    out.append(text[pos:])
    return "".join(out)


def split_sections(text: str, max_chars: int = 50_000) -> Iterator[tuple[str, str]]:
    """``(title, text)`` per section of a Metamath database.

    A section longer than ``max_chars`` (the header's table of contents is
    700 kB) is cut at blank lines into parts titled ``title #2``, ``#3``, ...
    """
    starts = [0] + [m.start() for m in _HEADER.finditer(text)]
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        chunk = text[start:end]
        m = _TITLE.search(chunk[:2000])
        title = m.group(1)[:80] if m else "preamble"
        for j, part in enumerate(_cut(chunk, max_chars)):
            yield (title if j == 0 else f"{title} #{j + 1}"), part


def _cut(text: str, max_chars: int) -> Iterator[str]:
    while len(text) > max_chars:
        cut = text.rfind("\n\n", 0, max_chars)
        cut = cut if cut > max_chars // 2 else max_chars
        yield text[:cut]
        text = text[cut:].lstrip("\n")
    yield text


@register
class MetamathSetMm(Source):
    name = "metamath_setmm"
    domain = "math_formal"
    licence = "CC0-1.0"
    description = "Metamath set.mm: statements and comments, compressed proofs removed"
    packages = (Deb("metamath-databases", "0.0.0~20210101.git55fe226-2"),)
    min_chars = 100
    version = 2  # 2: long sections cut into parts
    path = "/usr/share/metamath/databases/set.mm"

    def iter_docs(self, env: SourceEnv) -> Iterator[Doc]:
        # set.mm is 7-bit ASCII by the Metamath spec; latin-1 never fails to decode.
        raw = env.deb_path("metamath-databases", self.path).read_bytes().decode("latin-1")
        for i, (title, chunk) in enumerate(split_sections(strip_proofs(raw))):
            yield Doc(f"set.mm/{i:05d} {title}", normalize(chunk))
