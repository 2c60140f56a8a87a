"""One result record per run, and the study's results table rebuilt from them.

Why records + rebuild instead of appending rows to one table: several workers
finish at once. Each writes only its own ``results/<run>.json`` (atomically, via
a rename), so no two processes ever write the same file. The table
(``results.parquet`` and ``results.csv``) is a pure function of those files,
rebuilt under an exclusive ``flock`` on ``.table.lock`` and written atomically.
Because every writer first writes its record and then takes the lock and reads
*all* records, whoever rebuilds last has seen every record written before it:
no row is lost, and since rows are keyed by run name, none is duplicated.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from moe_testbed.io import atomic_write, atomic_write_json, atomic_write_text, csv_text
from moe_testbed.study.locks import FileLock
from moe_testbed.study.summary import write_summary

RESULTS_DIR = "results"
PLAN_FILE = "plan.json"
TABLE_LOCK = ".table.lock"
# Final eval scalars in the table, in this order (means over MoE layers); per-domain
# losses ("val/loss/<domain>") follow. Absent keys (e.g. routing metrics of a dense
# baseline) are empty cells.
METRIC_KEYS = (
    "val/loss",
    "val/loss_balanced",
    "val/util/mean",
    "val/purity/mean",
    "val/purity_chance/mean",
    "val/nmi/mean",
    "val/specialization/mean",
    "val/drop_rate/mean",
)
# Routing means of the last training log (from summary.json): capacity drops happen here.
TRAIN_KEYS = ("train/util/mean", "train/drop_rate/mean")
RUN_KEYS = ("tokens_per_s", "wall_s", "steps", "tokens", "params_active", "params_total", "global_scope",
            "forward_microbatches", "domains_per_microbatch", "mix_fingerprint", "dtype")  # fmt: skip


def result_path(study_dir: Path, name: str) -> Path:
    return Path(study_dir) / RESULTS_DIR / f"{name}.json"


def read_result(study_dir: Path, name: str) -> dict[str, Any] | None:
    try:
        data = json.loads(result_path(study_dir, name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_result(study_dir: Path, record: dict[str, Any]) -> None:
    record = {**record, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(result_path(study_dir, record["name"]), _jsonable(record))


def make_record(
    name: str,
    status: str,
    params: dict[str, Any],
    *,
    reason: str | None = None,
    summary: dict[str, Any] | None = None,
    final: dict[str, Any] | None = None,
    run_dir: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A result record; numbers come from the trainer's summary.json when there is one."""
    summary = summary or {}
    final = summary.get("final") or final or {}
    return {
        "name": name,
        "status": status,
        "reason": reason,
        "params": params,
        "final": {k: v for k, v in final.items() if k.startswith("val/") and isinstance(v, (int, float))},
        **{k: (summary.get("train_routing") or {}).get(k) for k in TRAIN_KEYS},
        **{k: summary.get(k) for k in RUN_KEYS},
        "definitions": "; ".join(summary.get("definitions") or []) or None,
        "run_dir": run_dir,
        **extra,
    }


def write_plan(study_dir: Path, names: list[str], varied: list[str], **info: Any) -> None:
    """Row order and varied-key columns for the table (the spec's order), plus provenance ``info``."""
    atomic_write_json(Path(study_dir) / PLAN_FILE, _jsonable({"runs": names, "varied": varied, **info}))


def rebuild_table(study_dir: Path) -> list[dict[str, Any]]:
    """Rewrite results.parquet and results.csv from results/*.json; returns the rows."""
    study_dir = Path(study_dir)
    with FileLock(study_dir / TABLE_LOCK):
        rows, columns = table_rows(study_dir)
        atomic_write_text(study_dir / "results.csv", csv_text(rows, columns))
        _write_parquet(study_dir / "results.parquet", rows, columns)
        write_summary(study_dir, read_plan(study_dir), rows, [*METRIC_KEYS, *TRAIN_KEYS])
    return rows


def read_plan(study_dir: Path) -> dict[str, Any]:
    try:
        plan = json.loads((Path(study_dir) / PLAN_FILE).read_text())
    except (OSError, ValueError):
        plan = {}
    return {"runs": [], "varied": [], **plan}


def table_rows(study_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    plan = read_plan(study_dir)
    records = {}
    for path in sorted((study_dir / RESULTS_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # only complete files are ever renamed into place; be lenient anyway
        if isinstance(record, dict) and record.get("name") == path.stem:
            records[path.stem] = record
    order = [n for n in plan["runs"] if n in records] + sorted(n for n in records if n not in plan["runs"])
    configs, seeds = plan.get("configs", {}), dict(zip(plan["runs"], plan.get("seeds") or []))
    varied = list(plan["varied"])
    for name in order:
        varied += [k for k in records[name].get("params", {}) if k not in varied]
    domain_keys: list[str] = []
    for name in order:
        for key in records[name].get("final", {}):
            if key.startswith("val/loss/") and key not in domain_keys:
                domain_keys.append(key)
    columns = ["name", "config", "seed", "status", "reason", *varied, *METRIC_KEYS, *TRAIN_KEYS, *domain_keys,
               *RUN_KEYS, "definitions", "run_dir"]  # fmt: skip
    rows = []
    for name in order:
        rec = records[name]
        row: dict[str, Any] = {"name": name, "config": configs.get(name, name), "seed": seeds.get(name),
                               "status": rec.get("status"), "reason": rec.get("reason")}  # fmt: skip
        row.update({k: _cell(rec.get("params", {}).get(k)) for k in varied})
        row.update({k: rec.get("final", {}).get(k) for k in (*METRIC_KEYS, *domain_keys)})
        row.update({k: rec.get(k) for k in (*TRAIN_KEYS, *RUN_KEYS, "definitions", "run_dir")})
        rows.append(row)
    return rows, columns


# ---- writing ------------------------------------------------------------------


def _cell(value: Any) -> Any:
    """Config values in a table cell: lists and mappings as JSON text."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return value


def _write_parquet(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = []
    for col in columns:
        values = [row.get(col) for row in rows]
        try:
            arrays.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed types in one column (e.g. a key that is a number in one run and a
            # string in another): store it as text rather than fail the whole table.
            arrays.append(pa.array([None if v is None else str(v) for v in values], type=pa.string()))
    table = pa.Table.from_arrays(arrays, names=columns)  # (pa.table(dict) would import pandas: +1 s per writer)
    atomic_write(path, lambda p: pq.write_table(table, str(p)))


def _jsonable(value: Any) -> Any:
    """NaN/inf are not JSON: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
