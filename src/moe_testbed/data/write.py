"""Write a built mix: concatenated split arrays, document lists, manifest (last)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moe_testbed.data.assemble import Encoded
from moe_testbed.data.storage import SPLITS, guard_disk, save_array, save_json, write_manifest
from moe_testbed.data.tokenizer import eos_id, token_dtype
from moe_testbed.io import sha256_file

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from moe_testbed.data.packages import Resolved
    from moe_testbed.data.plan import Plan
    from moe_testbed.data.progress import Progress
    from moe_testbed.data.sources import Source


EXTRACT_STATS = ("documents", "bytes", "complete", "duplicates", "skipped_short", "bad_chars",
                 "docs_with_bad_chars", "seconds")  # fmt: skip


def write_mix(
    out: Path,
    plan: Plan,
    fingerprint: str,
    domains: dict[str, list[Source]],
    encoded: dict[str, Encoded],
    metas: dict[str, dict],
    resolved: dict[str, Resolved],
    tok: Tokenizer,
    tok_path: Path,
    progress: Progress,
) -> dict:
    """Write the split arrays, the tokenizer and (last) mix.json; returns the manifest."""
    names = list(domains)
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    files, ranges, totals = _write_splits(out, names, encoded, vocab, dtype)
    guard_disk("tokenizer.json", lambda: shutil.copyfile(tok_path, out / "tokenizer.json"))
    files["tokenizer.json"] = sha256_file(out / "tokenizer.json")
    sources_out = {
        s.name: {
            **s.manifest(),
            "resolved": [resolved[r.key].manifest() for r in s.packages if r.key in resolved],
            "extracted": {k: metas[s.name][k] for k in EXTRACT_STATS},
        }
        for d in names
        for s in domains[d]
    }
    domains_out = [
        {
            "id": i,
            "name": d,
            "sources": [s.name for s in domains[d]],
            "licence": "; ".join(dict.fromkeys(s.licence for s in domains[d])),
            "tokens": {s: encoded[d].count(s) for s in SPLITS},
            "documents": {s: len(encoded[d].ids[s]) for s in SPLITS},
            "bytes": dict(encoded[d].bytes),
            "bad_chars": encoded[d].bad_chars,
            "ranges": ranges[d],
        }
        for i, d in enumerate(names)
    ]
    manifest = {
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(progress.elapsed(), 1),
        "settings": plan.settings(),
        "vocab_size": vocab,
        "eos_id": eos_id(tok),
        "token_dtype": dtype.name,
        "tokenizer": {
            "file": "tokenizer.json",
            "type": "byte-level BPE (Hugging Face tokenizers)",
            "requested_vocab_size": plan.vocab_size,
            "trained_on_bytes_per_domain": plan.tok_bytes,
        },
        "splits": {s: {"tokens": totals[s], "rule": "by document"} for s in SPLITS},
        "domains": domains_out,
        "sources": sources_out,
        "files": files,
    }
    write_manifest(out, manifest)
    return manifest


def _write_splits(out: Path, names: list[str], encoded: dict[str, Encoded], vocab: int, dtype) -> tuple:
    """Per split: concatenated tokens, domain ids and document offsets; (file digests, ranges, totals)."""
    files: dict[str, str] = {}
    ranges: dict[str, dict[str, dict[str, list[int]]]] = {d: {} for d in names}
    totals = {}
    for split in SPLITS:
        parts = [encoded[d].tokens[split].astype(dtype, copy=False) for d in names]
        tokens = np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
        dom = np.concatenate([np.full(p.size, i, dtype=np.uint8) for i, p in enumerate(parts)])
        starts, doc_meta, tok_pos, doc_pos = [], [], 0, 0
        for d in names:
            enc = encoded[d]
            starts.append(enc.offsets[split][:-1] + tok_pos)
            doc_meta.extend([d, src, doc_id] for src, doc_id in enc.ids[split])
            n_docs = len(enc.ids[split])
            ranges[d][split] = {"tokens": [tok_pos, tok_pos + enc.count(split)], "docs": [doc_pos, doc_pos + n_docs]}
            tok_pos += enc.count(split)
            doc_pos += n_docs
        offsets = np.concatenate(starts + [np.array([tok_pos], dtype=np.int64)]).astype(np.int64)
        for what, arr in (("tokens", tokens), ("domains", dom), ("docs", offsets)):
            path = out / f"{split}.{what}.npy"
            save_array(path, arr)
            files[path.name] = sha256_file(path)
        save_json(out / f"{split}.docs.json", doc_meta)
        totals[split] = int(tokens.size)
        if split == "train":
            freq = np.bincount(tokens, minlength=vocab).astype(np.int64)
            save_array(out / "train.freq.npy", freq)
    return files, ranges, totals
