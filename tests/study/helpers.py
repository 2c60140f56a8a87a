"""Shared helpers of the study tests."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from moe_testbed.study.locks import is_locked
from moe_testbed.study.runner import run_study

REPO = Path(__file__).resolve().parents[2]
# A small, valid base config: validation is all the fakes need of it. Dense, so that
# validating it does not load the router registry (torch): study processes started by
# the tests then start in a fraction of a second.
BASE = {
    "model": {"n_experts": 8, "d_model": 32, "n_heads": 2, "n_layers": 1, "dense": True},
    "train": {"steps": 4},
}


def write_spec(path: Path, **study) -> Path:
    path.write_text(yaml.safe_dump({"name": "t", "base": BASE, **study}, sort_keys=False))
    return path


def run(spec: Path, out: Path, fn: str, **kwargs) -> tuple[int, str]:
    """run_study with a fake run function; returns (exit status, printed text)."""
    stream = io.StringIO()
    kwargs.setdefault("workers", 2)
    kwargs.setdefault("report", False)
    kwargs.setdefault("progress", "log")
    code = run_study(str(spec), out=out, run_fn=f"tests.study.fakes:{fn}", stream=stream, **kwargs)
    return code, stream.getvalue()


def table(study_dir: Path) -> dict[str, dict]:
    rows = pq.read_table(study_dir / "results.parquet").to_pylist()
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names)), f"duplicated rows: {names}"
    return {r["name"]: r for r in rows}


def attempts(study_dir: Path, name: str) -> list[str]:
    path = study_dir / "runs" / name / "attempts.log"
    return path.read_text().split() if path.exists() else []


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def runs_unlocked(study_dir: Path, names: list[str]) -> bool:
    return not any(is_locked(study_dir / "runs" / n / ".run.lock") for n in names)
