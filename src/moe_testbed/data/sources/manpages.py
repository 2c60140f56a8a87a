"""Man pages rendered to plain text: the natural-language domains.

Each page is rendered by its own ``man`` process (``man -E UTF-8 --nh --nj -l``)
whose output is read separately: several renderers writing into one stream
interleave and split UTF-8 characters. The builder runs ``read_doc`` for
several pages at once (``parallel = True``), one ``man`` process each.

Cleaning (docs/data.md): skip symlinks and ``.so`` stubs (they repeat other
pages), drop the running header and footer lines, cut the translator /
colophon section that ends almost every translated page, dedupe by content
(done by the builder for every source).
"""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path
from typing import ClassVar

from moe_testbed.data.packages import Deb
from moe_testbed.data.sources.base import (
    Doc,
    Source,
    SourceEnv,
    deb_doc_ids,
    deb_doc_path,
    decode,
    normalize,
    register,
)

# Section headings (at column 0) whose section is boilerplate, not page content.
DROP_SECTIONS = frozenset(
    {
        "ÜBERSETZUNG",
        "TRADUCTION",
        "TRADUCCIÓN",
        "TŁUMACZENIE",
        "ПЕРЕВОД",
        "TRADUZIONE",
        "VERTALING",
        "TRADUÇÃO",
        "COLOPHON",
        "この文書について",
        "翻訳者",
    }
)

MAN_TOOLS = (Deb("man-db", mode="install"), Deb("groff-base", mode="install"))


def clean_rendered(text: str) -> str:
    """Drop header/footer lines and translator/colophon sections of a rendered page."""
    lines = text.replace("\r\n", "\n").split("\n")
    nonempty = [i for i, ln in enumerate(lines) if ln.strip()]
    if len(nonempty) < 3:
        return ""
    # The first and last non-empty lines are the running header ("LS(1) ... LS(1)") and footer.
    body = lines[nonempty[0] + 1 : nonempty[-1]]
    out, dropping = [], False
    for ln in body:
        if ln[:1].strip():  # a line starting at column 0 is a section heading
            dropping = ln.strip() in DROP_SECTIONS
        if not dropping:
            out.append(ln)
    return normalize("\n".join(out))


def is_so_stub(raw: bytes) -> bool:
    """A page that only sources another page (``.so man3/foo.3``) repeats that page."""
    head = raw.lstrip()[:200]
    return head.startswith(b".so ") and head.count(b"\n") <= 2


