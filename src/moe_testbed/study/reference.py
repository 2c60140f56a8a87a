"""Reference results a preset ships, and whether this installation reproduces them.

``configs/studies/reference/<study>.json`` holds what the study gave where it
was measured: every configuration's per-seed values of the key metrics, the
verdicts, the mix fingerprint (moe_testbed.data.mix: a hash of the tokens), the
code version, the seeds and the machine. After a study, the runner compares
this installation's results with it, the way MLPerf states reference
convergence:

- per configuration and metric: the difference (this installation minus the
  reference, paired by seed when both ran the same seeds) ``reproduces`` when
  its 95% interval holds 0, else it ``differs``;
- per claim: the same verdict, or not;
- a different mix fingerprint is named first, as the likely reason for any difference.

``moe-testbed study SPEC --write-reference`` writes the file from a finished study.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from moe_testbed.io import atomic_write_json
from moe_testbed.study.stats import difference_interval
from moe_testbed.study.summary import read_verdicts, seed_values

REFERENCE_METRICS = ("val/loss", "val/util/mean", "val/purity/mean", "val/specialization/mean")


def reference_path(spec_source: Path | None, name: str) -> Path | None:
    """Where a preset's reference lives: ``reference/<name>.json`` beside the spec file."""
    return None if spec_source is None else Path(spec_source).parent / "reference" / f"{name}.json"


def write_reference(study_dir: Path, rows: list[dict[str, Any]], path: Path, study: str) -> Path:
    complete = [r for r in rows if r.get("status") == "complete"]
    values = seed_values(complete, list(REFERENCE_METRICS))
    configs = {c: {m: {str(s): v for s, v in values[m].get(c, {}).items()} for m in REFERENCE_METRICS}
               for c in dict.fromkeys(r["config"] for r in complete)}  # fmt: skip
    payload = {
        "study": study,
        "mix_fingerprint": sorted({r.get("mix_fingerprint") for r in complete if r.get("mix_fingerprint")}),
        "code": _code_version(),
        "seeds": sorted({int(r.get("seed") or 0) for r in complete}),
        "machine": f"{cpu_name()}, {len(__import__('os').sched_getaffinity(0))} cores, {platform.machine()}",
        "written": time.strftime("%Y-%m-%d"),
        "configs": configs,
        "verdicts": [{"claim": v["claim"], "verdict": v["verdict"]} for v in read_verdicts(study_dir)],
    }
    atomic_write_json(path, payload)
    return path


def compare(study_dir: Path, rows: list[dict[str, Any]], path: Path) -> list[str]:
    """Lines saying whether this study reproduces the reference at ``path``."""
    ref = json.loads(Path(path).read_text())
    complete = [r for r in rows if r.get("status") == "complete"]
    mine = seed_values(complete, list(REFERENCE_METRICS))
    lines = [f"reference {path} (measured on {ref.get('machine')}, code {ref.get('code')}, seeds {ref.get('seeds')})"]
    fps = sorted({r.get("mix_fingerprint") for r in complete if r.get("mix_fingerprint")})
    if fps and fps != ref.get("mix_fingerprint"):
        lines.append(f"  mix fingerprint {', '.join(fps)} differs from the reference's {', '.join(ref.get('mix_fingerprint') or ['?'])}: "
                     "a different mix is the likely reason for any difference below (moe-testbed data info)")  # fmt: skip
    theirs = {v["claim"]: v["verdict"] for v in ref.get("verdicts", [])}
    for v in read_verdicts(study_dir):
        if v["claim"] in theirs:
            same = (
                "same verdict" if theirs[v["claim"]] == v["verdict"] else f"differs (reference: {theirs[v['claim']]})"
            )
            lines.append(f"  claim {v['claim']}: {v['verdict']}, {same}")
    for config, metrics in ref.get("configs", {}).items():
        verdicts = []
        for m in REFERENCE_METRICS:
            ref_vals = {int(s): v for s, v in (metrics.get(m) or {}).items() if v is not None}
            got = mine[m].get(config)
            if not ref_vals or not got:
                continue
            d = difference_interval(got, ref_vals)
            if d.how:
                ok = d.low <= 0 <= d.high
                verdicts.append(f"{m.removeprefix('val/').removesuffix('/mean')} {'reproduces' if ok else 'differs'} "
                                f"({d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}])")  # fmt: skip
            else:
                verdicts.append(f"{m.removeprefix('val/').removesuffix('/mean')} {d.estimate:+.3f} (no interval)")
        if verdicts:
            lines.append(f"  {config}: " + "; ".join(verdicts))
    return lines


def _code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
