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
    register_hf(subparsers)
    register_eval(subparsers)
    return p


def register_eval(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``eval RUN_DIR [--data MIX] [--step N] [--out DIR]``: a run's checkpoint on a mix, with its trace."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a trained run's checkpoint on its mix or another labelled mix, with per-token routing",
        description="Route a mix's validation text through a run's checkpoint: validation scalars, the expert x "
        "domain tables, a per-token routing trace (Parquet) and the token-level analyses, in RUN_DIR/eval/.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by `train`")
    p.add_argument("--data", default=None, help="mix preset or built mix directory (default: the run's own mix)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--tokens-per-domain", type=int, default=None, help="validation tokens per domain "
                   "(default: the run's eval.tokens_per_domain)")  # fmt: skip
    p.add_argument("--trace-tokens", type=int, default=65536, help="tokens of the per-token trace (default 65536)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default RUN_DIR/eval/<mix>-step<N>)")
    p.set_defaults(func=_run_eval)
    return p


def _run_eval(args: argparse.Namespace) -> int:
    from moe_testbed.analysis.evaluate_run import evaluate_run

    evaluate_run(args.run_dir, args.data, args.step, args.tokens_per_domain, args.trace_tokens, args.out)
    return 0


def register_hf(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hf MODEL [--data ...] [--out DIR]``: routing metrics of a pretrained Hugging Face MoE."""
    p = subparsers.add_parser(
        "hf",
        help="route the domain mix through a pretrained Hugging Face MoE checkpoint and report its routing",
        description="Re-tokenize every domain's validation text with the checkpoint's tokenizer, count the experts "
        "each router chooses per layer and domain, and write a run directory (metrics, routing table, report) "
        "like a trained run's. Offline: MODEL is a local save_pretrained directory or in the local cache.",
    )
    p.add_argument("model", help="checkpoint directory (config.json, weights, tokenizer) or a cached hub id")
    p.add_argument("--data", default="default", help="mix preset (default, tiny) or a built mix directory")
    p.add_argument("--domains", default=None, help="comma-separated domains of the mix (default: all)")
    p.add_argument("--tokens-per-domain", type=int, default=16384, help="validation tokens per domain (default 16384)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--trace-tokens", type=int, default=8192,
                   help="probed tokens whose per-token routing is kept for the token-level analyses and the "
                   "drill-down page (traces/step_000000.parquet; default 8192, 0: none)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on CUDA")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/hf-<model name>)")
    p.add_argument("--no-report", action="store_true", help="write the run directory only")
    p.set_defaults(func=run_hf)
    return p


def run_hf(args: argparse.Namespace) -> int:
    from moe_testbed.analysis.hf import load_model, measure, write_run
    from moe_testbed.config import DataConfig
    from moe_testbed.data import ensure_mix
    from moe_testbed.devices import resolve_device, uses_bf16
    from moe_testbed.errors import ConfigError

    for name in ("tokens_per_domain", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.trace_tokens < 0:
        raise ConfigError(f"--trace-tokens={args.trace_tokens} must be >= 0 (0: no trace)")
    device = resolve_device(args.device, option="hf --device ")
    use_bf16 = uses_bf16(args.dtype, device)
    data = Path(args.data).expanduser()
    mix = ensure_mix(DataConfig(dir=str(data)) if data.is_dir() else DataConfig(preset=args.data))
    domains = mix.select(args.domains.split(",") if args.domains else None)
    model, tokenizer = load_model(args.model, device, torch_dtype(use_bf16))
    settings = {"seq_len": args.seq_len, "tokens_per_domain": args.tokens_per_domain, "dtype": str(model.dtype)}
    m = measure(model, tokenizer, mix, domains, args.seq_len, args.tokens_per_domain, args.batch_size, device,
                args.trace_tokens)  # fmt: skip
    out = args.out or Path("runs") / f"hf-{Path(args.model.rstrip('/')).name}"
    write_run(out, args.model, model, mix, domains, m, settings, tokenizer)
    L, E, _ = m["counts"].shape
    print(f"{args.model}: {L} MoE layers, top-{m['top_k']} of {E} experts, {int(m['tokens'][0].sum())} tokens "
          f"over {len(domains)} domains -> {out}")  # fmt: skip
    if m["trace"].n:
        print(f"trace of {m['trace'].n} tokens, token-level analyses and drill-down page in {out}")
    if not args.no_report:
        from moe_testbed.analysis.report import write_report

        print(f"report: {write_report([out], out)}")
    return 0


def torch_dtype(bf16: bool):
    import torch

    return torch.bfloat16 if bf16 else torch.float32


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


__all__ = ["ReportError", "register", "run_hf", "run_report"]
