"""A mix's identity, and whether a built mix is the one a preset's published numbers were measured on.

The fingerprint (``DomainMix.fingerprint``) hashes the mix's token arrays and
tokenizer. Each built-in preset ships the identity of the mix its README and
docs numbers come from (``data/reference/<preset>.json``: the fingerprint, the
token and document counts of every domain, the package versions of every
source). ``data build`` and ``data info`` compare a built mix with it and say
what differs: a newer package in a registry, a different document count, ...
A run's numbers are comparable across labs only when the fingerprints match.
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_testbed.data.mix import content_fingerprint

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def identity(manifest: dict) -> dict:
    """What identifies a built mix: fingerprint, per-domain counts, per-source package versions."""
    return {
        "fingerprint": content_fingerprint(manifest),
        "domains": {d["name"]: {"tokens": d["tokens"], "documents": d["documents"]} for d in manifest["domains"]},
        "packages": {
            name: [f"{p['name']} {p['version']}" for p in s.get("resolved") or []]
            for name, s in manifest["sources"].items()
        },  # fmt: skip
    }


def reference_identity(preset: str) -> dict | None:
    path = REFERENCE_DIR / f"{preset}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def differences(manifest: dict, reference: dict) -> list[str]:
    """How a built mix differs from a reference identity (empty when the fingerprints match)."""
    mine = identity(manifest)
    if mine["fingerprint"] == reference["fingerprint"]:
        return []
    out = []
    for src, versions in mine["packages"].items():
        ref = reference["packages"].get(src)
        if ref is not None and ref != versions:
            out.append(f"source {src}: {', '.join(versions) or 'no package'} (reference: {', '.join(ref)})")
    for name in sorted(set(mine["domains"]) ^ set(reference["domains"])):
        out.append(f"domain {name}: {'only in this mix' if name in mine['domains'] else 'missing here'}")
    for name, counts in mine["domains"].items():
        ref = reference["domains"].get(name)
        if ref is None:
            continue
        for what in ("documents", "tokens"):
            for split in ("train", "val"):
                if counts[what][split] != ref[what][split]:
                    out.append(
                        f"domain {name}: {counts[what][split]:,} {split} {what} (reference: {ref[what][split]:,})"
                    )
    return out or ["the token arrays differ although every count and package version matches"]


def identity_line(manifest: dict, preset: str | None) -> list[str]:
    """What ``data build`` and ``data info`` say about a mix's identity."""
    fp = content_fingerprint(manifest)
    ref = reference_identity(preset) if preset else None
    if ref is not None and sorted(ref["domains"]) != sorted(d["name"] for d in manifest["domains"]):
        ref = None  # a customised build of the preset (other domains): no reference applies
    if ref is None:
        return [f"mix fingerprint {fp} (no reference for this mix)"]
    diff = differences(manifest, ref)
    if not diff:
        return [f"mix fingerprint {fp}: matches the {preset} reference (the mix the published numbers come from)"]
    head = (f"mix fingerprint {fp} differs from the {preset} reference {ref['fingerprint']} "
            f"({ref.get('built', '')}): numbers measured on it are not comparable with the published ones")  # fmt: skip
    return [head, *(f"  {d}" for d in diff[:20]), *(["  ..."] if len(diff) > 20 else [])]
