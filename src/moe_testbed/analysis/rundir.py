"""Reading a run directory written by the trainer.

A run directory holds (see docs/metrics.md, "Run directory"):

    config.yaml              the resolved config (sections data, model, routing, ...)
    metrics.jsonl            one JSON object per line, "kind": "train" | "eval", "step", "tokens", ...
    routing/step_NNNNNN.npz  routing counts at every evaluation
    summary.json             status, parameter counts, throughput, final eval scalars, warnings

Everything here tolerates a run that is still going (no summary yet, a last
metrics line cut in half) or that was resumed (steps logged twice): the report
is often opened on a live run. What cannot be read is a :class:`ReportError`
with one line naming the path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moe_testbed.errors import UserError
from moe_testbed.routing import tables
from moe_testbed.routing.tables import Snapshot
from moe_testbed.train.run_dir import summary_status

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


class ReportError(UserError):
    """A user error while reading runs or writing a report (not a run dir, an empty run, ...).

    The CLI prints ``error: <message>`` and exits with status 2.
    """


@dataclass
class Run:
    """Everything one run directory holds, loaded into memory (all of it is small)."""

    path: Path
    name: str
    config: dict[str, Any]
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    snapshots: list[Snapshot]
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)  # problems found while reading

    def config_value(self, dotted: str, default: Any = None) -> Any:
        value = _get(self.config, dotted)
        return default if value is None else value

    @property
    def status(self) -> str:
        return summary_status(self.summary)  # "killed" for a run that says running but died without a word

    @property
    def ep_load(self) -> dict[str, float]:
        """Expert-parallel rank load (``ep_load/mean``): at the last evaluation and the last training log, if logged."""
        out = {}
        if isinstance(self.final.get("val/ep_load/mean"), int | float):
            out["validation"] = float(self.final["val/ep_load/mean"])
        logged = [r for r in self.train if isinstance(r.get("ep_load/mean"), int | float)]
        if logged:
            out["training"] = float(logged[-1]["ep_load/mean"])
        return out

    @property
    def tokens(self) -> int | None:
        """Training tokens seen: from the summary, else from the last metrics line."""
        if isinstance(self.summary.get("tokens"), int | float):
            return int(self.summary["tokens"])
        records = [r for r in self.train + self.eval if isinstance(r.get("tokens"), int | float)]
        return int(max(r["tokens"] for r in records)) if records else None

    @property
    def final(self) -> dict[str, Any]:
        """Last evaluation scalars: the summary's ``final`` (complete runs), else the last eval line."""
        last_eval = dict(self.eval[-1]) if self.eval else {}
        final = self.summary.get("final")
        if isinstance(final, dict) and final:
            return {**last_eval, **final}
        return last_eval

    @property
    def domains(self) -> list[str]:
        if self.snapshots:
            return self.snapshots[-1].domains
        prefix = "val/loss/"
        return sorted({k[len(prefix) :] for r in self.eval for k in r if k.startswith(prefix)})

    @property
    def layers(self) -> list[str]:
        if self.snapshots:
            return self.snapshots[-1].layers
        names = {k.split("/")[-1] for r in self.eval for k in r if k.startswith("val/util/")}
        return sorted(names - {"mean"}, key=_layer_sort_key)

    def snapshot_at(self, step: int) -> Snapshot:
        """The snapshot whose step is closest to ``step`` (ties: the earlier one)."""
        if not self.snapshots:
            raise ReportError(f"{self.path} has no routing snapshots (routing/step_*.npz)")
        return min(self.snapshots, key=lambda s: (abs(s.step - step), s.step))


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in RUN_FILES)


def load_run(path: str | Path) -> Run:
    """Load a run directory; :class:`ReportError` if it is not one or holds nothing to report."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path} does not exist")
    if not is_run_dir(path):
        children = sorted(p.name for p in path.iterdir() if is_run_dir(p)) if path.is_dir() else []
        hint = f"; it holds {len(children)} run directories (pass them, e.g. {path}/*)" if children else ""
        raise ReportError(f"{path} is not a run directory (none of {', '.join(RUN_FILES)}){hint}")
    warnings: list[str] = []
    config = _read_yaml(path / "config.yaml", warnings)
    train, eval_ = read_metrics(path / "metrics.jsonl", warnings)
    snapshots = [load_snapshot(p) for p in sorted((path / "routing").glob("step_*.npz"))]
    snapshots.sort(key=lambda s: s.step)
    summary = _read_json(path / "summary.json", warnings)
    if not train and not eval_ and not snapshots:
        raise ReportError(f"{path} holds no metrics yet (metrics.jsonl is empty and routing/ has no snapshots)")
    warnings += [f"trainer: {w}" for w in summary.get("warnings", []) if isinstance(w, str)]
    name = str(_get(config, "run.name") or path.resolve().name)
    return Run(path, name, config, train, eval_, snapshots, summary, warnings)


def read_metrics(path: Path, warnings: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Train and eval records of ``metrics.jsonl``, each in step order.

    A line that does not parse is skipped with a warning (a live run may be
    writing the last one). When a resumed run logs a step again, the records it
    logged after its checkpoint are replaced by the new ones.
    """
    warnings = [] if warnings is None else warnings
    by_kind: dict[str, list[dict]] = {"train": [], "eval": []}
    if not path.is_file():
        return [], []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if lineno < len(lines):  # the last line may be half-written by a live run: not worth a warning
                warnings.append(f"{path.name} line {lineno} is not valid JSON; skipped")
            continue
        if not isinstance(record, dict) or record.get("kind") not in by_kind or "step" not in record:
            warnings.append(f"{path.name} line {lineno} has no kind train|eval and step; skipped")
            continue
        records = by_kind[record["kind"]]
        # Resume: drop what the crashed attempt logged from this step on.
        while records and records[-1]["step"] >= record["step"]:
            records.pop()
        records.append({k: _clean(v) for k, v in record.items()})
    return by_kind["train"], by_kind["eval"]


def load_snapshot(path: Path) -> Snapshot:
    """Read one ``routing/step_NNNNNN.npz`` (routing/tables.py); an unreadable one is a ReportError."""
    try:
        return tables.load_snapshot(path)
    except tables.SnapshotError as exc:
        raise ReportError(str(exc)) from None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"n_experts": 16}}`` -> ``{"model.n_experts": 16}`` (dicts only; lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not dotted.endswith("groups"):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _clean(value: Any) -> Any:
    # json allows NaN/Infinity literals; keep them as floats, and None (JSON null) as NaN for scalars.
    return math.nan if value is None else value


def _layer_sort_key(name: str) -> tuple[int, str]:
    digits = "".join(ch for ch in name if ch.isdigit())
    return (int(digits) if digits else -1, name)


def _read_yaml(path: Path, warnings: list[str]) -> dict[str, Any]:
    if not path.is_file():
        warnings.append("config.yaml is missing: config keys are unknown")
        return {}
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ReportError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ReportError(f"{path} must hold a mapping of config sections")
    return raw


def _read_json(path: Path, warnings: list[str]) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        warnings.append("summary.json is not valid JSON; ignored")
        return {}
    return raw if isinstance(raw, dict) else {}
