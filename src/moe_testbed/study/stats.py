"""Intervals over seeds: the statistics behind a study's summary table and its verdicts.

Every interval here is a two-sided 95% interval (``LEVEL``):

- the mean of a metric over a configuration's seeds: Student t,
  ``mean +- t(0.975, n - 1) * s / sqrt(n)`` with ``s`` the sample standard
  deviation (n - 1 in the denominator);
- the difference of two configurations: paired by seed when both ran the same
  seeds (the seed fixes the initialisation and the data order, so a paired
  difference removes what the two runs share), Student t on the per-seed
  differences; otherwise Welch's t with the Welch-Satterthwaite degrees of freedom;
- the differences among several configurations (a claim's chain): seeds as
  blocks, the residual variance of the configuration x seed table (the two-way
  analysis of variance without replication, df = (k - 1)(n - 1)) pooled over
  those k configurations, each difference ``+- t(0.975, df) * sqrt(2 MSE / n)``;
  for two configurations this is exactly the paired t interval;
- a rank correlation across runs: Spearman's rho with the Fisher z interval and
  Bonett & Wright's (2000) variance ``(1 + rho^2 / 2) / (n - 3)``.

With fewer points than an interval needs (one seed; under four runs for a
correlation) the bounds are NaN: the estimate stands, its interval does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int  # seeds (or runs, for a correlation)
    how: str  # "t", "paired t", "welch t", "spearman fisher-z", or "" when there is no interval

    @property
    def separated(self) -> int:
        """+1 when the whole interval lies above 0, -1 below, 0 when it holds 0 (or there is none)."""
        if math.isnan(self.low) or math.isnan(self.high):
            return 0
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def to_json(self) -> dict:
        """JSON has no NaN: a missing bound is null."""
        clean = lambda v: None if math.isnan(v) else v  # noqa: E731
        return {"estimate": clean(self.estimate), "low": clean(self.low), "high": clean(self.high), "n": self.n,
                "how": self.how}  # fmt: skip


def _finite(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return arr[np.isfinite(arr)]


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Student t interval of the mean of ``values`` (NaN and None skipped)."""
    x = _finite(values)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "")
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1, "")
    half = stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, "t")


def sample_std(values: Sequence[float]) -> float:
    x = _finite(values)
    return float(x.std(ddof=1)) if len(x) > 1 else math.nan


def difference_interval(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> Interval:
    """Interval of mean(a) - mean(b) for values keyed by seed: paired on the seeds both have, else Welch."""
    a = {s: v for s, v in a.items() if v is not None and math.isfinite(v)}
    b = {s: v for s, v in b.items() if v is not None and math.isfinite(v)}
    if not a or not b:
        return Interval(math.nan, math.nan, math.nan, 0, "")
    if set(a) == set(b):
        d = mean_interval([a[s] - b[s] for s in sorted(a)], level)
        return Interval(d.estimate, d.low, d.high, d.n, "paired t" if d.how else "")
    return welch_interval(list(a.values()), list(b.values()), level)


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
    x, y = _finite(a), _finite(b)
    est = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return Interval(est, math.nan, math.nan, min(len(x), len(y)), "")
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:
        return Interval(est, est, est, min(len(x), len(y)), "welch t")
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    half = stats.t.ppf(0.5 + level / 2, df) * se
    return Interval(est, est - half, est + half, min(len(x), len(y)), "welch t")


def spearman_interval(x: Sequence[float], y: Sequence[float], level: float = LEVEL) -> Interval:
    """Spearman's rho of paired points (ties ranked by their mean rank) with a Fisher z interval."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    n = len(pairs)
    if n < 3:
        return Interval(math.nan, math.nan, math.nan, n, "")
    rx = stats.rankdata([p[0] for p in pairs])
    ry = stats.rankdata([p[1] for p in pairs])
    if rx.std() == 0 or ry.std() == 0:
        return Interval(math.nan, math.nan, math.nan, n, "")
    rho = float(np.corrcoef(rx, ry)[0, 1])
    if n < 4:
        return Interval(rho, math.nan, math.nan, n, "")
    if abs(rho) >= 1:  # a perfect rank order: Fisher's z is infinite and the interval collapses on rho
        return Interval(rho, rho, rho, n, "spearman fisher-z")
    z, se = math.atanh(rho), math.sqrt((1 + rho**2 / 2) / (n - 3))
    q = stats.norm.ppf(0.5 + level / 2)
    return Interval(rho, math.tanh(z - q * se), math.tanh(z + q * se), n, "spearman fisher-z")


def blocked_differences(values: Mapping[str, Mapping[int, float]], pairs: Sequence[tuple[str, str]],
                        level: float = LEVEL) -> list[Interval]:  # fmt: skip
    """Intervals of ``mean(a) - mean(b)`` for ``pairs``, seeds as blocks over the configurations they name.

    Needs every configuration to have the same seeds (at least two); otherwise each
    pair falls back to :func:`difference_interval`.
    """
    configs = list(dict.fromkeys(c for pair in pairs for c in pair))
    clean = {c: {s: v for s, v in values[c].items() if v is not None and math.isfinite(v)} for c in configs}
    seeds = sorted(set.intersection(*(set(clean[c]) for c in configs))) if configs else []
    if len(configs) < 3 or len(seeds) < 2 or any(set(clean[c]) != set(seeds) for c in configs):
        return [difference_interval(clean[a], clean[b], level) for a, b in pairs]
    x = np.array([[clean[c][s] for s in seeds] for c in configs])  # [k, n]
    k, n = x.shape
    resid = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + x.mean()
    df = (k - 1) * (n - 1)
    mse = float((resid**2).sum() / df)
    half = stats.t.ppf(0.5 + level / 2, df) * math.sqrt(2 * mse / n)
    means = dict(zip(configs, x.mean(1)))
    out = []
    for a, b in pairs:
        d = float(means[a] - means[b])
        out.append(Interval(d, d - half, d + half, n, "blocked t"))
    return out
