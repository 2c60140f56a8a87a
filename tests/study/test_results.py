"""The results table: rebuilt from per-run records, never losing or duplicating a row under concurrency."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq

from moe_testbed.study.results import make_record, rebuild_table, table_rows, write_plan, write_result

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from moe_testbed.study.results import make_record, rebuild_table, write_result

    study, i, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    (study / f"ready{i}").touch()
    while not go.exists():  # start together, to make the writes collide
        time.sleep(0.005)
    for attempt in range(2):  # the same run written twice: still one row
        final = {"val/loss": float(i), f"val/loss/d{i % 3}": 1.0}
        write_result(study, make_record(f"run{i:02d}", "complete", {"train.seed": i}, final=final, attempt=attempt))
        rebuild_table(study)
    """
)


def test_many_processes_finishing_at_once_give_each_run_exactly_once(tmp_path: Path):
    n = 8
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(i), str(go)], stderr=subprocess.PIPE)
        for i in range(n)
    ]
    deadline = time.time() + 60
    while len(list(tmp_path.glob("ready*"))) < n and time.time() < deadline:  # all imported, all waiting
        time.sleep(0.01)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    with open(tmp_path / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["name"] for r in rows) == [f"run{i:02d}" for i in range(n)]
    table = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert sorted(r["name"] for r in table) == [f"run{i:02d}" for i in range(n)]
    assert {r["name"]: r["val/loss"] for r in table} == {f"run{i:02d}": float(i) for i in range(n)}
    assert {"val/loss/d0", "val/loss/d1", "val/loss/d2"} <= set(table[0])
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path / "results").glob(".*.tmp"))


def test_rows_follow_the_plan_and_columns_are_typed(tmp_path: Path):
    write_plan(tmp_path, ["b", "a"], ["balance.scope", "balance.capacity_factor"])
    write_result(tmp_path, make_record("a", "complete", {"balance.scope": "global", "balance.capacity_factor": None},
                                       final={"val/loss": 2.5, "val/util/mean": float("nan")}))  # fmt: skip
    write_result(tmp_path, make_record("b", "skipped", {"balance.scope": "sequence", "balance.capacity_factor": 1.5},
                                       reason="routing.router='x' is not allowed"))  # fmt: skip
    write_result(tmp_path, make_record("zz-old", "failed", {"train.seed": 3}, reason="boom"))
    rows = rebuild_table(tmp_path)
    assert [r["name"] for r in rows] == ["b", "a", "zz-old"]  # plan order, then runs no longer planned
    rows_, columns = table_rows(tmp_path)
    assert columns[:8] == ["name", "config", "seed", "status", "reason", "balance.scope", "balance.capacity_factor",
                           "train.seed"]  # fmt: skip
    table = pq.read_table(tmp_path / "results.parquet")
    assert str(table.schema.field("balance.capacity_factor").type) == "double"
    assert str(table.schema.field("val/loss").type) == "double"
    a = {r["name"]: r for r in table.to_pylist()}["a"]
    assert a["val/loss"] == 2.5 and a["val/util/mean"] is None  # NaN is stored as null
    with open(tmp_path / "results.csv") as fh:
        b = next(csv.DictReader(fh))
    assert b["status"] == "skipped" and "not allowed" in b["reason"] and b["val/loss"] == ""


def test_mixed_types_in_a_column_become_text(tmp_path: Path):
    write_result(tmp_path, make_record("a", "complete", {"routing.groups": None, "x.y": 1}))
    write_result(tmp_path, make_record("b", "complete", {"routing.groups": {"py": [0, 1]}, "x.y": "one"}))
    rebuild_table(tmp_path)
    rows = {r["name"]: r for r in pq.read_table(tmp_path / "results.parquet").to_pylist()}
    assert rows["b"]["routing.groups"] == '{"py":[0,1]}'
    assert (rows["a"]["x.y"], rows["b"]["x.y"]) == ("1", "one")


def test_training_drop_rate_comes_from_the_summary(tmp_path: Path):
    # Capacity drops happen in training (evaluation is dropless by default), so the
    # table carries the last training log's drop rate next to the validation metrics.
    summary = {"tokens_per_s": 10.0, "train_routing": {"train/drop_rate/mean": 0.25},
               "final": {"val/loss": 3.0, "val/drop_rate/mean": 0.0}}  # fmt: skip
    write_result(tmp_path, make_record("cf1", "complete", {"balance.capacity_factor": 1.0}, summary=summary))
    write_result(tmp_path, make_record("dense", "complete", {"model.dense": True}, summary={"final": {}}))
    rows, columns = table_rows(tmp_path)
    # Training utilization and drop rate follow the validation metrics (SH/BA balance only in training).
    assert columns.index("train/util/mean") == columns.index("val/drop_rate/mean") + 1
    assert columns.index("train/drop_rate/mean") == columns.index("val/drop_rate/mean") + 2
    by_name = {r["name"]: r for r in rows}
    assert by_name["cf1"]["train/drop_rate/mean"] == 0.25 and by_name["cf1"]["val/drop_rate/mean"] == 0.0
    assert by_name["dense"]["train/drop_rate/mean"] is None
