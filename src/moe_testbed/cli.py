"""The ``moe-testbed`` command line.

User errors (bad config, missing data, corrupted checkpoint: every
:class:`moe_testbed.errors.UserError`) print one line ``error: ...`` and exit
with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moe_testbed import __version__
from moe_testbed.errors import exit_status

# Nothing in the product may reach the network at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def cmd_train(args: argparse.Namespace) -> int:
    from moe_testbed.config import Config, load_config
    from moe_testbed.errors import ConfigError
    from moe_testbed.train.trainer import run_training

    if args.fork and not args.resume:
        raise ConfigError("--fork NEW_DIR continues a run: use it with --resume RUN_DIR")
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there; pass a run directory written by train")
        if args.config and not args.config.endswith((".yaml", ".yml")):
            args.overrides = [args.config, *args.overrides]
        cfg = Config.load(run_dir / "config.yaml", args.overrides)
        if args.fork:
            run_training(cfg, Path(args.fork), resume=True, fork_from=run_dir)
        else:
            run_training(cfg, run_dir, resume=True)
        return 0
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides = [args.config, *args.overrides]
        args.config = None
    cfg = load_config(args.config, args.overrides)
    run_training(cfg, Path(args.out) if args.out else None, resume=None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-testbed",
        description="A laboratory for Mixture-of-Experts routing: train small MoE LMs on labelled domains, "
        "measure expert utilization and specialization.",
    )
    parser.add_argument("--version", action="version", version=f"moe-testbed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train one model from a YAML config with dotted overrides")
    p.add_argument("config", nargs="?", help="YAML config, e.g. configs/quick.yaml (defaults when omitted)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. routing.top_k=4 balance.scope=global")
    p.add_argument("--out", help="run directory (default: run.out_dir/<name>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--fork", metavar="NEW_DIR",
                   help="with --resume: continue the run in NEW_DIR under the given overrides (any key)")  # fmt: skip
    p.set_defaults(func=cmd_train)

    for module in (
        "moe_testbed.data.cli",
        "moe_testbed.analysis.cli",
        "moe_testbed.study.cli",
        "moe_testbed.bench.cli",
    ):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError as exc:
            if exc.name and module.startswith(exc.name):
                continue  # that part is not installed in this build
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return exit_status(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
