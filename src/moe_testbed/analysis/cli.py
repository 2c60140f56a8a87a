"""The ``report`` command; the main CLI (moe_testbed.cli) calls :func:`register`."""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_testbed.analysis.rundir import ReportError


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``report RUN_DIR [RUN_DIR ...] [--out DIR] [--steps N,N]``; its func returns the exit code."""
    p = subparsers.add_parser(
        "report",
        help="write report.html (heatmaps, curves, results table) for one or several runs",
        description="Write a self-contained report.html, its PNG figures and results.csv for one or more run "
        "directories. Opens offline (images embedded, no JavaScript).",
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories written by `train`")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: the run directory for one run, <common parent>/report for several)",
    )
    p.add_argument(
        "--steps",
        type=_parse_steps,
        default=None,
        help="comma-separated training steps at which to draw the expert x domain heatmaps as well as the final "
        "one (nearest snapshot), e.g. --steps 100,200",
    )
    p.set_defaults(func=run_report)
    return p


def run_report(args: argparse.Namespace) -> int:
    # Imported here so that `moe-testbed --help` does not pay for matplotlib.
    from moe_testbed.analysis.report import default_out_dir, write_report

    out = args.out if args.out is not None else default_out_dir(args.run_dirs)
    path = write_report(list(args.run_dirs), out, steps=args.steps)
    print(f"report: {path}")
    return 0


def _parse_steps(text: str) -> list[int]:
    try:
        steps = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--steps takes comma-separated integers, e.g. 100,200 (got {text!r})"
        ) from None
    if any(s < 0 for s in steps):
        raise argparse.ArgumentTypeError("--steps must be >= 0")
    return steps


__all__ = ["ReportError", "register", "run_report"]
