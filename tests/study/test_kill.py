"""Killing a study for real (SIGKILL to the study process, with or without its workers), then re-running it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from .helpers import REPO, attempts, run, runs_unlocked, table, wait_for, write_spec

NAMES = ["seed0", "seed1"]


def _start_study(spec: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moe_testbed.study.cli", str(spec), "--out", str(out), "--workers", "2"]
    cmd += ["--no-report", "--progress", "log", "--run-fn", "tests.study.fakes:run_block_once"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    started = [out / "runs" / n / "started" for n in NAMES]
    wait_for(lambda: all(p.exists() for p in started) or proc.poll() is not None, 60, "both runs to start")
    assert proc.poll() is None, proc.stdout.read().decode()
    return proc


def _rerun_completes(spec: Path, out: Path) -> None:
    code, text = run(spec, out, "run_block_once")
    assert code == 0, text
    rows = table(out)
    assert list(rows) == NAMES and all(r["status"] == "complete" for r in rows.values())
    for name in NAMES:
        assert attempts(out, name) == ["fresh", "resume"]
        assert json.loads((out / "results" / f"{name}.json").read_text())["resumed"] is True


def test_sigkill_to_the_whole_study_then_rerun_resumes(tmp_path: Path):
    spec = write_spec(tmp_path / "s.yaml", grid={"train.seed": [0, 1]})
    out = tmp_path / "study"
    proc = _start_study(spec, out)
    os.killpg(proc.pid, signal.SIGKILL)  # parent and workers: like a lost machine
    proc.wait()
    wait_for(lambda: runs_unlocked(out, NAMES), 10, "the killed workers to go")
    # Nothing recorded a result; the records still say "running" until the re-run.
    assert {r["status"] for r in table(out).values()} == {"running"}
    _rerun_completes(spec, out)


def test_sigkill_to_the_study_process_stops_its_workers(tmp_path: Path):
    spec = write_spec(tmp_path / "s.yaml", grid={"train.seed": [0, 1]})
    out = tmp_path / "study"
    proc = _start_study(spec, out)
    os.kill(proc.pid, signal.SIGKILL)  # the parent only: its workers must not live on as orphans
    proc.wait()
    wait_for(lambda: runs_unlocked(out, NAMES), 20, "the orphaned workers to stop")
    rows = table(out)
    assert {r["status"] for r in rows.values()} == {"interrupted"}, rows
    _rerun_completes(spec, out)


def test_sigterm_to_the_study_records_interrupted_runs(tmp_path: Path):
    spec = write_spec(tmp_path / "s.yaml", grid={"train.seed": [0, 1]})
    out = tmp_path / "study"
    proc = _start_study(spec, out)
    os.kill(proc.pid, signal.SIGTERM)
    text = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, text
    assert "interrupted: stopping 2 worker(s)" in text
    assert {r["status"] for r in table(out).values()} == {"interrupted"}
    _rerun_completes(spec, out)
