"""Runs that start from another run of their study (``model.init_from: "@CONFIG"``, study/depends.py)."""

from __future__ import annotations

import pytest

from moe_testbed.study import StudyError
from tests.study.helpers import attempts, run, table, write_spec

MOE = {"model.dense": False}


def test_a_run_starts_from_the_same_seeds_source_once_that_one_is_complete(tmp_path):
    spec = write_spec(tmp_path / "s.yaml", seeds=2, runs=[
        {"name": "up", **MOE, "model.init_from": "@dense"},  # listed first: still trained after its source
        {"name": "dense", "train.steps": 2},
    ])  # fmt: skip
    out = tmp_path / "study"
    code, text = run(spec, out, "run_from_source")
    assert code == 0, text
    for seed in (0, 1):
        source, status = (out / "runs" / f"up-s{seed}" / "source.txt").read_text().split()
        assert source == str((out / "runs" / f"dense-s{seed}").resolve()) and status == "complete"
    assert all(row["status"] == "complete" for row in table(out).values())


def test_the_same_study_spelled_another_way_is_complete_not_a_conflict(tmp_path, monkeypatch):
    spec = write_spec(tmp_path / "s.yaml", runs=[{"name": "up", **MOE, "model.init_from": "@dense"},
                                                 {"name": "dense", "train.steps": 2}])  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert run(spec, tmp_path / "study", "run_from_source")[0] == 0
    code, text = run(spec, "study", "run_from_source")  # relative --out: the same directories
    assert code == 0 and "2 runs already complete" in text and "conflict" not in text, text
    assert attempts(tmp_path / "study", "up") == ["fresh"]


def test_a_run_whose_source_failed_is_recorded_failed_and_never_started(tmp_path):
    spec = write_spec(tmp_path / "s.yaml", runs=[
        {"name": "crash-dense", "train.steps": 2},
        {"name": "up", **MOE, "model.init_from": "@crash-dense"},
        {"name": "fine", "train.steps": 3},
    ])  # fmt: skip
    out = tmp_path / "study"
    code, text = run(spec, out, "run_from_source")
    rows = table(out)
    assert code == 1 and rows["crash-dense"]["status"] == "failed" and rows["fine"]["status"] == "complete"
    assert rows["up"]["status"] == "failed" and "starts from run crash-dense" in rows["up"]["reason"]
    assert attempts(out, "up") == []  # never started from a partial or missing source


@pytest.mark.parametrize("runs, message", [
    ([{"name": "up", **MOE, "model.init_from": "@nope"}, {"name": "dense", "train.steps": 2}],
     "model.init_from=@nope names no configuration of the study: choose from dense, up"),
    ([{"name": "up", **MOE, "model.init_from": "@moe"}, {"name": "moe", **MOE}],
     "must name a dense run trained from scratch"),
])  # fmt: skip
def test_a_source_that_is_not_a_dense_run_of_the_study_is_refused(tmp_path, runs, message):
    spec = write_spec(tmp_path / "s.yaml", runs=runs)
    with pytest.raises(StudyError, match=message):
        run(spec, tmp_path / "study", "run_from_source")
