"""What a built-in source is, and the registry of them.

A source is one small class: it declares the domain its text belongs to, the
packages it needs (:mod:`moe_testbed.data.packages`), its licence, and an
extractor that yields documents ``(document_id, text)`` already cleaned.

Two extractor shapes, because sources differ in what is cheap:

* random access -- ``list_docs`` names every document cheaply and
  ``read_doc`` produces one. The builder reads documents in a fixed
  pseudo-random order and stops at the byte budget, so a slow source (man-page
  rendering) only does the work the budget needs; ``parallel = True`` runs
  ``read_doc`` in a process pool.
* streaming -- ``iter_docs`` yields every document once (a compressed tarball,
  a Bible rendered in one pass); the builder keeps the budget's worth.

Either way the kept documents are the same: those first in the order of
:func:`doc_key`, which depends only on the source name and document id.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple

from moe_testbed.data.errors import DataError
from moe_testbed.data.packages import Requirement, Resolved, deb_files

ENCODING_ERRORS = ("replace", "strict")


class Doc(NamedTuple):
    id: str
    text: str
    bad: int = 0  # characters that were not valid UTF-8 and were replaced


@dataclass
class SourceEnv:
    """What an extractor may use: resolved packages and the build's options."""

    packages: dict[str, Resolved] = field(default_factory=dict)
    encoding_errors: str = "replace"
    workers: int = 2

    def deb(self, name: str) -> Resolved:
        return self.packages[f"deb:{name}"]

    def deb_files(self, *names: str) -> list[Path]:
        return [p for n in names for p in deb_files(self.deb(n))]

    def deb_path(self, name: str, path: str) -> Path:
        root = self.deb(name).root or Path("/")
        return root / path.lstrip("/")

    def artifact(self, name: str) -> Path:
        for res in self.packages.values():
            if res.file is not None and res.req.name == name:
                return res.file
        raise KeyError(name)


def doc_key(source: str, doc_id: str) -> int:
    """A stable pseudo-random 63-bit key: the order in which documents are kept and split."""
    digest = hashlib.blake2b(f"{source}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def decode(raw: bytes, errors: str, where: str) -> tuple[str, int]:
    """UTF-8 text and the number of replaced characters; ``errors="strict"`` refuses bad bytes."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError as exc:
        if errors == "strict":
            raise DataError(
                f"{where} is not valid UTF-8 (byte {exc.start}): convert or remove it, "
                "or build with --encoding-errors replace"
            ) from None
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_TRAILING_WS = re.compile(r"[ \t]+\n")
_MANY_BLANKS = re.compile(r"\n{4,}")


def normalize(text: str) -> str:
    """Line ends, stray control characters, trailing blanks: the same for every source."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_WS.sub("\n", text + "\n")
    return _MANY_BLANKS.sub("\n\n\n", text).strip("\n")


def truncate_lines(text: str, max_chars: int | None) -> str:
    """Cut at the last line end before ``max_chars`` (keeps huge files from dominating a domain)."""
    if max_chars is None or len(text) <= max_chars:
        return text
    head = text[:max_chars]
    cut = head.rfind("\n")
    return head[:cut] if cut > max_chars // 2 else head


class Source:
    """Base class of built-in sources; subclasses set the class attributes."""

    name: ClassVar[str]
    domain: ClassVar[str]
    licence: ClassVar[str]
    description: ClassVar[str] = ""
    packages: ClassVar[tuple[Requirement, ...]] = ()
    version: ClassVar[int] = 1  # bump when extraction or cleaning changes: cached shards are rebuilt
    parallel: ClassVar[bool] = False  # read_doc is slow (a subprocess): run it in a process pool
    min_chars: ClassVar[int] = 200  # drop stubs, empty pages, one-line files
    max_chars: ClassVar[int | None] = None  # cut longer documents at a line end

    def check(self, env: SourceEnv) -> str | None:
        """Why the source cannot be used even with its packages present (None = usable)."""
        return None

    def list_docs(self, env: SourceEnv) -> list[str] | None:
        """Every document id, for random access; None for streaming sources."""
        return None

    def read_doc(self, env: SourceEnv, doc_id: str) -> Doc | None:
        raise NotImplementedError

    def iter_docs(self, env: SourceEnv) -> Iterator[Doc]:
        ids = self.list_docs(env) or []
        for doc_id in ids:
            doc = self.read_doc(env, doc_id)
            if doc is not None:
                yield doc

    def fingerprint(self, env: SourceEnv) -> dict:
        """What the extracted text depends on; a cached shard is reused only when it matches."""
        pkgs = [env.packages[r.key].manifest() for r in self.packages if r.key in env.packages]
        return {"source": self.name, "code_version": self.version, "packages": pkgs}

    def manifest(self) -> dict:
        return {
            "domain": self.domain,
            "licence": self.licence,
            "description": self.description,
            "packages": [r.spec() for r in self.packages],
        }


SOURCES: dict[str, type[Source]] = {}


def register(cls: type[Source]) -> type[Source]:
    if cls.name in SOURCES:
        raise ValueError(f"source {cls.name} registered twice")
    SOURCES[cls.name] = cls
    return cls


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]()
    except KeyError:
        raise DataError(f"unknown source {name!r}: known sources are {', '.join(sorted(SOURCES))}") from None


def read_file(path: Path, env: SourceEnv, gz: bool | None = None) -> tuple[str, int]:
    """A text file (``.gz`` transparently), decoded per the build's encoding option."""
    raw = path.read_bytes()
    if gz or (gz is None and path.suffix == ".gz"):
        import gzip

        raw = gzip.decompress(raw)
    return decode(raw, env.encoding_errors, str(path))


def deb_doc_ids(env: SourceEnv, names: tuple[str, ...], under: str, suffixes: tuple[str, ...]) -> list[str]:
    """Ids ``"package:/installed/path"`` of a Debian package's files below ``under``.

    The id names the path as installed, not where this machine keeps it (the
    system or an unpacked copy), so the same file gets the same id everywhere.
    """
    ids = []
    for name in names:
        root = env.deb(name).root or Path("/")
        for path in env.deb_files(name):
            rel = "/" + str(path.relative_to(root)).lstrip("/")
            if rel.startswith(under) and rel.endswith(suffixes):
                ids.append(f"{name}:{rel}")
    return ids


def deb_doc_path(env: SourceEnv, doc_id: str) -> Path:
    name, _, rel = doc_id.partition(":")
    return env.deb_path(name, rel)
