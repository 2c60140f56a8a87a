"""A run directory's files are the truth: what a start, a resume or a fork may do to an existing one.

``config.yaml`` always describes exactly what was run. Starting into a directory
that already holds a run, or resuming it, compares the requested config with
the run's own:

- keys that change nothing already trained (``RESUMABLE``: extending
  ``train.steps``, logging, evaluation and checkpoint frequency, threads,
  progress, TensorBoard, the expert-parallel layout and the collective timeout:
  a checkpoint holds the unsharded model) are applied, recorded in ``config_history.jsonl`` and
  written into ``config.yaml`` (atomically);
- any other difference is refused with one line naming the keys and the two
  ways forward: a new ``--out``, or ``--fork NEW_DIR`` (a new run directory that
  starts from the run's latest checkpoint under the new config, its history
  naming where it came from).

A resume that finds no checkpoint (the run died before its first one) starts
over, after clearing what the dead attempt wrote, and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from moe_testbed.config import Config
from moe_testbed.errors import ConfigError
from moe_testbed.io import atomic_write_text
from moe_testbed.train.checkpoint import latest_checkpoint

RESUMABLE = (
    "train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.threads",
    "eval.every", "eval.at_end", "eval.trace_tokens", "run.progress", "run.tensorboard", "run.out_dir", "run.name",
    "parallel.expert_parallel", "parallel.timeout_s",
)  # fmt: skip
HISTORY = "config_history.jsonl"
ATTEMPT_FILES = ("metrics.jsonl", "summary.json", "routing", "tb", HISTORY)


def flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, fields in cfg.to_dict().items() for k, v in fields.items()}


def config_changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    a, b = flat(old), flat(new)
    return {k: (a.get(k), b.get(k)) for k in b if a.get(k) != b.get(k)}


def existing_config(run_dir: Path) -> Config | None:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        return Config.from_dict(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(
            f"{path} cannot be read ({exc}): it is not a run directory this version can continue"
        ) from None


def refusal(run_dir: Path, changes: dict[str, tuple[Any, Any]]) -> ConfigError:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:4])
    more = f" and {len(changes) - 4} more" if len(changes) > 4 else ""
    return ConfigError(
        f"{run_dir} is a run with a different config ({listed}{more}): pass a new --out to start another run, "
        f"or --resume {run_dir} --fork NEW_DIR to continue it from its latest checkpoint under the new config"
    )


def prepare(cfg: Config, run_dir: Path, resume: bool | None, fork_from: Path | None = None) -> bool:
    """Make ``run_dir`` describe ``cfg``; True when training resumes from a checkpoint there.

    ``resume``: True (``--resume``), or None (a start: resume only a run with the same config).
    ``fork_from``: the run whose latest checkpoint a fork starts from.
    """
    run_dir = Path(run_dir)
    if fork_from is not None:
        return _fork(cfg, Path(fork_from), run_dir)
    old = existing_config(run_dir)
    if old is None:
        if resume:
            raise ConfigError(f"--resume {run_dir}: no config.yaml there; pass a run directory written by train")
        _start(cfg, run_dir)
        return False
    changes = config_changes(old, cfg)
    blocking = {k: v for k, v in changes.items() if k not in RESUMABLE}
    if blocking:
        raise refusal(run_dir, blocking)
    if latest_checkpoint(run_dir) is None:
        if resume:
            print(f"{run_dir} has no checkpoint to resume from: starting it afresh "
                  "(the metrics and routing tables of the attempt before were cleared)")  # fmt: skip
        _start(cfg, run_dir)
        return False
    if changes:
        record(run_dir, changes, "resume")
    cfg.save(run_dir / "config.yaml")
    return True


def _start(cfg: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ATTEMPT_FILES:  # what a dead attempt without a checkpoint left behind
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    cfg.save(run_dir / "config.yaml")


def _fork(cfg: Config, source: Path, target: Path) -> bool:
    ckpt = latest_checkpoint(source)
    if ckpt is None:
        raise ConfigError(f"--fork: {source} has no checkpoint to start from")
    if existing_config(target) is not None:
        raise ConfigError(f"--fork {target}: that directory already holds a run; choose a new one")
    old = existing_config(source)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ckpt, target / "checkpoints" / ckpt.name)
    for name in ("metrics.jsonl", "routing"):
        src = source / name
        if src.is_dir():
            shutil.copytree(src, target / name)
        elif src.is_file():
            shutil.copyfile(src, target / name)
    cfg.save(target / "config.yaml")
    record(target, config_changes(old, cfg) if old else {}, f"fork of {source} at {ckpt.name}")
    return True


def record(run_dir: Path, changes: dict[str, tuple[Any, Any]], how: str) -> None:
    """Append one line to the run's config history (and keep the rest of the file as it was)."""
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "how": how,
            "changes": {k: [a, b] for k, (a, b) in changes.items()}}  # fmt: skip
    path = Path(run_dir) / HISTORY
    before = path.read_text() if path.is_file() else ""
    atomic_write_text(path, before + json.dumps(line, default=str) + "\n")


def summary_status(summary: dict[str, Any]) -> str:
    """The run's status as ``summary.json`` has it, except ``killed`` for a run that says ``running`` but is not.

    A process killed without a word (SIGKILL, the out-of-memory killer, torchrun tearing
    the ranks down after rank 0 died) cannot write ``failed``; the trainer records its host
    and pid while it runs, so on that host a gone pid means the run is not running. On
    another host the summary's word stands (its ``updated`` time says how stale it is).
    """
    status = str(summary.get("status", "unknown"))
    if status != "running" or summary.get("host") != socket.gethostname() or not isinstance(summary.get("pid"), int):
        return status
    try:
        os.kill(summary["pid"], 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return "killed"
    except PermissionError:  # it exists, under another user
        return status
    return status
