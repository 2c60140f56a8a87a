"""Where the time of one layer variant goes: torch.profiler over forward + backward.

    python benchmarks/profile_layer.py C moe            # our MoE layer at config C
    python benchmarks/profile_layer.py C dense --calls 5
    python benchmarks/profile_layer.py quick hf_grouped_mm --threads 1

Variants and shapes are the bench's own (moe_testbed.bench.layer), so a profile
explains a row of the bench table. The profiler adds a fixed cost per operator:
at small shapes it inflates many-op variants more than the dense floor, so read
shares, not absolute times, and take times from the bench.
"""

import argparse
import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402
from torch.profiler import profile  # noqa: E402

from moe_testbed.bench.guard import FP32_TOL  # noqa: E402
from moe_testbed.bench.layer import LAYER_SHAPES, build_candidates  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=[s.name for s in LAYER_SHAPES])
    p.add_argument("variant", help="dense | moe | hf_grouped_mm | hf_eager")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = next(s for s in LAYER_SHAPES if s.name == args.shape)
    cands = {c.name: c for c in build_candidates(shape, torch.device("cpu"), torch.float32, FP32_TOL)}
    cand = cands[args.variant]
    guard = cand.guard()
    print(f"guard: {'ok' if guard.ok else 'FAILED'} (max relative error {max(guard.errors.values()):.1e})")
    for _ in range(3):
        cand.step()
    with profile() as prof:
        for _ in range(args.calls):
            cand.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
