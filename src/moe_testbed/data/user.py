"""User-supplied domains: ``--domain NAME=PATH``.

PATH is one of

* a folder -- every regular file below it (hidden files and folders skipped)
  is one document; files with NUL bytes are taken for binary and skipped;
* a JSONL file (``.jsonl``, ``.jsonl.gz``) -- one JSON object per line with a
  ``text`` field (and optionally ``id``);
* a Parquet file (``.parquet``) -- a ``text`` column (and optionally ``id``).

Texts that are not valid UTF-8 are decoded with replacement characters and
counted, or refused with ``--encoding-errors strict``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from moe_testbed.data.errors import DataError
from moe_testbed.data.sources.base import Doc, Source, SourceEnv, decode, normalize

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


def parse_domain_arg(arg: str) -> tuple[str, Path]:
    name, sep, path = arg.partition("=")
    if not sep or not name or not path:
        raise DataError(f"--domain {arg!r} must look like NAME=PATH (a folder, a .jsonl file or a .parquet file)")
    if not NAME.match(name):
        raise DataError(f"domain name {name!r} must start with a letter and use only letters, digits, _ . -")
    return name, Path(path).expanduser()


def _kind(path: Path) -> str:
    if path.is_dir():
        return "folder"
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise DataError(
        f"{path} is neither a folder, a .jsonl file nor a .parquet file: "
        "pass a folder of text files, JSONL with a 'text' field, or Parquet with a 'text' column"
    )


class UserSource(Source):
    """A domain from the user's files; one instance per ``--domain``."""

    licence = "user data"
    min_chars = 1
    version = 1

    def __init__(self, domain: str, path: Path) -> None:
        self.name = f"user:{domain}"  # type: ignore[misc]
        self.domain = domain  # type: ignore[misc]
        self.path = Path(path).resolve()
        self.description = f"user data from {self.path}"  # type: ignore[misc]
        if not self.path.exists():
            raise DataError(f"domain {domain}: {path} does not exist: pass an existing folder, .jsonl or .parquet file")
        self.kind = _kind(self.path)

    def _files(self) -> list[Path]:
        out = []
        for dirpath, dirnames, files in os.walk(self.path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out.extend(Path(dirpath) / f for f in sorted(files) if not f.startswith("."))
        return [p for p in out if p.is_file()]

    def fingerprint(self, env: SourceEnv) -> dict:
        """Path, sizes and modification times: an edited file invalidates the cached shard."""
        files = self._files() if self.kind == "folder" else [self.path]
        stats = [
            (str(p.relative_to(self.path)) if self.kind == "folder" else p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in files
        ]
        return {
            "source": self.name,
            "code_version": self.version,
            "path": str(self.path),
            "kind": self.kind,
            "files": stats,
            "encoding_errors": env.encoding_errors,
        }

    def manifest(self) -> dict:
        return {
            "domain": self.domain,
            "licence": self.licence,
            "description": self.description,
            "packages": [],
            "path": str(self.path),
            "kind": self.kind,
        }

    def iter_docs(self, env: SourceEnv) -> Iterator[Doc]:
        if self.kind == "folder":
            yield from self._folder(env)
        elif self.kind == "jsonl":
            yield from self._jsonl(env)
        else:
            yield from self._parquet(env)

    def _folder(self, env: SourceEnv) -> Iterator[Doc]:
        for path in self._files():
            raw = path.read_bytes()
            if b"\x00" in raw[:8192]:
                continue  # binary
            rel = str(path.relative_to(self.path))
            text, bad = decode(raw, env.encoding_errors, str(path))
            yield Doc(rel, normalize(text), bad)

    def _jsonl(self, env: SourceEnv) -> Iterator[Doc]:
        opener = gzip.open if self.path.name.endswith(".gz") else open
        with opener(self.path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                line, bad = decode(raw, env.encoding_errors, f"{self.path} line {lineno}")
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise DataError(f"{self.path} line {lineno} is not valid JSON: fix the line or remove it") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(f"{self.path} line {lineno} has no string field 'text': every line needs one")
                doc_id = str(obj.get("id", lineno))
                yield Doc(doc_id, normalize(obj["text"]), bad)

    def _parquet(self, env: SourceEnv) -> Iterator[Doc]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DataError(f"{self.path} is not a readable Parquet file ({exc}): check the file") from None
        names = pf.schema_arrow.names
        if "text" not in names:
            raise DataError(f"{self.path} has no 'text' column (columns: {', '.join(names)}): add one")
        cols = ["text"] + (["id"] if "id" in names else [])
        row = 0
        for batch in pf.iter_batches(columns=cols):
            data = batch.to_pydict()
            for i, text in enumerate(data["text"]):
                row += 1
                if text is None:
                    continue
                if isinstance(text, bytes):
                    text, bad = decode(text, env.encoding_errors, f"{self.path} row {row}")
                else:
                    bad = 0
                doc_id = str(data["id"][i]) if "id" in data else str(row)
                yield Doc(doc_id, normalize(str(text)), bad)
