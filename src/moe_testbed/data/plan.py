"""A build plan: the options of ``data build`` resolved against the preset, and the mix's fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from moe_testbed.data.errors import DataError
from moe_testbed.data.paths import preset_dir
from moe_testbed.data.presets import Preset, domain_sources, get_preset
from moe_testbed.data.sources import Source, SourceEnv, get_source
from moe_testbed.data.sources.base import ENCODING_ERRORS
from moe_testbed.data.user import UserSource

MAX_DOMAINS = 255  # domain ids are uint8


@dataclass
class BuildOptions:
    preset: str = "tiny"
    domains: list[str] | None = None  # None: the preset's; []: none (a mix of user domains only)
    user_domains: list[tuple[str, str]] = field(default_factory=list)  # (name, path)
    tokens_per_domain: int | None = None
    val_tokens_per_domain: int | None = None
    vocab_size: int | None = None
    tokenizer_bytes_per_domain: int | None = None
    tokenizer_from: str | None = None  # a built mix whose tokenizer this mix reuses (same token ids)
    install: str | None = None  # auto | never (None: the preset's)
    on_missing: str | None = None  # fail | skip (None: the preset's)
    encoding_errors: str = "replace"
    workers: int | None = None
    force: bool = False


@dataclass
class Plan:
    preset: Preset
    domains: dict[str, list[Source]]
    train_tokens: int
    val_tokens: int
    vocab_size: int
    tok_bytes: int
    install: str
    on_missing: str
    encoding_errors: str
    workers: int
    customized: bool
    tokenizer_from: Path | None = None  # the tokenizer.json to reuse instead of training one
    tokenizer_sha: str | None = None

    def settings(self) -> dict:
        return {
            **({"tokenizer_from": self.tokenizer_sha} if self.tokenizer_sha else {}),
            "preset": self.preset.name,
            "domains": {d: [s.name for s in srcs] for d, srcs in self.domains.items()},
            "tokens_per_domain": self.train_tokens,
            "val_tokens_per_domain": self.val_tokens,
            "vocab_size": self.vocab_size,
            "tokenizer_bytes_per_domain": self.tok_bytes,
            "encoding_errors": self.encoding_errors,
        }


def _positive(name: str, value: int | None, default: int) -> int:
    value = default if value is None else value
    if not isinstance(value, int) or value < 1:
        raise DataError(f"{name}={value!r} must be a positive integer")
    return value


def make_plan(opts: BuildOptions) -> Plan:
    preset = get_preset(opts.preset)
    names = list(preset.domains) if opts.domains is None else list(opts.domains)
    if len(set(names)) != len(names):
        raise DataError(f"--domains names a domain twice: {', '.join(names)}")
    domains: dict[str, list[Source]] = {d: [get_source(s) for s in domain_sources(preset, d)] for d in names}
    for name, path in opts.user_domains:
        if name in domains:
            raise DataError(f"--domain {name}=... clashes with the built-in domain {name}: choose another name")
        domains[name] = [UserSource(name, Path(path))]
    if not domains:
        raise DataError("the mix has no domains: name built-in domains with --domains or add --domain NAME=PATH")
    if len(domains) > MAX_DOMAINS:
        raise DataError(f"{len(domains)} domains exceed the limit of {MAX_DOMAINS} (domain ids are uint8)")
    vocab = _positive("--vocab-size", opts.vocab_size, preset.vocab_size)
    tok_file, tok_sha = _tokenizer_from(opts.tokenizer_from)
    if tok_file is not None:
        if opts.vocab_size is not None:
            raise DataError("--vocab-size and --tokenizer-from both set the vocabulary: drop --vocab-size")
        vocab = int(json.loads((tok_file.parent / "mix.json").read_text())["vocab_size"])
    if vocab < 257:
        raise DataError(f"--vocab-size {vocab} is too small: byte-level BPE needs at least 257 (256 bytes + EOS)")
    install = opts.install or preset.install
    if install not in ("auto", "never"):
        raise DataError(f"--install {install!r} is not allowed: choose auto or never")
    on_missing = opts.on_missing or preset.on_missing
    if on_missing not in ("fail", "skip"):
        raise DataError(f"--on-missing {on_missing!r} is not allowed: choose fail or skip")
    if opts.encoding_errors not in ENCODING_ERRORS:
        raise DataError(f"--encoding-errors {opts.encoding_errors!r} is not allowed: choose replace or strict")
    customized = (
        opts.domains is not None
        or bool(opts.user_domains)
        or any(
            v is not None
            for v in (
                opts.tokens_per_domain,
                opts.val_tokens_per_domain,
                opts.vocab_size,
                opts.tokenizer_bytes_per_domain,
                opts.tokenizer_from,
            )
        )
        or opts.encoding_errors != "replace"
    )
    return Plan(
        preset=preset,
        domains=domains,
        train_tokens=_positive("--tokens-per-domain", opts.tokens_per_domain, preset.tokens_per_domain),
        val_tokens=_positive("--val-tokens-per-domain", opts.val_tokens_per_domain, preset.val_tokens_per_domain),
        vocab_size=vocab,
        tok_bytes=_positive(
            "--tokenizer-bytes-per-domain", opts.tokenizer_bytes_per_domain, preset.tokenizer_bytes_per_domain
        ),
        install=install,
        on_missing=on_missing,
        encoding_errors=opts.encoding_errors,
        workers=_positive("--workers", opts.workers, os.cpu_count() or 1),
        customized=customized,
        tokenizer_from=tok_file,
        tokenizer_sha=tok_sha,
    )


def _tokenizer_from(mix_dir: str | None) -> tuple[Path | None, str | None]:
    """``--tokenizer-from MIX``: that built mix's tokenizer.json and its digest."""
    if mix_dir is None:
        return None, None
    path = Path(mix_dir).expanduser() / "tokenizer.json"
    if not path.is_file() or not (path.parent / "mix.json").is_file():
        raise DataError(f"--tokenizer-from {mix_dir}: no built mix there (no mix.json and tokenizer.json)")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def plan_fingerprint(plan: Plan) -> str:
    """What a complete mix.json must match for a build to be skipped."""
    env = SourceEnv(encoding_errors=plan.encoding_errors)
    parts = {
        "settings": plan.settings(),
        "code": {s.name: s.version for srcs in plan.domains.values() for s in srcs},
        "user": {
            s.name: s.fingerprint(env) for srcs in plan.domains.values() for s in srcs if isinstance(s, UserSource)
        },
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def default_out(plan: Plan) -> Path:
    """The preset's cache dir, or a sibling named by the settings for a customised mix."""
    if not plan.customized:
        return preset_dir(plan.preset.name)
    return preset_dir(f"{plan.preset.name}-{plan_fingerprint(plan)[:10]}")
