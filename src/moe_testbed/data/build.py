"""``moe-testbed data build``: sources -> shards -> tokenizer -> token arrays -> mix.json.

Every step is cached under ``DIR/stages`` with a fingerprint of its inputs,
so a repeated build is instant and an interrupted one resumes where it
stopped. ``mix.json`` is written last and atomically; it is removed first
when a build with different settings starts, so a half-built directory is
never taken for a complete one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from moe_testbed.data import assemble
from moe_testbed.data.errors import DataError
from moe_testbed.data.extract import extract_source, read_meta
from moe_testbed.data.packages import Deb, MissingPackage, PackageManager
from moe_testbed.data.paths import downloads_dir, preset_dir
from moe_testbed.data.presets import Preset, domain_sources, get_preset
from moe_testbed.data.progress import Progress
from moe_testbed.data.sources import Source, SourceEnv, get_source
from moe_testbed.data.sources.base import ENCODING_ERRORS
from moe_testbed.data.storage import guard_disk, invalidate, read_manifest
from moe_testbed.data.tokenizer import eos_id, load_tokenizer, train_tokenizer
from moe_testbed.data.user import UserSource
from moe_testbed.data.write import write_mix
from moe_testbed.io import atomic_write, atomic_write_json

EXTRACT_BYTES_PER_TOKEN = 6  # first extraction cap per token; doubled for a domain that falls short
MAX_ROUNDS = 4
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

    def settings(self) -> dict:
        return {
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
    )


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


def _resolve_packages(plan: Plan, pm: PackageManager, env: SourceEnv, progress: Progress) -> dict[str, list[Source]]:
    """Fetch or install what the sources need; drop (or fail on) those that cannot be had."""
    pm.install_debs(r for srcs in plan.domains.values() for s in srcs for r in s.packages if isinstance(r, Deb))
    kept: dict[str, list[Source]] = {}
    for domain, srcs in plan.domains.items():
        ok = []
        for src in srcs:
            try:
                pm.resolve(src.packages)
                env.packages = pm.resolved
                reason = src.check(env)
                if reason:
                    raise MissingPackage(f"source {src.name}: {reason}")
                ok.append(src)
            except MissingPackage as exc:
                if plan.on_missing == "fail":
                    raise DataError(f"domain {domain}: {exc}") from None
                progress.log(f"skipping source {src.name} of domain {domain}: {exc}")
        if ok:
            kept[domain] = ok
        else:
            progress.log(f"skipping domain {domain}: none of its sources is available")
    if not kept:
        raise DataError("no domain of the mix is available: install the packages named above or add --domain NAME=PATH")
    return kept


def _train_tokenizer(plan: Plan, stage: Path, samples: dict[str, list[str]], progress: Progress):
    h = hashlib.sha256(str(plan.vocab_size).encode())
    for domain in sorted(samples):
        for text in samples[domain]:
            h.update(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest())
    fingerprint = h.hexdigest()
    path, meta = stage / "tokenizer.json", stage / "tokenizer.meta.json"
    if meta.is_file() and path.is_file() and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
        return load_tokenizer(path)
    texts = [t for domain in sorted(samples) for t in samples[domain]]
    progress.log(
        f"training byte-level BPE (vocab {plan.vocab_size}) on {sum(map(len, texts)) / 1e6:.1f}M "
        f"characters, an equal share of {len(samples)} domains"
    )
    tok = train_tokenizer(texts, plan.vocab_size, length=len(texts))
    stage.mkdir(parents=True, exist_ok=True)
    guard_disk(str(path), lambda: atomic_write(path, lambda tmp: tok.save(str(tmp))))
    guard_disk(str(meta), lambda: atomic_write_json(meta, {"fingerprint": fingerprint}))
    return tok


def _run(plan: Plan, out: Path, fingerprint: str, progress: Progress) -> None:
    stages = out / "stages"
    pm = PackageManager(downloads_dir(), plan.install, progress.log)
    env = SourceEnv(encoding_errors=plan.encoding_errors, workers=plan.workers)
    domains = _resolve_packages(plan, pm, env, progress)
    env.packages = pm.resolved
    caps = {d: (plan.train_tokens + plan.val_tokens) * EXTRACT_BYTES_PER_TOKEN for d in domains}
    for round_ in range(MAX_ROUNDS):
        metas: dict[str, dict] = {}
        for domain, srcs in domains.items():
            for src in srcs:
                before = read_meta(stages / "sources", src.name)
                meta = guard_disk(
                    f"the {src.name} shard",
                    lambda src=src, domain=domain: extract_source(
                        src, env, stages / "sources", caps[domain], progress.status
                    ),
                )
                metas[src.name] = meta
                how = "cached" if meta == before else f"{meta['seconds']:.1f}s"
                progress.log(
                    f"{domain:12s} {src.name}: {meta['documents']} documents, "
                    f"{meta['bytes'] / 1e6:.2f} MB{'' if meta['complete'] else ' (capped)'} [{how}]"
                )
        docs = {d: assemble.load_domain_docs(stages / "sources", [s.name for s in srcs]) for d, srcs in domains.items()}
        for domain, recs in list(docs.items()):
            if not recs:
                msg = (
                    f"domain {domain} has no documents: check its source "
                    f"({', '.join(s.description for s in domains[domain])})"
                )
                if plan.on_missing == "skip" and not any(isinstance(s, UserSource) for s in domains[domain]):
                    progress.log("skipping " + msg)
                    del docs[domain], domains[domain]
                    continue
                raise DataError(msg)
        if not docs:
            raise DataError("no domain has any documents: install the packages named above or add --domain NAME=PATH")
        reserve = {d: assemble.reserve_index(recs, plan.val_tokens) for d, recs in docs.items()}
        samples = {d: assemble.tokenizer_sample(recs, reserve[d], plan.tok_bytes) for d, recs in docs.items()}
        tok = _train_tokenizer(plan, stages, samples, progress)
        tok_sha = hashlib.sha256((stages / "tokenizer.json").read_bytes()).hexdigest()
        encoded, retry = {}, []
        for domain, recs in docs.items():
            fp = {
                "tokenizer": tok_sha,
                "docs": assemble.docs_digest(recs),
                "val": plan.val_tokens,
                "train": plan.train_tokens,
                "format": assemble.ENCODED_FORMAT,
            }
            enc = assemble.load_encoded(stages / "encoded", domain, fp)
            if enc is None:
                progress.status(f"encoding {domain}")
                enc = assemble.encode_domain(tok, recs, plan.val_tokens, plan.train_tokens, eos_id(tok))
                (stages / "encoded").mkdir(parents=True, exist_ok=True)
                assemble.save_encoded(stages / "encoded", domain, fp, enc)
            encoded[domain] = enc
            if enc.short:
                if all(metas[s.name]["complete"] for s in domains[domain]):
                    msg = (
                        f"domain {domain} is too small: {enc.count('train')} train + {enc.count('val')} "
                        f"validation tokens < the requested {plan.train_tokens} + {plan.val_tokens}; "
                        "lower --tokens-per-domain / --val-tokens-per-domain or add text"
                    )
                    if plan.on_missing == "skip" and not any(isinstance(s, UserSource) for s in domains[domain]):
                        progress.log("skipping " + msg)
                        continue
                    raise DataError(msg)
                retry.append(domain)
        for domain in list(encoded):
            if encoded[domain].short and domain not in retry:
                del encoded[domain]
        if not retry:
            break
        for domain in retry:
            caps[domain] *= 2
        progress.log(f"extracting more text for {', '.join(retry)} (round {round_ + 2})")
    else:
        raise DataError(f"could not reach the token budget for {', '.join(retry)}: lower --tokens-per-domain")
    if not encoded:
        raise DataError("every domain was too small for the budget: lower --tokens-per-domain")
    kept = {d: domains[d] for d in encoded}
    write_mix(out, plan, fingerprint, kept, encoded, metas, pm.resolved, tok, stages / "tokenizer.json", progress)


def build_mix(opts: BuildOptions, out: str | Path | None = None, progress: Progress | None = None) -> Path:
    """Build (or find already built) the mix described by ``opts``; return its directory."""
    progress = progress or Progress()
    plan = make_plan(opts)
    out = Path(out).expanduser() if out is not None else default_out(plan)
    fingerprint = plan_fingerprint(plan)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the output directory {out} ({exc.strerror}): pass a writable --out") from None
    # One build per directory at a time (two trainer ranks may both auto-build the same preset).
    with open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(out)
        if manifest and manifest.get("fingerprint") == fingerprint and not opts.force:
            progress.log(f"mix already built in {out}")
            return out
        invalidate(out)  # from here on the directory is not a complete mix until mix.json is rewritten
        if opts.force:
            shutil.rmtree(out / "stages", ignore_errors=True)
        progress.log(
            f"building {len(plan.domains)} domains into {out} "
            f"({plan.train_tokens} train + {plan.val_tokens} validation tokens per domain)"
        )
        _run(plan, out, fingerprint, progress)
        progress.log(f"done in {progress.elapsed():.1f}s: {out}")
    return out
