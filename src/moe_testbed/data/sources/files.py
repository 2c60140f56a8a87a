"""Sources whose documents are plain files: one file, one document.

Two families: :class:`DebFiles` reads the files of named Debian packages (the
exact file list of the package, so two machines with different extra packages
get the same corpus), :class:`DirFiles` reads a directory that every Debian/
Python installation has (the Python stdlib, ``/usr/share/doc``).
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import ClassVar

from moe_testbed.data.packages import Deb
from moe_testbed.data.sources.base import (
    Doc,
    Source,
    SourceEnv,
    deb_doc_ids,
    deb_doc_path,
    normalize,
    read_file,
    register,
    truncate_lines,
)


class DebFiles(Source):
    """Files of the source's Debian packages below ``under`` with one of ``suffixes``."""

    under: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]
    exclude: ClassVar[str | None] = None  # regex searched in the installed path

    def list_docs(self, env: SourceEnv) -> list[str]:
        names = tuple(r.name for r in self.packages if isinstance(r, Deb))
        ids = deb_doc_ids(env, names, self.under, self.suffixes)
        if self.exclude:
            pattern = re.compile(self.exclude)
            ids = [i for i in ids if not pattern.search(i.partition(":")[2])]
        return ids

    def read_doc(self, env: SourceEnv, doc_id: str) -> Doc | None:
        text, bad = read_file(deb_doc_path(env, doc_id), env)
        return Doc(doc_id, truncate_lines(self.clean(normalize(text)), self.max_chars), bad)

    def fingerprint(self, env: SourceEnv) -> dict:
        # Which files are read is part of what the shard depends on.
        return {**super().fingerprint(env), "select": [self.under, list(self.suffixes), self.exclude]}

    def clean(self, text: str) -> str:
        return text


class DirFiles(Source):
    """Files below a directory of the running system (no package pinned)."""

    suffixes: ClassVar[tuple[str, ...]]
    exclude: ClassVar[str | None] = None  # regex searched in the path relative to the root

    def root(self) -> Path:
        raise NotImplementedError

    def check(self, env: SourceEnv) -> str | None:
        return None if self.root().is_dir() else f"{self.root()} does not exist"

    def list_docs(self, env: SourceEnv) -> list[str]:
        root = self.root()
        pattern = re.compile(self.exclude) if self.exclude else None
        ids = []
        for dirpath, dirnames, files in os.walk(root):
            base = os.path.relpath(dirpath, root)
            base = "" if base == "." else base + "/"
            # Prune excluded folders while walking (site-packages can hold 100,000 files).
            dirnames[:] = sorted(d for d in dirnames if not (pattern and pattern.search(f"{base}{d}/")))
            for f in sorted(files):
                path = Path(dirpath) / f
                rel = base + f
                if f.endswith(self.suffixes) and not path.is_symlink() and not (pattern and pattern.search(rel)):
                    ids.append(rel)
        return ids

    def read_doc(self, env: SourceEnv, doc_id: str) -> Doc | None:
        text, bad = read_file(self.root() / doc_id, env)
        return Doc(doc_id, truncate_lines(self.clean(normalize(text)), self.max_chars), bad)

    def clean(self, text: str) -> str:
        return text

    def fingerprint(self, env: SourceEnv) -> dict:
        """No package pins these files, so a summary of their sizes and times stands in for a version."""
        stats = [(self.root() / i).stat() for i in self.list_docs(env)]
        summary = [len(stats), sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)]
        return {**super().fingerprint(env), "files": summary}


# ---- default mix -----------------------------------------------------------


@register
class PythonStdlib(DirFiles):
    name = "python_stdlib"
    domain = "code_python"
    licence = "PSF-2.0"
    description = "CPython standard library (.py) of the running interpreter, without tests and codec tables"
    suffixes = (".py",)
    # Tests are 60% of the stdlib and repetitive; encodings/ and pydoc_data/ are generated tables.
    exclude = r"(^|/)(site-packages|dist-packages|test|tests|idle_test|encodings|pydoc_data|__pycache__)/"

    def root(self) -> Path:
        return Path(sysconfig.get_paths()["stdlib"])

    def fingerprint(self, env: SourceEnv) -> dict:
        return {**super().fingerprint(env), "python": sys.version.split()[0]}

    def manifest(self) -> dict:
        return {**super().manifest(), "packages": [f"python {sys.version.split()[0]} stdlib"]}


# ---- optional domains --------------------------------------------------------


