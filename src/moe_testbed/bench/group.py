"""One interleaved group: guard every variant, time the ones that pass, measure their memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moe_testbed.bench.guard import GuardResult
from moe_testbed.bench.memory import peak_bytes
from moe_testbed.bench.timing import Timings, interleaved, quantiles


@dataclass
class Candidate:
    name: str
    step: Callable[[], None]  # one timed unit of work (layer: forward + backward; step: optimizer step)
    guard: Callable[[], GuardResult] | None = None  # None: nothing to compare (whole-model steps)
    label: str = ""  # what the row shows


@dataclass
class GroupResult:
    timings: Timings | None
    guards: dict[str, GuardResult] = field(default_factory=dict)
    peaks: dict[str, int] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    units: str = "ms"

    def ok(self, name: str) -> bool:
        return self.timings is not None and name in self.timings.times

    def to_json(self) -> dict:
        variants = {}
        for name, label in self.labels.items():
            row: dict = {"label": label, "timed": self.ok(name)}
            if self.ok(name):
                row["ms"] = {k: v * 1e3 for k, v in self.timings.summary(name).items()}
                row["times_ms"] = [t * 1e3 for t in self.timings.times[name]]
            if name in self.peaks:
                row["peak_mib"] = self.peaks[name] / 2**20
            if name in self.guards:
                row["guard"] = self.guards[name].to_json()
            variants[name] = row
        out = {"variants": variants, "refused": self.refused}
        if self.timings is not None:
            out.update(baseline=self.timings.baseline, inner=self.timings.inner,
                       repeats=len(next(iter(self.timings.times.values()))))  # fmt: skip
        return out


def run_group(
    cands: list[Candidate],
    baseline: str,
    repeats: int,
    warmup: int,
    device: torch.device,
    min_sample_s: float = 0.0,
    memory: bool = True,
    log: Callable[[str], None] = print,
    budget_s: float = 0.0,
) -> GroupResult:
    res = GroupResult(timings=None, labels={c.name: c.label or c.name for c in cands})
    steps = {}
    for c in cands:
        if c.guard is not None:
            g = c.guard()
            res.guards[c.name] = g
            if not g.ok:
                res.refused.append(c.name)
                log(f"  guard: NOT timing {c.name}: {g.message}")
                continue
        steps[c.name] = c.step
    if baseline not in steps:
        log(f"  guard: the baseline {baseline} failed, nothing in this group is timed")
        return res
    res.timings = interleaved(steps, baseline, repeats, warmup, min_sample_s, device, budget_s=budget_s)
    if memory:
        for name, fn in steps.items():
            res.peaks[name] = peak_bytes(fn, device)
    return res


def ratio_json(res: GroupResult, num: str, den: str) -> dict | None:
    """Median and spread of per-pair ratios, or None when either side was not timed."""
    if not (res.ok(num) and res.ok(den)):
        return None
    return res.timings.ratio(num, den)


def speedup_json(res: GroupResult, fast: str, slow: str) -> dict | None:
    """Per-pair speed-up t[slow] / t[fast] (> 1: ``fast`` is faster)."""
    if not (res.ok(fast) and res.ok(slow)):
        return None
    return quantiles([b / a for a, b in zip(res.timings.times[fast], res.timings.times[slow])])


def target_row(name: str, ratio: dict | None, op: str, limit: float, scale: float = 1.0) -> dict:
    """One PASS/MISS line: the median of ``ratio`` (times ``scale``) against ``limit``."""
    if ratio is None:
        return {"target": name, "value": None, "op": op, "limit": limit, "pass": False, "note": "not measured"}
    v = ratio["median"] * scale
    ok = v <= limit if op == "<=" else v >= limit
    return {"target": name, "value": v, "op": op, "limit": limit, "pass": bool(ok)}
