"""Fixtures for the data-layer tests: synthetic user domains and the tiny preset."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from moe_testbed.data.build import BuildOptions, build_mix
from moe_testbed.data.progress import Progress

WORDS = {
    "alpha": [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "that",
        "with",
        "as",
        "by",
        "at",
        "from",
        "his",
        "her",
        "they",
    ],
    "digits": [str(i) for i in range(100)] + ["+", "-", "*", "=", "(", ")"],
    "cyr": [
        "и",
        "в",
        "не",
        "на",
        "я",
        "быть",
        "он",
        "с",
        "что",
        "а",
        "по",
        "это",
        "она",
        "этот",
        "к",
        "но",
        "они",
        "мы",
        "как",
        "из",
        "у",
    ],
}


def make_docs(kind: str, n_docs: int, words_per_doc: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = WORDS[kind]
    docs = []
    for i in range(n_docs):
        words = [rng.choice(vocab) for _ in range(words_per_doc)]
        lines = [" ".join(words[j : j + 12]) for j in range(0, len(words), 12)]
        docs.append(f"{kind} document {i}\n" + "\n".join(lines))
    return docs


def write_folder(root: Path, kind: str, n_docs: int = 30, words_per_doc: int = 120, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(make_docs(kind, n_docs, words_per_doc, seed)):
        (root / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    """A private data root: nothing is written to the user's cache."""
    root = tmp_path / "data_root"
    monkeypatch.setenv("MOE_TESTBED_DATA", str(root))
    return root


@pytest.fixture
def user_folders(tmp_path) -> dict[str, Path]:
    return {
        "alpha": write_folder(tmp_path / "in" / "alpha", "alpha", seed=1),
        "digits": write_folder(tmp_path / "in" / "digits", "digits", seed=2),
        "cyr": write_folder(tmp_path / "in" / "cyr", "cyr", seed=3),
    }


SMALL = dict(tokens_per_domain=1500, val_tokens_per_domain=300, vocab_size=300, tokenizer_bytes_per_domain=20_000)


def small_options(folders: dict[str, Path], **kw) -> BuildOptions:
    opts = dict(SMALL, preset="tiny", domains=[], user_domains=[(n, str(p)) for n, p in folders.items()])
    opts.update(kw)
    return BuildOptions(**opts)


@pytest.fixture
def small_mix(tmp_path, data_root, user_folders) -> Path:
    """A three-domain mix of synthetic user data (builds in about a second)."""
    return build_mix(small_options(user_folders), out=tmp_path / "mix", progress=Progress(quiet=True))


@pytest.fixture(scope="session")
def tiny_mix(request, tmp_path_factory) -> Path:
    """The tiny preset, built once per test session from what this machine has.

    Reuses the suite-wide ``tiny_data_dir`` fixture (tests/conftest.py) when it
    exists, so that the whole suite builds the tiny mix only once.
    """
    try:
        return Path(request.getfixturevalue("tiny_data_dir"))
    except pytest.FixtureLookupError:
        pass
    root = tmp_path_factory.mktemp("tiny_root")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOE_TESTBED_DATA", str(root))
        return build_mix(BuildOptions(preset="tiny"), progress=Progress(quiet=True))