@register
class GoStd(DebFiles):
    name = "go_std"
    domain = "code_go"
    licence = "BSD-3-Clause"
    description = "Go 1.19 standard library, without _test.go and testdata/"
    packages = (Deb("golang-1.19-src", "1.19.8-2"),)
    under, suffixes, exclude = "/usr/share/go-1.19/src/", (".go",), r"(_test\.go$|/testdata/)"


@register
class RustStd(DebFiles):
    name = "rust_std"
    domain = "code_rust"
    licence = "MIT OR Apache-2.0"
    description = "Rust std/core/alloc library sources"
    packages = (Deb("rust-src", "1.63.0+dfsg1-2"),)
    # Debian's rust-src ships the whole rustc tree; keep the std/core/alloc crates, without tests.
    under, suffixes = "/usr/src/rustc-1.63.0/library/", (".rs",)
    exclude = r"(/library/(?!(std|core|alloc)/)|/tests/|/benches/)"


@register
class EmacsLisp(DebFiles):
    name = "emacs_lisp"
    domain = "code_elisp"
    licence = "GPL-3.0-or-later"
    description = "Emacs 28.2 Lisp sources (*.el.gz)"
    packages = (Deb("emacs-el", "1:28.2+1-15+deb12u4"),)
    under, suffixes = "/usr/share/emacs/", (".el.gz",)


@register
class PerlModules(DebFiles):
    name = "perl_modules"
    domain = "code_perl"
    licence = "GPL-1.0-or-later OR Artistic-1.0-Perl"
    description = "Perl 5.36 core modules (*.pm, with inline POD)"
    packages = (Deb("perl-modules-5.36", "5.36.0-7+deb12u2"),)
    under, suffixes = "/usr/share/perl/", (".pm",)


@register
class PythonDocs(DebFiles):
    name = "python_docs"
    domain = "en_tech"
    licence = "PSF-2.0 (documentation)"
    description = "Python 3.11 documentation reST sources"
    packages = (Deb("python3.11-doc", "3.11.2-6+deb12u6"),)
    under, suffixes = "/usr/share/doc/python3.11/html/_sources/", (".rst.txt",)


@register
class PariDoc(DebFiles):
    name = "pari_doc"
    domain = "math_tex"
    licence = "GPL-2.0-or-later"
    description = "PARI/GP manuals and tutorials (TeX with English prose)"
    packages = (Deb("pari-doc", "2.15.2-1"),)
    under, suffixes = "/usr/share/pari/doc/", (".tex",)


@register
class LatexMacros(DebFiles):
    name = "latex_macros"
    domain = "latex"
    licence = "LPPL-1.3c and other free licences"
    description = "LaTeX macro packages and classes (*.sty, *.cls)"
    packages = (
        Deb("texlive-latex-base", "2022.20230122-3"),
        Deb("texlive-latex-recommended", "2022.20230122-3"),
        Deb("texlive-science", "2022.20230122-1"),
    )
    under, suffixes = "/usr/share/texlive/texmf-dist/tex/latex/", (".sty", ".cls")


# ---- present on a fresh Debian/Python machine (tiny preset) ------------------


@register
class CHeaders(DebFiles):
    name = "c_headers"
    domain = "code_c"
    licence = "LGPL-2.1-or-later (glibc), GPL-2.0 WITH Linux-syscall-note (kernel headers)"
    description = "C headers of the C library and the Linux kernel API (/usr/include)"
    packages = (Deb("libc6-dev", mode="install"), Deb("linux-libc-dev", mode="install"))
    under, suffixes = "/usr/include/", (".h",)


@register
class PostgresSql(DebFiles):
    name = "postgres_sql"
    domain = "sql"
    licence = "PostgreSQL"
    description = "PostgreSQL 15 extension install/upgrade scripts (*.sql)"
    packages = (Deb("postgresql-15"),)
    under, suffixes = "/usr/share/postgresql/", (".sql",)
    min_chars = 120

    def clean(self, text: str) -> str:
        # `\echo Use "CREATE EXTENSION ..." \quit` is a psql guard, not SQL.
        return "\n".join(ln for ln in text.split("\n") if not ln.startswith("\\echo")).strip("\n")


@register
class DebianChangelogs(DirFiles):
    name = "debian_changelogs"
    domain = "changelog"
    licence = "per package (all DFSG-free)"
    description = "changelog.Debian.gz of the installed packages (semi-structured, log-like)"
    suffixes = ("changelog.Debian.gz",)
    max_chars = 20_000  # a few packages (glibc, systemd) have megabyte-long histories

    def root(self) -> Path:
        return Path("/usr/share/doc")
