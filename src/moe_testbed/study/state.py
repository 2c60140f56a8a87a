"""What a re-run should do with each run, judged from its run directory.

The trainer's files are the source of truth (not our own bookkeeping), so that
a study killed at any moment (parent, worker or machine) resumes correctly:

- ``summary.json`` says ``complete``              -> done, not run again;
- a checkpoint exists                              -> resume from it;
- anything else (nothing, or a run that died
  before its first checkpoint)                     -> start afresh in an emptied directory
  (its metrics.jsonl would otherwise get a second copy of the first steps);
- a complete or checkpointed run whose config.yaml
  differs from the spec's                          -> conflict: never overwritten, the user decides;
- a worker still holds the run's lock              -> busy (an orphan of a killed study is still going).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moe_testbed.config import Config
from moe_testbed.errors import ConfigError
from moe_testbed.study.locks import holder_pid, is_locked

RUN_LOCK = ".run.lock"
# Keys that may differ between invocations without changing the experiment:
# names and paths, and the thread count, which follows --workers.
IGNORED_PREFIXES = ("run.", "train.threads")


@dataclass
class RunState:
    action: str  # skip | done | conflict | busy | resume | start
    detail: str = ""  # the skip reason, the config difference, "from step 100", ...


def read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint (``step_N.tmp`` dirs are unfinished writes)."""
    steps = []
    for path in (run_dir / "checkpoints").glob("step_*"):
        if path.is_dir() and not path.name.endswith(".tmp"):
            try:
                steps.append(int(path.name.removeprefix("step_")))
            except ValueError:
                continue
    return max(steps) if steps else None


def classify(cfg: Config, skip: str | None, run_dir: Path) -> RunState:
    if skip:
        return RunState("skip", skip)
    if is_locked(run_dir / RUN_LOCK):
        return RunState("busy", f"a worker (pid {holder_pid(run_dir / RUN_LOCK)}) is still running it")
    complete = read_summary(run_dir).get("status") == "complete"
    step = checkpoint_step(run_dir)
    if complete or step is not None:
        diff = config_diff(run_dir, cfg)
        if diff:
            return RunState(
                "conflict",
                f"{run_dir} was trained with a different config ({'; '.join(diff[:3])}); "
                "remove it or pass another --out",
            )
    if complete:
        return RunState("done")
    if step is not None:
        return RunState("resume", f"from step {step}")
    return RunState("start")


def config_diff(run_dir: Path, cfg: Config) -> list[str]:
    """``key: old -> new`` for every experiment key on which ``run_dir/config.yaml`` and ``cfg`` differ."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    try:
        old = Config.from_dict(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ConfigError, OSError) as exc:
        return [f"its config.yaml cannot be read: {exc}"]
    a, b = _flat(old), _flat(cfg)
    for flat in (a, b):  # the run an upcycled run starts from: one directory, however its path was spelled
        if flat.get("model.init_from"):
            flat["model.init_from"] = str(Path(flat["model.init_from"]).expanduser().resolve())
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in b if a.get(k) != b.get(k)]


def reset_run_dir(run_dir: Path) -> None:
    """Empty a run directory that holds no checkpoint before starting it afresh.

    Only run directories without a complete summary or a checkpoint get here,
    so nothing that took more than a few steps to compute is removed.
    """
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            if child.name == RUN_LOCK:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def _flat(cfg: Config) -> dict[str, Any]:
    return {
        f"{s}.{k}": v
        for s, fields in cfg.to_dict().items()
        for k, v in fields.items()
        if not f"{s}.{k}".startswith(IGNORED_PREFIXES)
    }
