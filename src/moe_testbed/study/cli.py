"""The ``study`` command; the main CLI (moe_testbed.cli) calls :func:`register`.

Overrides may come before or after the options (``study quick train.steps=50
--workers 2`` and ``study quick --workers 2 train.steps=50``). Plain argparse
cannot take positionals after options once a ``nargs="*"`` positional has been
matched, and the main parser uses ``parse_args``, so everything after SPEC is
captured raw (``REMAINDER``) and parsed here a second time, intermixed.
"""

from __future__ import annotations

import argparse

from moe_testbed.study import StudyError

DESCRIPTION = (
    "Expand a study spec (a preset in configs/studies/ or a YAML file with a base config, a grid and extra "
    "runs), run the runs in worker processes, and write STUDY/results.parquet, results.csv and "
    "report/report.html. Re-running the same command skips complete runs and resumes interrupted ones."
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "study",
        help="run a study: a grid of runs in parallel, resumable, with a results table and a report",
        description=DESCRIPTION,
    )
    p.add_argument(
        "spec",
        metavar="SPEC",
        help="preset name (quick, scope, design-choices, recipes, upcycling, scale, tiny) or a YAML file",
    )
    p.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="key=value",
        help="overrides applied to every run, e.g. train.steps=50 (before or after the options)",
    )
    _add_options(p)
    p.set_defaults(func=run_command, _study_parser=p)
    return p


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="runs trained at once, each in its own process with cores/workers threads (default 1; "
        "on a CPU machine one worker per core is fastest)",
    )
    p.add_argument("--out", help="study directory (default: studies/<study name>)")
    p.add_argument("--dry-run", action="store_true", help="print the runs, what would happen to each and why")
    p.add_argument(
        "--only", action="append", metavar="NAME", help="run only runs whose name contains NAME (repeatable)"
    )
    p.add_argument("--no-report", action="store_true", help="do not write report/report.html")
    p.add_argument("--write-reference", action="store_true",
                   help="write the results as the spec's reference (reference/<study>.json beside the spec)")  # fmt: skip
    p.add_argument(
        "--seeds", type=_seed_count, default=None, metavar="N",
        help="run every configuration with seeds 0..N-1 (default: the spec's seeds, else one run each)",
    )  # fmt: skip
    p.add_argument(
        "--progress", choices=("auto", "bar", "log", "none"), default="auto", help="progress display (default auto)"
    )
    # For tests and for checking a spec's plumbing without training: a function
    # package.module:function called as fn(cfg, run_dir, resume) in each worker.
    p.add_argument("--run-fn", default=None, help=argparse.SUPPRESS)


def _seed_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--seeds takes a number of seeds >= 1 (got {text!r})")
    return n


def _parse_rest(args: argparse.Namespace) -> argparse.Namespace:
    """Options and overrides that came after SPEC, in any order."""
    parser: argparse.ArgumentParser = args._study_parser
    if any(a in ("-h", "--help") for a in args.rest):
        parser.print_help()
        raise SystemExit(0)
    rest = argparse.ArgumentParser(prog=parser.prog, usage=parser.format_usage().removeprefix("usage: "))
    _add_options(rest)
    rest.add_argument("overrides", nargs="*")
    # The namespace already holds every option (defaults or given before SPEC);
    # argparse leaves those alone unless given again here.
    return rest.parse_intermixed_args(args.rest, namespace=args)


def run_command(args: argparse.Namespace) -> int:
    from moe_testbed.study.runner import run_study
    from moe_testbed.study.worker import DEFAULT_FN

    args = _parse_rest(args)
    return run_study(
        args.spec,
        workers=args.workers,
        out=args.out,
        only=args.only,
        overrides=args.overrides,
        dry_run=args.dry_run,
        report=not args.no_report,
        run_fn=args.run_fn or DEFAULT_FN,
        progress=args.progress,
        seeds=None if args.seeds is None else list(range(args.seeds)),
        save_reference=args.write_reference,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_testbed.study.cli SPEC ...``: the study command on its own."""
    import sys

    from moe_testbed.errors import exit_status

    parser = argparse.ArgumentParser(prog="moe-testbed")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["study", *(sys.argv[1:] if argv is None else argv)])
    return exit_status(lambda: args.func(args))


__all__ = ["StudyError", "register", "run_command"]

if __name__ == "__main__":
    raise SystemExit(main())
