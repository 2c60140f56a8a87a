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
import shutil
from pathlib import Path

from moe_testbed.data import assemble
from moe_testbed.data.errors import DataError
from moe_testbed.data.extract import extract_source, read_meta
from moe_testbed.data.packages import Deb, MissingPackage, PackageManager
from moe_testbed.data.paths import downloads_dir
from moe_testbed.data.plan import BuildOptions, Plan, default_out, make_plan, plan_fingerprint
from moe_testbed.data.progress import Progress
from moe_testbed.data.sources import Source, SourceEnv
from moe_testbed.data.storage import guard_disk, invalidate, read_manifest
from moe_testbed.data.tokenizer import eos_id, load_tokenizer, train_tokenizer
from moe_testbed.data.user import UserSource
from moe_testbed.data.write import write_mix
from moe_testbed.io import atomic_write, atomic_write_json

EXTRACT_BYTES_PER_TOKEN = 6  # first extraction cap per token; doubled for a domain that falls short
MAX_ROUNDS = 4

__all__ = ["BuildOptions", "build_mix"]


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
    if plan.tokenizer_from is not None:  # another mix's tokenizer: the same token ids, so one model reads both
        path = stage / "tokenizer.json"
        stage.mkdir(parents=True, exist_ok=True)
        data = plan.tokenizer_from.read_bytes()
        guard_disk(str(path), lambda: atomic_write(path, lambda tmp: tmp.write_bytes(data)))
        progress.log(f"tokenizer from {plan.tokenizer_from.parent} (vocab {plan.vocab_size})")
        return load_tokenizer(path)
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
    """Extract, train the tokenizer, encode; extract more for domains short of the budget; write the mix."""
    stages = out / "stages"
    pm = PackageManager(downloads_dir(), plan.install, progress.log)
    env = SourceEnv(encoding_errors=plan.encoding_errors, workers=plan.workers)
    domains = _resolve_packages(plan, pm, env, progress)
    env.packages = pm.resolved
    caps = {d: (plan.train_tokens + plan.val_tokens) * EXTRACT_BYTES_PER_TOKEN for d in domains}
    for round_ in range(MAX_ROUNDS):
        metas = _extract(domains, env, stages, caps, progress)
        docs = _documents(plan, domains, stages, progress)
        reserve = {d: assemble.reserve_index(recs, plan.val_tokens) for d, recs in docs.items()}
        samples = {d: assemble.tokenizer_sample(recs, reserve[d], plan.tok_bytes) for d, recs in docs.items()}
        tok = _train_tokenizer(plan, stages, samples, progress)
        encoded, retry = _encode(plan, domains, docs, metas, tok, stages, progress)
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


def _extract(domains: dict[str, list[Source]], env: SourceEnv, stages: Path, caps: dict[str, int],
             progress: Progress) -> dict[str, dict]:  # fmt: skip
    """Extract every source up to its domain's byte cap (cached); the shard metadata by source."""
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
    return metas


def _documents(plan: Plan, domains: dict[str, list[Source]], stages: Path, progress: Progress) -> dict[str, list]:
    """Each domain's document records; a domain without any is skipped (on_missing=skip) or an error."""
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
    return docs


def _encode(plan: Plan, domains: dict[str, list[Source]], docs: dict[str, list], metas: dict[str, dict], tok,
            stages: Path, progress: Progress) -> tuple[dict[str, assemble.Encoded], list[str]]:  # fmt: skip
    """Encode every domain (cached); returns the encodings that meet the budget and the domains to retry."""
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
    return encoded, retry


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
