"""Reading run directories: the format the trainer writes, live and resumed runs, user errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_testbed.analysis.rundir import ReportError, flatten, load_run

from .fake_run import make_fake_run


def test_load_fake_run(tmp_path):
    path = make_fake_run(tmp_path / "run_a", steps=200, eval_every=100, log_every=20, n_layers=2, n_experts=4)
    run = load_run(path)
    assert run.name == "run_a"
    assert run.status == "complete"
    assert run.config_value("model.n_experts") == 4
    assert run.config_value("balance.capacity_factor") is None
    assert [r["step"] for r in run.train] == list(range(20, 201, 20))
    assert [r["step"] for r in run.eval] == [0, 100, 200]
    assert [s.step for s in run.snapshots] == [0, 100, 200]
    assert run.layers == ["L0", "L1"]
    assert run.domains == ["python", "english", "html", "german"]
    assert run.tokens == 200 * 2048
    snap = run.snapshots[-1]
    assert snap.tables.counts.shape == (2, 4, 4) and snap.top_k == 2
    assert snap.tables.ref_counts.shape == (2, 4, 4) and snap.train_counts.dtype == np.int64
    # The snapshot reproduces the scalars the eval line logged (same code path).
    for key, value in snap.scalars(prefix="val/").items():
        assert run.final[key] == pytest.approx(value, nan_ok=True), key
    assert run.snapshot_at(140).step == 100 and run.snapshot_at(160).step == 200 and run.snapshot_at(150).step == 100


def test_live_run_without_summary_and_half_written_line(tmp_path):
    path = make_fake_run(tmp_path / "live")
    (path / "summary.json").unlink()
    with open(path / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 2')  # the trainer is writing this line right now
    run = load_run(path)
    assert run.status == "unknown"
    assert run.tokens == 200 * 2048  # from the last metrics line
    assert run.warnings == []  # a cut last line is expected, not a problem
    assert run.final["step"] == 200


def test_corrupt_line_in_the_middle_is_skipped_with_a_warning(tmp_path):
    path = make_fake_run(tmp_path / "run")
    lines = (path / "metrics.jsonl").read_text().splitlines()
    lines.insert(3, "not json")
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run = load_run(path)
    assert any("line 4" in w for w in run.warnings)
    assert len(run.eval) == 3


def test_resumed_run_replaces_relogged_steps(tmp_path):
    path = make_fake_run(tmp_path / "run", steps=100, eval_every=50, log_every=20)
    with open(path / "metrics.jsonl", "a") as fh:  # resumed from the step-60 checkpoint
        fh.write(json.dumps({"kind": "train", "step": 80, "tokens": 1, "loss": 9.0}) + "\n")
    run = load_run(path)
    assert [r["step"] for r in run.train] == [20, 40, 60, 80]
    assert run.train[-1]["loss"] == 9.0
    assert [r["step"] for r in run.eval] == [0, 50, 100]


def test_trainer_warnings_are_kept(tmp_path):
    path = make_fake_run(tmp_path / "run")
    summary = json.loads((path / "summary.json").read_text())
    summary["warnings"] = ["capacity dropped 12% of slots"]
    (path / "summary.json").write_text(json.dumps(summary))
    assert load_run(path).warnings == ["trainer: capacity dropped 12% of slots"]


def test_not_a_run_dir(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="not a run directory"):
        load_run(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ReportError, match="not a run directory"):
        load_run(tmp_path / "file.txt")


def test_study_dir_hints_at_its_runs(tmp_path):
    make_fake_run(tmp_path / "study" / "a", steps=20, eval_every=20, log_every=10)
    make_fake_run(tmp_path / "study" / "b", steps=20, eval_every=20, log_every=10)
    with pytest.raises(ReportError, match="holds 2 run directories"):
        load_run(tmp_path / "study")


def test_empty_run(tmp_path):
    path = tmp_path / "fresh"
    path.mkdir()
    (path / "config.yaml").write_text("model: {n_experts: 4}\n")
    (path / "metrics.jsonl").write_text("")
    with pytest.raises(ReportError, match="no metrics yet"):
        load_run(path)


def test_bad_files(tmp_path):
    path = make_fake_run(tmp_path / "run", steps=20, eval_every=20, log_every=10)
    (path / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ReportError, match="not valid YAML"):
        load_run(path)
    path = make_fake_run(tmp_path / "run2", steps=20, eval_every=20, log_every=10)
    (path / "routing" / "step_000020.npz").write_bytes(b"garbage")
    with pytest.raises(ReportError, match="not a readable routing snapshot"):
        load_run(path)
    np.savez(path / "routing" / "step_000020.npz", counts=np.zeros((1, 2, 2)))
    with pytest.raises(ReportError, match="lacks the arrays layers, domains"):
        load_run(path)
    np.savez(path / "routing" / "step_000020.npz", counts=np.zeros((1, 2, 2)), layers=["L0", "L1"], domains=["a"])
    with pytest.raises(ReportError, match="expected"):
        load_run(path)


def test_flatten():
    cfg = {"model": {"n_experts": 16}, "routing": {"groups": {"python": [0, 1]}, "top_k": 2}, "x": 1}
    assert flatten(cfg) == {"model.n_experts": 16, "routing.groups": {"python": [0, 1]}, "routing.top_k": 2, "x": 1}
