"""The runner with cheap fake run functions: parallel workers, skips, failures, re-runs, conflicts, locks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moe_testbed.study import StudyError
from moe_testbed.study.locks import FileLock
from moe_testbed.study.runner import usable_cores

from .helpers import attempts, run, table, write_spec

GRID = {"balance.scope": ["sequence", "microbatch", "global"]}


def test_study_runs_everything_once_and_a_rerun_skips_finished_runs(tmp_path: Path):
    spec = write_spec(tmp_path / "s.yaml", grid=GRID, runs=[{"name": "too-many", "routing.top_k": 99}])
    out = tmp_path / "study"
    code, text = run(spec, out, "run_ok")
    assert code == 0, text
    rows = table(out)
    assert list(rows) == ["sequence", "microbatch", "global", "too-many"]
    assert [rows[n]["status"] for n in rows] == ["complete", "complete", "complete", "skipped"]
    assert "exceeds model.n_experts=8" in rows["too-many"]["reason"]
    assert "skipped   too-many: routing.top_k=99 exceeds" in text
    g = rows["global"]
    assert g["balance.scope"] == "global" and g["routing.top_k"] == 2
    assert g["val/loss"] == pytest.approx(2.8) and g["val/loss/english"] == pytest.approx(2.9)
    assert g["val/purity/mean"] == pytest.approx(0.4) and g["tokens_per_s"] == 1234.5
    assert g["run_dir"] == "runs/global" and g["steps"] == 4
    # each worker got cores // workers threads, in the environment and in the config
    threads = max(1, usable_cores() // 2)
    assert (out / "runs/global/threads.txt").read_text() == f"{threads} {threads}"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["runs"] == list(rows) and plan["varied"] == ["balance.scope", "routing.top_k"]
    assert (out / "spec.yaml").read_text() == spec.read_text()
    assert "[3/3]" in text and "results.csv" in (out / "results.csv").name

    code, text = run(spec, out, "run_ok")
    assert code == 0 and "3 runs already complete" in text
    assert all(attempts(out, n) == ["fresh"] for n in GRID["balance.scope"])
    assert len(table(out)) == 4


def test_a_crashed_run_is_recorded_and_does_not_stop_the_others(tmp_path: Path):
    runs = [{"name": n, "train.seed": i} for i, n in enumerate(["ok-a", "crash-b", "oom-c", "ok-d"])]
    spec = write_spec(tmp_path / "s.yaml", runs=runs)
    out = tmp_path / "study"
    code, text = run(spec, out, "run_mixed")
    assert code == 1
    rows = table(out)
    assert {n: r["status"] for n, r in rows.items()} == {
        "ok-a": "complete", "crash-b": "failed", "oom-c": "failed", "ok-d": "complete",
    }  # fmt: skip
    assert rows["crash-b"]["reason"].startswith("RuntimeError: boom: a deliberate crash (traceback in")
    error = (out / "runs/crash-b/error.txt").read_text()
    assert "Traceback" in error and "boom" in error
    assert "killed by SIGKILL" in rows["oom-c"]["reason"]
    assert "killed by SIGKILL" in (out / "runs/oom-c/error.txt").read_text()
    assert "crash-b: failed: RuntimeError" in text

    code, text = run(spec, out, "run_mixed")  # failed runs are retried, complete ones are not
    assert code == 1
    assert "start  crash-b" in text and "start  oom-c" in text and "start  ok-a" not in text
    assert attempts(out, "ok-a") == ["fresh"]
    assert len(table(out)) == 4


def test_a_killed_worker_is_resumed_from_its_checkpoint(tmp_path: Path):
    spec = write_spec(tmp_path / "s.yaml", grid={"train.seed": [0, 1]})
    out = tmp_path / "study"
    code, _ = run(spec, out, "run_die_once")
    assert code == 1
    assert {r["status"] for r in table(out).values()} == {"failed"}
    code, text = run(spec, out, "run_die_once")
    assert code == 0, text
    rows = table(out)
    assert list(rows) == ["seed0", "seed1"]
    assert all(r["status"] == "complete" for r in rows.values())
    assert all(attempts(out, n) == ["fresh", "resume"] for n in rows)
    assert "start  seed0 (from step 1)" in text
    record = json.loads((out / "results/seed0.json").read_text())
    assert record["resumed"] is True and record["reason"] is None


def test_a_changed_config_is_a_conflict_and_nothing_is_overwritten(tmp_path: Path):
    spec = write_spec(tmp_path / "s.yaml", grid={"train.seed": [0]})
    out = tmp_path / "study"
    assert run(spec, out, "run_ok")[0] == 0
    code, text = run(spec, out, "run_ok", overrides=["train.steps=5"])
    assert code == 1
    assert "conflict  seed0" in text and "train.steps: 4 -> 5" in text
    assert table(out)["seed0"]["status"] == "complete" and table(out)["seed0"]["steps"] == 4
    assert attempts(out, "seed0") == ["fresh"]
    # a different --workers (thread count) is not a change of the experiment
    assert run(spec, out, "run_ok", workers=1)[0] == 0


def test_only_and_dry_run(tmp_path: Path):
    spec = write_spec(tmp_path / "s.yaml", grid=GRID, runs=[{"name": "bad", "routing.top_k": 99}])
    out = tmp_path / "study"
    code, text = run(spec, out, "run_ok", dry_run=True)
    assert code == 0 and not out.exists()
    assert "sequence    run  balance.scope=sequence" in text
    assert "skipped: routing.top_k=99 exceeds" in text
    code, text = run(spec, out, "run_ok", only=["glob"], progress="bar")  # the rich display, drawn into a string
    assert code == 0 and "[1/1] global  complete" in text
    assert list(table(out)) == ["global"]
    code, text = run(spec, out, "run_ok", dry_run=True)
    assert "global      complete" in text and "sequence    run" in text


def test_a_study_directory_is_used_by_one_process_at_a_time(tmp_path: Path):
    spec = write_spec(tmp_path / "s.yaml", grid=GRID)
    out = tmp_path / "study"
    with FileLock(out / ".study.lock"), pytest.raises(StudyError, match="in use by another study process"):
        run(spec, out, "run_ok")


def test_report_is_skipped_when_the_analysis_module_is_missing(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "moe_testbed.analysis.report", None)
    spec = write_spec(tmp_path / "s.yaml", grid={"train.seed": [0]})
    code, text = run(spec, tmp_path / "study", "run_ok", report=True)
    assert code == 0 and "report    skipped: moe_testbed.analysis.report is not available" in text


def test_cli(tmp_path: Path, capsys, monkeypatch):
    from moe_testbed.study.cli import main

    spec = write_spec(tmp_path / "s.yaml", grid={"train.seed": [0, 1]})
    out = tmp_path / "study"
    # overrides may come before or after the options
    argv = [str(spec), "--out", str(out), "train.steps=3", "--workers", "2", "--no-report", "--progress", "log"]
    assert main([*argv, "--run-fn", "tests.study.fakes:run_ok", "--only", "seed1"]) == 0
    assert list(table(out)) == ["seed1"] and table(out)["seed1"]["steps"] == 3
    assert main(["no-such-preset"]) == 2
    assert "error: unknown study 'no-such-preset'" in capsys.readouterr().err
    assert main([str(spec), "--workers", "0"]) == 2
    monkeypatch.chdir(tmp_path)  # presets resolve from the package's repository too
    assert main(["quick", "--dry-run"]) == 0
    assert "study quick: 12 runs" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "studies")


def test_only_says_its_counts_are_of_the_selected_runs(tmp_path: Path):
    spec = write_spec(tmp_path / "s.yaml", grid={"train.seed": [0, 1, 2]})
    out = tmp_path / "study"
    code, text = run(spec, out, "run_ok")
    assert code == 0 and "(3 complete)" in text
    code, text = run(spec, out, "run_ok", only=["seed1"])
    assert code == 0 and "(1 complete of the 1 selected runs; 3 rows in the table)" in text


def test_seeds_resume_mid_study_and_give_verdicts(tmp_path: Path):
    grid = {"balance.scope": ["microbatch", "global"]}
    claims = ["lbl-global > lbl-microbatch on purity", "lbl-global ~ lbl-microbatch on loss within 0.01"]
    spec = write_spec(tmp_path / "s.yaml", grid=grid, name_format="lbl-{balance.scope}", seeds=3, claims=claims)
    out = tmp_path / "study"
    code, text = run(spec, out, "run_ok", only=["-s0"])  # the study is stopped after its first seed
    assert code == 0, text
    assert sorted(table(out)) == ["lbl-global-s0", "lbl-microbatch-s0"]
    code, text = run(spec, out, "run_ok")  # and resumed: the done seeds are not run again
    assert code == 0 and "2 runs already complete" in text
    assert attempts(out, "lbl-global-s0") == ["fresh"] and attempts(out, "lbl-global-s2") == ["fresh"]
    rows = table(out)
    assert {(r["config"], r["seed"]) for r in rows.values()} == {(c, s) for c in ("lbl-microbatch", "lbl-global")
                                                                 for s in range(3)}  # fmt: skip
    with open(out / "summary.csv") as fh:
        summary = {r["config"]: r for r in __import__("csv").DictReader(fh)}
    assert summary["lbl-global"]["seeds"] == "3"
    assert float(summary["lbl-global"]["val/purity/mean mean"]) == pytest.approx(0.4)
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert [v["verdict"] for v in verdicts] == ["holds", "reversed"]  # the fakes' loss differs by 0.1 > 0.01
    assert "lbl-global > lbl-microbatch on purity" in text and "holds" in text  # printed at the end


def test_a_claim_must_name_configurations_of_the_study(tmp_path: Path):
    spec = write_spec(tmp_path / "s.yaml", grid=GRID, claims=["global > nowhere on purity"])
    with pytest.raises(StudyError, match="names 'nowhere', which is not a configuration"):
        run(spec, tmp_path / "study", "run_ok")


def test_each_worker_gets_its_own_gpu(tmp_path: Path, monkeypatch):
    from moe_testbed.study.pool import least_busy_gpu, visible_gpus

    assert least_busy_gpu(["3", "5"], []) == "3"
    assert least_busy_gpu(["3", "5"], ["3"]) == "5"
    assert least_busy_gpu(["3", "5"], ["3", "5", "5"]) == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpus() == ["3", "5"]
    spec = write_spec(tmp_path / "s.yaml", grid=GRID)
    code, text = run(spec, tmp_path / "study", "run_ok")
    assert code == 0, text
    # two workers on two GPUs: the first two runs start together, one on each
    seen = [(tmp_path / f"study/runs/{n}/gpu.txt").read_text() for n in GRID["balance.scope"]]
    assert seen[:2] == ["3", "5"] and seen[2] in ("3", "5")
