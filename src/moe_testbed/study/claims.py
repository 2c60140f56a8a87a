"""Claims a study checks, and their verdicts with intervals over seeds.

A spec's ``claims:`` lists statements about its configurations (a run's name
without its ``-s<seed>`` suffix), each a string in one of four forms, with an
optional ``source``::

    A > B > C on METRIC               order: A better than B better than C
    A ~ B on METRIC within M          equivalence: |A - B| < M
    A = B = C on METRIC               indistinct: no pair separated
    corr(M1, M2) < 0 [over A, B, ...] rank correlation across runs (< 0 or > 0)

"Better" is higher for every metric but losses and drop rates, where it is
lower. METRIC is a results column (``val/specialization/mean``) or an alias
(specialization, utilization, train_utilization, purity, nmi, loss, drop_rate).
A correlation runs over every run (every seed) of the listed configurations,
by default all MoE configurations of the study.

Verdicts, from the 95% intervals of study/stats.py (differences among a chain's
configurations with seeds as blocks, pooled over the chain; for a pair, the
paired t interval):

- order: ``holds`` when every adjacent difference's interval lies on the claimed
  side of 0, ``reversed`` when any lies on the other side, else ``not separated``;
  the effect is the smallest adjacent difference (in the claimed direction);
- equivalence: ``holds`` when the difference's interval lies inside (-M, M),
  ``reversed`` when it lies wholly outside, else ``not separated``;
- indistinct: ``holds`` when no pair's interval excludes 0, ``reversed`` when one does;
- correlation: ``holds`` when rho's interval lies on the claimed side of 0,
  ``reversed`` on the other, else ``not separated``.

A claim about a configuration without results is ``n/a``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from moe_testbed.study import StudyError
from moe_testbed.study.stats import Interval, blocked_differences, difference_interval, spearman_interval

METRIC_ALIASES = {
    "specialization": "val/specialization/mean",
    "utilization": "val/util/mean",
    "util": "val/util/mean",
    "train_utilization": "train/util/mean",
    "purity": "val/purity/mean",
    "nmi": "val/nmi/mean",
    "loss": "val/loss",
    "val_loss": "val/loss",
    "drop_rate": "train/drop_rate/mean",
}
VERDICTS = ("holds", "reversed", "not separated", "n/a")

# seed values of one metric per configuration: {config: {seed: value}}
SeedValues = Mapping[str, Mapping[int, float]]


def metric_key(name: str) -> str:
    return METRIC_ALIASES.get(name, name)


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "drop_rate" in metric


@dataclass
class Claim:
    text: str
    kind: str  # order | equivalent | indistinct | correlation
    metric: str  # the (first) metric
    configs: list[str] = field(default_factory=list)
    margin: float = 0.0  # equivalence
    metric2: str | None = None  # correlation
    sign: int = -1  # correlation: the claimed sign of rho
    source: str = ""

    def metrics(self) -> list[str]:
        return [self.metric] + ([self.metric2] if self.metric2 else [])


@dataclass
class Verdict:
    claim: Claim
    verdict: str
    effect: Interval | None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        c = self.claim
        return {"claim": c.text, "kind": c.kind, "source": c.source, "verdict": self.verdict,
                "effect": self.effect.to_json() if self.effect else None, "detail": self.detail}  # fmt: skip


_ORDER = re.compile(r"^(?P<runs>[^~=<>]+(?:>[^~=<>]+)+) on (?P<metric>\S+)$")
_EQUIV = re.compile(r"^(?P<a>[^~=<>]+)~(?P<b>[^~=<>]+) on (?P<metric>\S+) within (?P<margin>[0-9.eE+-]+)$")
_INDIST = re.compile(r"^(?P<runs>[^~=<>]+(?:=[^~=<>]+)+) on (?P<metric>\S+)$")
_CORR = re.compile(r"^corr\((?P<m1>[^,]+),(?P<m2>[^)]+)\)\s*(?P<op>[<>])\s*0(?: over (?P<over>.+))?$")


def parse_claim(entry: Any, where: str) -> Claim:
    """A claim from a spec entry: a string, or a mapping with ``claim:`` and ``source:``."""
    source = ""
    if isinstance(entry, dict):
        unknown = set(entry) - {"claim", "source"}
        if unknown or "claim" not in entry:
            raise StudyError(f"{where}: a claim is a string or a mapping with claim: and source: (got {entry!r})")
        source, entry = str(entry.get("source") or ""), entry["claim"]
    text = " ".join(str(entry).split())
    names = lambda part, sep: [n.strip() for n in part.split(sep)]  # noqa: E731
    if m := _CORR.match(text):
        over = names(m["over"], ",") if m["over"] else []
        return Claim(text, "correlation", metric_key(m["m1"].strip()), over, metric2=metric_key(m["m2"].strip()),
                     sign=-1 if m["op"] == "<" else 1, source=source)  # fmt: skip
    if m := _EQUIV.match(text):
        return Claim(text, "equivalent", metric_key(m["metric"]), [m["a"].strip(), m["b"].strip()],
                     margin=float(m["margin"]), source=source)  # fmt: skip
    if m := _ORDER.match(text):
        return Claim(text, "order", metric_key(m["metric"]), names(m["runs"], ">"), source=source)
    if m := _INDIST.match(text):
        return Claim(text, "indistinct", metric_key(m["metric"]), names(m["runs"], "="), source=source)
    raise StudyError(
        f"{where}: cannot read claim {text!r}: write 'A > B on METRIC', 'A ~ B on METRIC within M', "
        "'A = B on METRIC' or 'corr(M1, M2) < 0 [over A, B]'"
    )


def evaluate(claim: Claim, values: Mapping[str, SeedValues], moe_configs: list[str]) -> Verdict:
    """The verdict of ``claim``; ``values[metric][config][seed]`` holds the study's results."""
    by_config = values.get(claim.metric, {})
    missing = [c for c in claim.configs if not by_config.get(c)]
    if missing:
        return Verdict(claim, "n/a", None, f"no results for {', '.join(missing)}")
    if claim.kind == "correlation":
        return _correlation(claim, values, claim.configs or moe_configs)
    sign = -1 if lower_is_better(claim.metric) else 1
    if claim.kind == "order":
        pairs = list(zip(claim.configs, claim.configs[1:]))
        diffs = [_signed(d, sign) for d in blocked_differences(by_config, pairs)]
        detail = "; ".join(f"{a} - {b}: {_fmt(d)}" for (a, b), d in zip(zip(claim.configs, claim.configs[1:]), diffs))
        seps = [d.separated for d in diffs]
        verdict = "reversed" if -1 in seps else "holds" if all(s == 1 for s in seps) else "not separated"
        return Verdict(claim, verdict, min(diffs, key=lambda d: d.estimate), detail)
    if claim.kind == "equivalent":
        d = difference_interval(by_config[claim.configs[0]], by_config[claim.configs[1]])
        m = claim.margin
        inside = -m < d.low and d.high < m
        outside = d.low > m or d.high < -m
        verdict = "holds" if inside else "reversed" if outside else "not separated"
        return Verdict(claim, verdict, d, f"margin {m:g}")
    combos = list(combinations(claim.configs, 2))
    pairs = [(a, b, d) for (a, b), d in zip(combos, blocked_differences(by_config, combos))]
    apart = [(a, b, d) for a, b, d in pairs if d.separated]
    detail = "; ".join(f"{a} - {b}: {_fmt(d)}" for a, b, d in apart) or "no pair separated"
    largest = max((d for _, _, d in pairs), key=lambda d: abs(d.estimate))
    return Verdict(claim, "reversed" if apart else "holds", largest, detail)


def _signed(d: Interval, sign: int) -> Interval:
    if sign > 0:
        return d
    return Interval(-d.estimate, -d.high, -d.low, d.n, d.how)


def _correlation(claim: Claim, values: Mapping[str, SeedValues], configs: list[str]) -> Verdict:
    xs, ys = values.get(claim.metric, {}), values.get(claim.metric2, {})
    pts = [(xs[c][s], ys[c][s]) for c in configs if c in xs and c in ys for s in xs[c] if s in ys[c]]
    rho = spearman_interval([p[0] for p in pts], [p[1] for p in pts])
    side = rho.separated
    verdict = "holds" if side == claim.sign else "reversed" if side == -claim.sign else "not separated"
    return Verdict(claim, verdict, rho, f"{rho.n} runs of {len(configs)} configurations")


def _fmt(iv: Interval) -> str:
    if math.isnan(iv.low):
        return f"{iv.estimate:+.3g} (no interval: {iv.n} seed{'s' if iv.n != 1 else ''})"
    return f"{iv.estimate:+.3g} [{iv.low:+.3g}, {iv.high:+.3g}]"


def format_effect(iv: Interval | None) -> str:
    return "-" if iv is None or math.isnan(iv.estimate) else _fmt(iv)