def render_page(path: Path, timeout: float = 120.0) -> bytes:
    env = dict(
        os.environ,
        MANWIDTH="100",
        LC_ALL="C.UTF-8",
        MANPAGER="cat",
        PAGER="cat",
        MAN_DISABLE_SECCOMP="1",  # the seccomp sandbox fails in some containers
    )
    env.pop("MAN_KEEP_FORMATTING", None)
    proc = subprocess.run(
        ["man", "-E", "UTF-8", "--nh", "--nj", "-l", str(path)],
        env=env,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return proc.stdout if proc.returncode == 0 else b""


def read_page(path: Path, doc_id: str, env: SourceEnv) -> Doc | None:
    raw = path.read_bytes()
    if is_so_stub(gzip.decompress(raw) if path.suffix == ".gz" else raw):
        return None
    text, bad = decode(render_page(path), env.encoding_errors, f"rendered man page {doc_id}")
    return Doc(doc_id, clean_rendered(text), bad)


class ManPages(Source):
    """Pages of the man-page packages below /usr/share/man/<lang>/ (or man*/ for English)."""

    lang: ClassVar[str | None]
    content: ClassVar[tuple[str, ...]]  # the packages holding the pages (the rest are tools)
    parallel = True
    version = 2

    def list_docs(self, env: SourceEnv) -> list[str]:
        under = f"/usr/share/man/{self.lang}/man" if self.lang else "/usr/share/man/man"
        return deb_doc_ids(env, self.content, under, (".gz", ".1", ".2", ".3", ".4", ".5", ".6", ".7", ".8"))

    def read_doc(self, env: SourceEnv, doc_id: str) -> Doc | None:
        return read_page(deb_doc_path(env, doc_id), doc_id, env)


def _man(version: str, pkgs: tuple[str, ...]) -> tuple:
    return tuple(Deb(p, version) for p in pkgs) + MAN_TOOLS


@register
class ManDe(ManPages):
    name, domain, lang = "man_de", "de", "de"
    licence = "GPL-3.0-or-later (translations); originals under free man-page licences"
    description = "German translations of the Linux man pages (manpages-l10n)"
    content = ("manpages-de", "manpages-de-dev")
    packages = _man("4.18.1-1", content)


@register
class ManFr(ManPages):
    name, domain, lang = "man_fr", "fr", "fr"
    licence = "GPL-3.0-or-later (translations); originals under free man-page licences"
    description = "French translations of the Linux man pages (manpages-l10n)"
    content = ("manpages-fr", "manpages-fr-dev")
    packages = _man("4.18.1-1", content)


@register
class ManEs(ManPages):
    name, domain, lang = "man_es", "es", "es"
    licence = "GPL-3.0-or-later (translations); originals under free man-page licences"
    description = "Spanish translations of the Linux man pages (manpages-l10n)"
    content = ("manpages-es", "manpages-es-dev")
    packages = _man("4.18.1-1", content)


@register
class ManRu(ManPages):
    name, domain, lang = "man_ru", "ru", "ru"
    licence = "GPL-3.0-or-later (translations); originals under free man-page licences"
    description = "Russian translations of the Linux man pages (manpages-l10n)"
    content = ("manpages-ru", "manpages-ru-dev")
    packages = _man("4.18.1-1", content)


@register
class ManJa(ManPages):
    name, domain, lang = "man_ja", "ja", "ja"
    licence = "same as each original page (DFSG-free)"
    description = "Japanese man pages of the JM project"
    content = ("manpages-ja", "manpages-ja-dev")
    packages = _man("0.5.0.0.20221215+dfsg-1", content)


@register
class ManPl(ManPages):
    name, domain, lang = "man_pl", "pl", "pl"
    licence = "GPL-3.0-or-later (translations); originals under free man-page licences"
    description = "Polish translations of the Linux man pages (about 18% of paragraphs still English)"
    content = ("manpages-pl", "manpages-pl-dev")
    packages = _man("1:4.18.1-1", content)


@register
class ManIt(ManPages):
    name, domain, lang = "man_it", "it", "it"
    licence = "GPL-3.0-or-later (translations); originals under free man-page licences"
    description = "Italian translations of the Linux man pages (about 21% of paragraphs still English)"
    content = ("manpages-it",)
    packages = _man("4.18.1-1", content)


@register
class ManEn(ManPages):
    name, domain, lang = "man_en", "en_man", None
    licence = "Linux man-pages copyleft, GPL, BSD (mixed free)"
    description = "English Linux man pages (manpages, manpages-dev), rendered"
    content = ("manpages", "manpages-dev")
    packages = (Deb("manpages", "6.03-2"), Deb("manpages-dev", "6.03-2"), *MAN_TOOLS)


class SystemManPages(Source):
    """Translated pages that the base system's own packages ship (dpkg, apt, shadow, ...).

    A fresh Debian machine has a few hundred of these without any manpages-l10n
    package, which is what lets the tiny preset have natural-language domains
    with no download.
    """

    lang: ClassVar[str]
    parallel = True
    version = 2
    packages = MAN_TOOLS

    def root(self) -> Path:
        return Path("/usr/share/man") / self.lang

    def check(self, env: SourceEnv) -> str | None:
        return None if self.root().is_dir() else f"{self.root()} does not exist"

    def list_docs(self, env: SourceEnv) -> list[str]:
        root = self.root()
        ids = []
        for dirpath, dirnames, files in os.walk(root):
            dirnames.sort()
            for f in sorted(files):
                path = Path(dirpath) / f
                if not path.is_symlink():
                    ids.append(str(path.relative_to(root)))
        return ids

    def read_doc(self, env: SourceEnv, doc_id: str) -> Doc | None:
        return read_page(self.root() / doc_id, doc_id, env)


@register
class SystemManDe(SystemManPages):
    name, domain, lang = "man_system_de", "de", "de"
    licence = "per package (GPL-2.0-or-later for dpkg, apt, shadow, util-linux)"
    description = "German man pages shipped by the base system's packages"


@register
class SystemManFr(SystemManPages):
    name, domain, lang = "man_system_fr", "fr", "fr"
    licence = "per package (GPL-2.0-or-later for dpkg, apt, shadow, util-linux)"
    description = "French man pages shipped by the base system's packages"
