"""Interleaved timing: variants alternate inside every repeat; ratios are per pair.

On shared machines the absolute speed drifts by 10-40% over seconds (other
tenants, turbo, page cache). Two variants timed back to back see nearly the same
machine, so the quantity of record is the ratio *within* a repeat
(``t_variant[r] / t_baseline[r]``), summarised by its median over repeats. The
order of the variants rotates from repeat to repeat so that none always runs
right after the same neighbour (cache and allocator state carry over).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(xs: list[float]) -> dict[str, float]:
    """Median, quartiles and range of a sample (inclusive quartiles: fine for 3+ points)."""
    xs = sorted(xs)
    if len(xs) == 1:
        q1 = q3 = xs[0]
    else:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "min": xs[0], "max": xs[-1]}


@dataclass
class Timings:
    """Seconds per call of every variant, one entry per repeat (same index = same pair)."""

    times: dict[str, list[float]]
    inner: int  # calls per sample (the time stored is per call)
    baseline: str
    ratios: dict[str, list[float]] = field(default_factory=dict)

    def summary(self, name: str) -> dict[str, float]:
        return quantiles(self.times[name])

    def ratio(self, num: str, den: str | None = None) -> dict[str, float]:
        """Median (and spread) of per-repeat ratios t[num][r] / t[den][r]."""
        den = den or self.baseline
        return quantiles([a / b for a, b in zip(self.times[num], self.times[den])])

    def ratio_to_best(self, num: str, candidates: list[str]) -> dict[str, float]:
        """Per-repeat ratio to whichever candidate has the lowest median (the 'best backend')."""
        best = min(candidates, key=lambda c: statistics.median(self.times[c]))
        return {**self.ratio(num, best), "versus": best}


def calibrate_inner(fn: Callable[[], None], min_sample_s: float, device: torch.device, cap: int = 64) -> int:
    """Calls per sample so that one sample lasts at least ``min_sample_s`` (timer noise, small shapes)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    dt = max(time.perf_counter() - t0, 1e-6)
    return max(1, min(cap, math.ceil(min_sample_s / dt)))


def interleaved(
    variants: dict[str, Callable[[], None]],
    baseline: str,
    repeats: int,
    warmup: int = 1,
    min_sample_s: float = 0.0,
    device: torch.device | str = "cpu",
    inner: int | None = None,
    budget_s: float = 0.0,
    max_repeats: int = 60,
) -> Timings:
    """Time every variant ``repeats`` times, alternating variants within each repeat.

    Every variant first runs ``warmup`` times (allocator, oneDNN/MKL kernel
    selection, lazy initialisation). Each sample then runs a variant ``inner``
    times in a row, calibrated on the baseline so that a sample lasts at least
    ``min_sample_s``; the stored time is per call. With ``budget_s``, fast groups
    get more repeats (up to ``max_repeats``) so that they too run for about that
    long: more pairs make the median ratio steadier. The garbage collector is
    paused while timing so that a collection does not land inside one sample.
    """
    device = torch.device(device)
    names = list(variants)
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not among the variants {names}")
    round_s = 0.0
    for _ in range(warmup):
        round_s = 0.0
        for name in names:
            _sync(device)
            t0 = time.perf_counter()
            variants[name]()
            _sync(device)
            round_s += time.perf_counter() - t0
    if inner is None:
        inner = calibrate_inner(variants[baseline], min_sample_s, device) if min_sample_s > 0 else 1
    if budget_s > 0 and round_s > 0:
        repeats = max(repeats, min(max_repeats, int(budget_s / (round_s * inner))))
    times: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                fn = variants[name]
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                _sync(device)
                times[name].append((time.perf_counter() - t0) / inner)
            gc.collect()  # between repeats, outside any sample
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timings(times=times, inner=inner, baseline=baseline)
