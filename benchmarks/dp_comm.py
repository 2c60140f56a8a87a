"""What data parallelism's communication costs a step, and DDP's overlap against a reduction after the backward.

    torchrun --standalone --nproc_per_node 2 benchmarks/dp_comm.py [--config configs/quick.yaml]
        [--repeats 7] [--out benchmarks/results/cpu-2rank-dp.json] [key=value ...]

Every rank trains the quick model's step (its share of ``train.grad_accum`` micro-batches,
random tokens as in ``moe-testbed bench --only step``), timed in four variants that
alternate inside every repeat (bench/timing.py's rule: ratios within a repeat):

- ``ddp``: the training path, DDP all-reducing gradient buckets during the backward
  of the step's last forward (train/ddp.py);
- ``after``: the same forwards under ``no_sync``, then every gradient all-reduced in
  25 MiB flat buckets after the backward (no overlap);
- ``local``: no gradient communication at all (not a correct step: the compute-only floor);
- ``allreduce``: the gradient all-reduce alone, on tensors of the model's gradients' sizes.

A step's time is rank 0's wall time between barriers, so it is the slower rank's.
``exposed`` = (ddp - local) / ddp is the share of the step that communication adds;
``allreduce / ddp`` is what the all-reduce would cost without any overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moe_testbed.bench.step import N_DOMAINS, load_step_config  # noqa: E402
from moe_testbed.bench.timing import quantiles  # noqa: E402
from moe_testbed.model import Transformer, count_params  # noqa: E402
from moe_testbed.study.reference import cpu_name  # noqa: E402
from moe_testbed.train.ddp import GradientSync  # noqa: E402
from moe_testbed.train.distributed import init_data_parallel  # noqa: E402
from moe_testbed.train.setup import build_optimizer  # noqa: E402
from moe_testbed.train.step import forward_microbatches, micro_step, optimizer_step  # noqa: E402

BUCKET_BYTES = 25 << 20  # DDP's default bucket size, for the after-the-backward variant


def flat_allreduce(grads: list[torch.Tensor], world: int) -> None:
    """Every gradient averaged over ranks in flat buckets, after the backward (the variant DDP replaces)."""
    bucket, size = [], 0
    for g in [*grads, None]:
        if g is not None and (not bucket or size + g.numel() * g.element_size() <= BUCKET_BYTES):
            bucket.append(g)
            size += g.numel() * g.element_size()
            continue
        flat = torch.cat([b.reshape(-1) for b in bucket])
        dist.all_reduce(flat)
        flat /= world
        for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
            b.copy_(part.view_as(b))
        bucket, size = ([g], g.numel() * g.element_size()) if g is not None else ([], 0)


def make_variant(cfg, dp, mode: str):
    torch.manual_seed(0)
    V = 8192
    model = Transformer(cfg, V, {"domains": [f"d{i}" for i in range(N_DOMAINS)], "vocab_size": V}).train()
    opt = build_optimizer(model, cfg)
    sync = GradientSync(model, dp.world_size)
    B, S = cfg.train.micro_batch_size, cfg.data.seq_len
    local = dp.local_accumulation(cfg.train.grad_accum)
    n = forward_microbatches(cfg.train.forward_microbatches, local, B * S)
    gen = torch.Generator().manual_seed(1 + dp.rank)
    tokens = torch.randint(0, V, (local * B, S + 1), generator=gen)
    dom = (torch.arange(local * B) % N_DOMAINS)[:, None].expand(local * B, S)
    forwards = [tuple(x[f * n * B : (f + 1) * n * B] for x in (tokens[:, :-1], tokens[:, 1:], dom))
                for f in range(local // n)]  # fmt: skip
    state = {"step": 0}

    def step():
        for f, (inp, tgt, dom_BS) in enumerate(forwards):
            with sync.forward(last=mode == "ddp" and f == len(forwards) - 1) as module:
                micro_step(module, inp, tgt, dom_BS, step=state["step"], microbatch=f * n, accum=len(forwards),
                           microbatch_size=B, whole_step=len(forwards) == 1, group=dp.group)  # fmt: skip
        if mode == "after":
            flat_allreduce([p.grad for p in model.parameters() if p.grad is not None], dp.world_size)
        state["step"] += 1
        optimizer_step(model, opt, cfg.train.grad_clip, state["step"])

    return step, model, sync


def timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_step_config(args.config, args.overrides)
    torch.set_num_threads(cfg.train.threads or 1)
    dp = init_data_parallel("cpu")
    variants = {m: make_variant(cfg, dp, m) for m in ("ddp", "after", "local")}
    grads_like = [torch.zeros_like(p) for p in variants["ddp"][1].parameters() if p.requires_grad]
    fns = {m: v[0] for m, v in variants.items()}
    fns["allreduce"] = lambda: flat_allreduce(grads_like, dp.world_size)
    names = list(fns)
    times: dict[str, list[float]] = {m: [] for m in names}
    for r in range(args.warmup + args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no variant always follows another
        for m in order:
            t = timed(fns[m])
            if r >= args.warmup:
                times[m].append(t)
    for _, _, sync in variants.values():
        sync.close()
    if dp.is_main:
        report(cfg, dp, times, variants["ddp"][1], args.out)
    dp.close()


def report(cfg, dp, times, model, out) -> None:
    med = {m: statistics.median(ts) for m, ts in times.items()}
    per_repeat = lambda a, b: quantiles([x / y for x, y in zip(times[a], times[b])])  # noqa: E731
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    res = {
        "what": "one optimizer step of the quick model on each of 2 CPU ranks (gloo), 1 thread a rank",
        "cpu": cpu_name(), "torch": torch.__version__, "world_size": dp.world_size,
        "grad_accum": cfg.train.grad_accum, "tokens_per_step": cfg.train.grad_accum * cfg.train.micro_batch_size
        * cfg.data.seq_len, "params": count_params(model), "gradient_bytes": grad_bytes,
        "seconds": {m: quantiles(ts) for m, ts in times.items()},
        "ratios": {"ddp/after": per_repeat("ddp", "after"), "ddp/local": per_repeat("ddp", "local"),
                   "allreduce/ddp": per_repeat("allreduce", "ddp")},
        "exposed_share": (med["ddp"] - med["local"]) / med["ddp"],
        "load_1min": os.getloadavg()[0],
    }  # fmt: skip
    for m in ("ddp", "after", "local", "allreduce"):
        print(f"{m:10s} {med[m] * 1e3:8.1f} ms/step (median of {len(times[m])})")
    r = res["ratios"]
    print(
        f"ddp / after-backward {r['ddp/after']['median']:.3f}   ddp / no communication {r['ddp/local']['median']:.3f}"
        f"   all-reduce alone / ddp step {r['allreduce/ddp']['median']:.3f}   gradients {grad_bytes / 2**20:.1f} MiB"
    )
    if out:
        Path(out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
