"""Extract a source's documents into a cached shard.

A shard is ``<stage>/<source>.jsonl`` (one ``{"k", "id", "t", "bad"}`` object
per document, in key order) plus ``<source>.meta.json``, written *after* the
shard: a shard without its meta file is an interrupted extraction and is
redone. A shard is reused when its fingerprint (source code version, package
versions and checksums) matches and it holds at least the requested bytes or
the whole source.

Which documents are kept does not depend on how they were produced: unique
texts (by content hash, keeping the copy with the smallest key), at least
``min_chars`` long, smallest :func:`doc_key` first, until ``cap_bytes`` of
UTF-8 text. A larger cap therefore only appends documents; a smaller budget
reads a prefix of a larger shard.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moe_testbed.data.sources import Doc, Source, SourceEnv, doc_key
from moe_testbed.io import atomic_write, atomic_write_json

SHARD_FORMAT = 1


def shard_paths(stage: Path, name: str) -> tuple[Path, Path]:
    return stage / f"{name}.jsonl", stage / f"{name}.meta.json"


def read_meta(stage: Path, name: str) -> dict | None:
    _, meta = shard_paths(stage, name)
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError):
        return None


def read_shard(stage: Path, name: str) -> Iterator[dict]:
    path, _ = shard_paths(stage, name)
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def _text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class _Selector:
    """Keeps unique documents with the smallest keys until ``cap_bytes``."""

    def __init__(self, src: Source, cap_bytes: int) -> None:
        self.src, self.cap = src, cap_bytes
        self.live: dict[int, tuple[Doc, int]] = {}  # key -> (doc, utf-8 bytes)
        self.heap: list[int] = []  # negated keys: the largest key on top
        self.best: dict[bytes, int] = {}  # text hash -> smallest key seen
        self.total = 0
        self.dropped = False  # a document was left out for the cap: the shard is not the whole source
        self.short = self.duplicates = 0

    def full(self) -> bool:
        return self.total >= self.cap

    def add(self, doc: Doc) -> None:
        if len(doc.text) < self.src.min_chars:
            self.short += 1
            return
        key, h = doc_key(self.src.name, doc.id), _text_hash(doc.text)
        if key in self.live:  # the same document id twice: keep the first
            self.duplicates += 1
            return
        old = self.best.get(h)
        if old is not None and old <= key:
            self.duplicates += 1
            return
        if old is not None:
            self.duplicates += 1
            if old in self.live:
                self.total -= self.live.pop(old)[1]
        self.best[h] = key
        if self.full() and self.heap and key > -self.heap[0]:
            self.dropped = True
            return
        n = len(doc.text.encode("utf-8", "surrogatepass"))
        self.live[key] = (doc, n)
        heapq.heappush(self.heap, -key)
        self.total += n
        while self.heap:  # evict from the top while the rest still reaches the cap
            top = -self.heap[0]
            if top not in self.live:
                heapq.heappop(self.heap)
            elif self.total - self.live[top][1] >= self.cap:
                heapq.heappop(self.heap)
                self.total -= self.live.pop(top)[1]
                self.dropped = True
            else:
                break

    def docs(self) -> list[tuple[int, Doc]]:
        return sorted((k, d) for k, (d, _) in self.live.items())


def _random_access(src: Source, env: SourceEnv, ids: list[str], sel: _Selector, tick: Callable[[], None]) -> None:
    """Read documents in key order and stop once the cap is reached (slow sources do no extra work).

    A parallel source's ``read_doc`` runs an external process per document (one
    ``man`` per page), so threads are enough to keep every core busy. Threads
    also avoid the traps of a process pool here: forking a trainer that runs
    torch's threads, or a spawned child re-running an unguarded ``__main__``.
    """
    order = sorted(set(ids), key=lambda i: doc_key(src.name, i))
    if src.parallel and env.workers > 1 and len(order) > 1:
        pool = ThreadPoolExecutor(max_workers=env.workers, thread_name_prefix=f"extract-{src.name}")
        try:
            _consume(pool.map(lambda i: src.read_doc(env, i), order), sel, tick, len(order))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # pages not started when the cap was reached
    else:
        _consume((src.read_doc(env, i) for i in order), sel, tick, len(order))


def _consume(results: Iterable[Doc | None], sel: _Selector, tick: Callable[[], None], n: int) -> None:
    for seen, doc in enumerate(results, 1):
        if doc is not None:
            sel.add(doc)
        tick()
        if sel.full():
            sel.dropped = sel.dropped or seen < n
            return


def extract_source(
    src: Source,
    env: SourceEnv,
    stage: Path,
    cap_bytes: int,
    progress: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Extract ``src`` into ``stage`` (or reuse the cached shard); return the shard's meta."""
    fingerprint = json.loads(json.dumps(src.fingerprint(env)))  # as stored: tuples become lists
    meta = read_meta(stage, src.name)
    reusable = meta and meta.get("format") == SHARD_FORMAT and meta["fingerprint"] == fingerprint
    if reusable and (meta["complete"] or meta["cap_bytes"] >= cap_bytes):
        return meta
    t0 = time.monotonic()
    sel = _Selector(src, cap_bytes)
    count = [0]

    def tick() -> None:
        count[0] += 1
        if count[0] % 50 == 0:
            progress(f"{src.name}: {count[0]} documents read, {sel.total / 1e6:.1f} MB kept")

    ids = src.list_docs(env)
    if ids is not None:
        _random_access(src, env, ids, sel, tick)
    else:
        for doc in src.iter_docs(env):
            sel.add(doc)
            tick()
    docs = sel.docs()
    path, meta_path = shard_paths(stage, src.name)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            for key, doc in docs:
                fh.write(json.dumps({"k": key, "id": doc.id, "t": doc.text, "bad": doc.bad}, ensure_ascii=False))
                fh.write("\n")

    atomic_write(path, write)
    meta = {
        "format": SHARD_FORMAT,
        "source": src.name,
        "fingerprint": fingerprint,
        "cap_bytes": cap_bytes,
        "complete": not sel.dropped,
        "documents": len(docs),
        "bytes": sum(len(d.text.encode("utf-8", "surrogatepass")) for _, d in docs),
        "bad_chars": sum(d.bad for _, d in docs),
        "docs_with_bad_chars": sum(1 for _, d in docs if d.bad),
        "skipped_short": sel.short,
        "duplicates": sel.duplicates,
        "seconds": round(time.monotonic() - t0, 2),
    }
    atomic_write_json(meta_path, meta)  # last: marks the shard complete
    return meta
