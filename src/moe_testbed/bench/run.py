"""Run the benchmark sections in one process and collect one JSON-able result."""

from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import dataclass, field

import torch

from moe_testbed.allocator import keep_freed_memory
from moe_testbed.bench import SECTIONS


@dataclass
class BenchOptions:
    only: tuple[str, ...] = SECTIONS
    quick: bool = False  # few repeats, short steps: a smoke test, not a measurement
    threads: int = 2
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    config: str | None = None  # model config of the step sections (default configs/quick.yaml)
    overrides: list[str] = field(default_factory=list)
    vocab: int = 8192
    grad_accum: int | None = None  # None: the config's for `step`, at most 4 for balance/stats (2 with --quick)
    repeats: int | None = None  # None: per-section defaults
    memory: bool = True
    seed: int = 0
    layer_shapes: tuple | None = None  # None: A, B, C, D and the quick shape


# (repeats, warmup) per section; the layer section adds repeats for fast shapes up to a time budget.
FULL = {"layer": (9, 2), "step": (7, 1), "balance": (9, 1), "stats": (11, 1)}
QUICK = {"layer": (2, 1), "step": (2, 1), "balance": (2, 1), "stats": (2, 1)}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def environment(device: torch.device, dtype: torch.dtype, threads: int) -> dict:
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "processor": _cpu_name(), "cpus": _cpu_count(), "threads": threads, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
    }  # fmt: skip
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        env["loadavg_start"] = list(__import__("os").getloadavg())
    return env


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_bench(opts: BenchOptions, log=print) -> dict:
    from moe_testbed.bench import layer as layer_mod
    from moe_testbed.bench import step as step_mod
    from moe_testbed.bench.guard import FP32_TOL
    from moe_testbed.devices import resolve_device

    torch.set_num_threads(opts.threads)
    malloc_tuned = keep_freed_memory()  # as the trainer does; applies to every variant alike
    device = resolve_device(opts.device, option="bench --device ")
    dtype = resolve_dtype(opts.dtype, device)
    # bf16 keeps ~3 significant digits: the guard then checks for gross errors only.
    tol = FP32_TOL if dtype == torch.float32 else 3e-2
    plan = QUICK if opts.quick else FULL
    reps = {k: (opts.repeats or r, w) for k, (r, w) in plan.items()}
    started = time.time()
    out: dict = {"meta": {**environment(device, dtype, opts.threads), "quick": opts.quick,
                          "malloc_keep_freed": malloc_tuned,
                          "guard_tol": tol, "started": time.strftime("%Y-%m-%d %H:%M:%S")}}  # fmt: skip
    targets: list[dict] = []
    memory = opts.memory
    if "layer" in opts.only:
        shapes = opts.layer_shapes or layer_mod.LAYER_SHAPES
        r, w = reps["layer"]
        # Full runs: samples of >= 20 ms (timer and scheduler noise) and ~15 s per shape.
        sample, budget = (0.0, 0.0) if opts.quick else (0.02, 15.0)
        sec, t = layer_mod.run_layer(shapes, device, dtype, tol, r, w, sample, memory, log, budget_s=budget)
        out["layer"], targets = sec, targets + t
    step_sections = [s for s in ("step", "balance", "stats") if s in opts.only]
    if step_sections:
        cfg = step_mod.load_step_config(opts.config, opts.overrides)
        runners = {"step": step_mod.run_step, "balance": step_mod.run_balance, "stats": step_mod.run_stats}
        for name in step_sections:
            # MoE vs dense uses the preset's whole optimizer step (16 micro-batches). Balancing
            # and statistics cost per micro-batch, so 4 micro-batches per step measure the same
            # fractions 4x faster; per-step work (EB's bias update) then weighs 4x more than
            # in the preset, which can only overstate its share.
            accum = min(2, cfg.train.grad_accum) if opts.quick else cfg.train.grad_accum
            if name != "step" and not opts.quick:
                accum = min(4, accum)
            setup = step_mod.StepSetup(cfg, opts.vocab, opts.grad_accum or accum, device, dtype, opts.seed)
            r, w = reps[name]
            sec, t = runners[name](setup, r, w, memory, log)
            out[name], targets = sec, targets + t
    out["targets"] = targets
    out["meta"]["duration_s"] = round(time.time() - started, 1)
    with contextlib.suppress(OSError):
        out["meta"]["loadavg_end"] = list(__import__("os").getloadavg())
    return out
