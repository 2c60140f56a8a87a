"""Syntax or topic? Token-level vs sequence-level routing in a design-choices study, from `moe-testbed eval`.

    for r in STUDY/runs/{softmax_topk,sequence_level}-top*-s*; do moe-testbed eval $r; done
    python scripts/syntax_or_topic.py STUDY [--step 80]

Reads each run's eval/<mix>-step<N>/analyses.json (analysis/token_routing.py: NMI of expert with
token class and with domain, means over layers) and prints Markdown tables: the mean and 95%
Student t interval over seeds per configuration, and the token-level minus sequence-level
difference per top-k, paired by seed (moe_testbed.study.stats, the studies' own intervals).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_testbed.study.stats import difference_interval, mean_interval


def by_seed(runs: Path, config: str, key: str, step: int) -> dict[int, float]:
    out = {}
    for path in sorted(runs.glob(f"{config}-s*/eval/*-step{step}/analyses.json")):
        seed = int(path.parents[2].name.rsplit("-s", 1)[1])
        out[seed] = json.loads(path.read_text())["syntax_or_topic"]["mean"][key]
    return out


def cell(iv) -> str:
    return f"{iv.estimate:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--step", type=int, default=80)
    args = ap.parse_args()
    runs = args.study / "runs"
    print("| configuration | seeds | NMI expert ~ token class | NMI expert ~ domain |\n| --- | --- | --- | --- |")
    for k in (1, 2):
        for router in ("softmax_topk", "sequence_level"):
            c, d = (by_seed(runs, f"{router}-top{k}", key, args.step) for key in ("nmi_class", "nmi_domain"))
            print(f"| {router}-top{k} | {len(c)} | {cell(mean_interval(list(c.values())))} | "
                  f"{cell(mean_interval(list(d.values())))} |")  # fmt: skip
    print("\n| top-k | token-level minus sequence-level: NMI ~ class | ... NMI ~ domain |\n| --- | --- | --- |")
    for k in (1, 2):
        diff = [difference_interval(by_seed(runs, f"softmax_topk-top{k}", key, args.step),
                                    by_seed(runs, f"sequence_level-top{k}", key, args.step))
                for key in ("nmi_class", "nmi_domain")]  # fmt: skip
        print(f"| {k} | {cell(diff[0])} ({diff[0].how}) | {cell(diff[1])} ({diff[1].how}) |")


if __name__ == "__main__":
    main()
