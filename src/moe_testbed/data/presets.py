"""Which sources make up each domain, and the two built-in presets.

``default`` is the 12-domain mix (docs/data.md): it needs Debian
packages and PyPI/npm downloads and takes minutes to build. ``tiny`` uses only
what a fresh Debian + Python machine already has (no install, no network) and
builds in seconds; tests and CI use it. A domain named in ``--domains`` is
looked up in the preset's table first, then in :data:`OPTIONAL_DOMAINS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_testbed.data.errors import DataError

DEFAULT_DOMAINS: dict[str, tuple[str, ...]] = {
    "en_prose": ("bible_web", "bible_kjv", "shakespeare"),
    "de": ("man_de", "fortunes_de"),
    "fr": ("man_fr",),
    "ru": ("man_ru", "fortunes_ru"),
    "ja": ("man_ja",),
    "es": ("bible_rv1909", "man_es", "fortunes_es"),
    "code_python": ("python_stdlib",),
    "code_c": ("glibc",),
    "code_js": ("npm_js",),
    "sql": ("mariadb_tests",),
    "math_formal": ("metamath_setmm",),
    "json": ("botocore_json",),
}

OPTIONAL_DOMAINS: dict[str, tuple[str, ...]] = {
    "code_go": ("go_std",),
    "code_rust": ("rust_std",),
    "code_java": ("openjdk_src",),
    "code_elisp": ("emacs_lisp",),
    "code_perl": ("perl_modules",),
    "latex": ("latex_macros",),
    "math_tex": ("pari_doc",),
    "en_tech": ("python_docs",),
    "en_man": ("man_en",),
    "en_fortunes": ("fortunes_en",),
    "csv": ("pydataset_csv",),
    "pl": ("man_pl",),
    "it": ("man_it", "fortunes_it"),
    "changelog": ("debian_changelogs",),
}

# Present on a fresh Debian 12 machine with Python 3 (the project's CI image):
# no apt-get, no network.
TINY_DOMAINS: dict[str, tuple[str, ...]] = {
    "en_man": ("man_en",),
    "de": ("man_system_de",),
    "fr": ("man_system_fr",),
    "code_python": ("python_stdlib",),
    "code_c": ("c_headers",),
    "code_perl": ("perl_modules",),
    "sql": ("postgres_sql",),
    "json": ("iso_codes_json",),
    "changelog": ("debian_changelogs",),
}


@dataclass(frozen=True)
class Preset:
    name: str
    domains: dict[str, tuple[str, ...]]
    tokens_per_domain: int  # training tokens per domain (at least)
    val_tokens_per_domain: int  # validation tokens per domain (at least)
    vocab_size: int
    tokenizer_bytes_per_domain: int  # text per domain the tokenizer is trained on (equal share)
    on_missing: str  # fail | skip: a source whose package is missing
    install: str  # auto | never


PRESETS: dict[str, Preset] = {
    "default": Preset(
        name="default",
        domains=DEFAULT_DOMAINS,
        tokens_per_domain=2_000_000,
        val_tokens_per_domain=100_000,
        vocab_size=8192,
        tokenizer_bytes_per_domain=2_000_000,
        on_missing="fail",
        install="auto",
    ),
    "tiny": Preset(
        name="tiny",
        domains=TINY_DOMAINS,
        tokens_per_domain=30_000,
        val_tokens_per_domain=10_000,
        vocab_size=2048,
        tokenizer_bytes_per_domain=100_000,
        on_missing="skip",  # the tiny mix is whatever of its sources the machine has
        install="never",  # and it never downloads
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise DataError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None


def domain_sources(preset: Preset, domain: str) -> tuple[str, ...]:
    if domain in preset.domains:
        return preset.domains[domain]
    if domain in DEFAULT_DOMAINS:
        return DEFAULT_DOMAINS[domain]
    if domain in OPTIONAL_DOMAINS:
        return OPTIONAL_DOMAINS[domain]
    known = sorted(set(preset.domains) | set(DEFAULT_DOMAINS) | set(OPTIONAL_DOMAINS))
    raise DataError(
        f"unknown domain {domain!r}: built-in domains are {', '.join(known)}; add your own with --domain NAME=PATH"
    )
