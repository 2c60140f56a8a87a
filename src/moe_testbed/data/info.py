"""``moe-testbed data info``: what a built mix holds, as tables."""

from __future__ import annotations

import sys
from typing import TextIO

from moe_testbed.data.identity import identity_line
from moe_testbed.data.mix import DomainMix


def _versions(src: dict) -> str:
    pkgs = src.get("resolved") or []
    if pkgs:
        return ", ".join(f"{p['name']} {p['version']}" for p in pkgs)
    return ", ".join(src.get("packages") or []) or src.get("path", "")


def domain_rows(mix: DomainMix) -> list[list[str]]:
    rows = []
    for d in mix.manifest["domains"]:
        tr, va = d["tokens"]["train"], d["tokens"]["val"]
        bpt = d["bytes"]["train"] / tr if tr else 0.0
        rows.append(
            [
                str(d["id"]),
                d["name"],
                f"{d['documents']['train']:,}",
                f"{d['documents']['val']:,}",
                f"{tr:,}",
                f"{va:,}",
                f"{bpt:.2f}",
                d["licence"],
            ]
        )
    return rows


def source_rows(mix: DomainMix) -> list[list[str]]:
    rows = []
    for name, s in mix.manifest["sources"].items():
        ex = s.get("extracted", {})
        rows.append(
            [
                name,
                s["domain"],
                f"{ex.get('documents', 0):,}",
                f"{ex.get('bytes', 0) / 1e6:.2f}",
                str(ex.get("bad_chars", 0)),
                _versions(s),
            ]
        )
    return rows


DOMAIN_HEAD = ["id", "domain", "docs train", "docs val", "tokens train", "tokens val", "bytes/token", "licence"]
SOURCE_HEAD = ["source", "domain", "docs", "MB extracted", "bad chars", "packages (versions)"]


def _plain(title: str, head: list[str], rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {i for i, h in enumerate(head) if h.startswith(("docs", "tokens", "bytes", "MB", "bad", "id"))}
    print(title, file=out)
    for r in [head, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells).rstrip(), file=out)
    print(file=out)


def _rich(title: str, head: list[str], rows: list[list[str]], out: TextIO) -> bool:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    table = Table(title=title, title_justify="left")
    for h in head:
        numeric = h.startswith(("docs", "tokens", "bytes", "MB", "bad", "id"))
        table.add_column(h, justify="right" if numeric else "left", overflow="fold")
    for r in rows:
        table.add_row(*r)
    Console(file=out, width=None if out.isatty() else 160).print(table)
    return True


def sample_text(mix: DomainMix, domain: str, n_tokens: int = 60) -> str:
    a, b = mix.domain_range("train", domain)
    ids = mix.array("train", "tokens")[a : min(b, a + n_tokens)]
    return mix.decode(ids)


def print_info(mix: DomainMix, samples: bool = False, out: TextIO | None = None, plain: bool = False) -> None:
    out = out or sys.stdout
    m = mix.manifest
    s = m["settings"]
    print(f"mix {mix.path}  (preset {s['preset']}, built {m['created']} in {m['build_seconds']}s)", file=out)
    print(
        f"tokenizer: {m['tokenizer']['type']}, vocab {mix.vocab_size}, EOS id {mix.eos_id}, "
        f"{m['token_dtype']} tokens; split by document",
        file=out,
    )
    print(
        f"tokens: train {m['splits']['train']['tokens']:,}, val {m['splits']['val']['tokens']:,} "
        f"(requested per domain: {s['tokens_per_domain']:,} train, {s['val_tokens_per_domain']:,} val)",
        file=out,
    )
    for line in identity_line(m, s["preset"]):
        print(line, file=out)
    print(file=out)
    for title, head, rows in (("Domains", DOMAIN_HEAD, domain_rows(mix)), ("Sources", SOURCE_HEAD, source_rows(mix))):
        if plain or not _rich(title, head, rows, out):
            _plain(title, head, rows, out)
    if samples:
        print("Samples (start of each domain's training stream):", file=out)
        for d in mix.domains:
            text = sample_text(mix, d).replace("\n", "\u21b5 ")
            print(f"  [{d}] {text[:300]}", file=out)
