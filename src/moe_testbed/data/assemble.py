"""From extracted shards to one domain's train and validation token streams.

A domain's documents are the union of its sources' shards, deduplicated by
content, in :func:`~moe_testbed.data.sources.doc_key` order (pseudo-random
and stable). The split is by *document*, so no validation document is ever
seen in training:

1. the first documents, up to ``val_tokens * 8`` bytes, are *reserved* for
   validation and kept out of the tokenizer's training text;
2. after tokenizer training, validation takes reserved documents in order
   until it has ``val_tokens`` tokens (whole documents);
3. training takes the following documents until ``train_tokens``.

Every document is followed by EOS, so packing windows cross document
boundaries only at an EOS.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from moe_testbed.data.extract import read_shard
from moe_testbed.data.storage import guard_disk
from moe_testbed.data.tokenizer import encode_docs, token_dtype
from moe_testbed.io import atomic_write, atomic_write_json

VAL_RESERVE_BYTES_PER_TOKEN = 8  # generous: even Japanese and pretty JSON stay below this
ENCODE_BATCH = 64
ENCODED_FORMAT = 1


@dataclass
class DocRec:
    key: int
    source: str
    id: str
    text: str
    bad: int


def load_domain_docs(stage: Path, sources: list[str]) -> list[DocRec]:
    """All documents of a domain's shards, unique by text, in key order."""
    recs = [DocRec(d["k"], name, d["id"], d["t"], d.get("bad", 0)) for name in sources for d in read_shard(stage, name)]
    recs.sort(key=lambda r: (r.key, r.source, r.id))
    seen: set[bytes] = set()
    out = []
    for r in recs:
        h = hashlib.blake2b(r.text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if h not in seen:
            seen.add(h)
            out.append(r)
    return out


def reserve_index(docs: list[DocRec], val_tokens: int) -> int:
    """Index of the first document after the validation reserve."""
    budget, total = val_tokens * VAL_RESERVE_BYTES_PER_TOKEN, 0
    for i, r in enumerate(docs):
        if total >= budget:
            return i
        total += len(r.text.encode("utf-8", "surrogatepass"))
    return len(docs)


def tokenizer_sample(docs: list[DocRec], start: int, nbytes: int) -> list[str]:
    """The first ``nbytes`` of text after the validation reserve (a long document is cut)."""
    out, total = [], 0
    for r in docs[start:]:
        if total >= nbytes:
            break
        text = r.text[: max(nbytes - total, 0)] if len(r.text) > nbytes - total else r.text
        out.append(text)
        total += len(text.encode("utf-8", "surrogatepass"))
    return out


def docs_digest(docs: list[DocRec]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for r in docs:
        h.update(f"{r.key}\0{r.source}\0{r.id}\0".encode())
        h.update(hashlib.blake2b(r.text.encode("utf-8", "surrogatepass"), digest_size=16).digest())
    return h.hexdigest()


@dataclass
class Encoded:
    """One domain's split token streams; ``offsets`` hold each document's start plus the end."""

    tokens: dict[str, np.ndarray]
    offsets: dict[str, np.ndarray]
    ids: dict[str, list[list[str]]]  # [source, document id] per document
    bytes: dict[str, int]
    bad_chars: int
    short: bool  # the domain ran out of documents before a target was met

    def count(self, split: str) -> int:
        return int(self.tokens[split].size)


def _take(tok: Tokenizer, docs: list[DocRec], start: int, target: int, eos: int, dtype: np.dtype):
    """Encode whole documents from ``start`` until ``target`` tokens; return (pieces, next index)."""
    pieces: list[np.ndarray] = []
    total, i = 0, start
    while i < len(docs) and total < target:
        batch = docs[i : i + ENCODE_BATCH]
        for ids in encode_docs(tok, [r.text for r in batch]):
            arr = np.empty(len(ids) + 1, dtype=dtype)
            arr[:-1] = ids
            arr[-1] = eos
            pieces.append(arr)
            total += arr.size
            i += 1
            if total >= target:
                break
    return pieces, i


def encode_domain(tok: Tokenizer, docs: list[DocRec], val_tokens: int, train_tokens: int, eos: int) -> Encoded:
    dtype = token_dtype(tok.get_vocab_size())
    val, j = _take(tok, docs, 0, val_tokens, eos, dtype)
    train, k = _take(tok, docs, j, train_tokens, eos, dtype)
    spans = {"val": (0, j, val), "train": (j, k, train)}
    out = Encoded({}, {}, {}, {}, sum(r.bad for r in docs[:k]), False)
    for split, (a, b, pieces) in spans.items():
        lengths = np.array([p.size for p in pieces], dtype=np.int64)
        out.tokens[split] = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
        out.offsets[split] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        out.ids[split] = [[r.source, r.id] for r in docs[a:b]]
        out.bytes[split] = sum(len(r.text.encode("utf-8", "surrogatepass")) for r in docs[a:b])
    out.short = out.count("val") < val_tokens or out.count("train") < train_tokens
    return out


def encoded_paths(stage: Path, domain: str) -> tuple[Path, Path]:
    return stage / f"{domain}.npz", stage / f"{domain}.meta.json"


def load_encoded(stage: Path, domain: str, fingerprint: dict) -> Encoded | None:
    arrays, meta_path = encoded_paths(stage, domain)
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != ENCODED_FORMAT or meta["fingerprint"] != fingerprint:
            return None
        with np.load(arrays) as z:
            tokens = {s: z[f"{s}_tokens"] for s in ("train", "val")}
            offsets = {s: z[f"{s}_offsets"] for s in ("train", "val")}
    except (OSError, ValueError, KeyError):
        return None
    return Encoded(tokens, offsets, meta["ids"], meta["bytes"], meta["bad_chars"], meta["short"])


def save_encoded(stage: Path, domain: str, fingerprint: dict, enc: Encoded) -> None:
    arrays, meta_path = encoded_paths(stage, domain)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                **{f"{s}_tokens": enc.tokens[s] for s in enc.tokens},
                **{f"{s}_offsets": enc.offsets[s] for s in enc.offsets},
            )

    guard_disk(str(arrays), lambda: atomic_write(arrays, write))
    meta = {
        "format": ENCODED_FORMAT,
        "fingerprint": fingerprint,
        "ids": enc.ids,
        "bytes": enc.bytes,
        "bad_chars": enc.bad_chars,
        "short": enc.short,
    }
    guard_disk(str(meta_path), lambda: atomic_write_json(meta_path, meta))
