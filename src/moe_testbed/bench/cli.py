"""The ``bench`` command; the main CLI (moe_testbed.cli) calls :func:`register`."""

from __future__ import annotations

import argparse

from moe_testbed.bench import SECTIONS


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="time the MoE layer, a training step, balancing methods and routing statistics (interleaved)",
        description="Measure in one process, with the variants interleaved inside every repeat: the MoE layer "
        "against the dense floor and Hugging Face's Mixtral block; a training step of the quick model against a "
        "dense model of equal active parameters; the extra step time of every balancing method and scope; the "
        "cost of routing statistics. Every layer variant must match a float64 reference before it is timed. "
        "Prints tables with PASS/MISS per target and writes JSON. See docs/benchmarks.md.",
    )
    p.add_argument("--out", default="bench.json", help="JSON output file (default: bench.json)")
    p.add_argument("--quick", action="store_true", help="few repeats and 2 micro-batches per step: a smoke test")
    p.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="auto: bf16 autocast on CUDA, fp32 on CPU",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="repeats per section (default: layer 9+, step 7, balance 9, stats 11; --quick 2)",
    )
    p.add_argument("--config", default=None, help="model config of the step sections (default configs/quick.yaml)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default: the config's)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary of the step sections' model (default 8192)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write the tables as Markdown")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the step model config")
    p.set_defaults(func=run_bench_command)
    return p


def run_bench_command(args: argparse.Namespace) -> int:
    from moe_testbed.bench.report import markdown, print_rich, write_json
    from moe_testbed.bench.run import BenchOptions, run_bench

    if args.threads < 1:
        from moe_testbed.errors import ConfigError

        raise ConfigError(f"bench --threads {args.threads}: must be >= 1")
    opts = BenchOptions(
        only=tuple(args.only) if args.only else SECTIONS, quick=args.quick, threads=args.threads,
        device=args.device, dtype=args.dtype, config=args.config, overrides=list(args.overrides),
        vocab=args.vocab, grad_accum=args.grad_accum, repeats=args.repeats, memory=not args.no_memory,
    )  # fmt: skip
    result = run_bench(opts, log=lambda s: print(s, flush=True))
    print_rich(result)
    write_json(result, args.out)
    if args.markdown:
        from moe_testbed.io import atomic_write_text

        atomic_write_text(args.markdown, markdown(result))
    print(f"wrote {args.out}")
    return 0
