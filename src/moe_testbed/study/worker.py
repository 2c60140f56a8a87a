"""One run of a study, in its own process: ``python -m moe_testbed.study.worker STUDY_DIR RUN_NAME``.

Why a fresh interpreter per run (and not a multiprocessing pool): a run that
segfaults, runs out of memory or is killed takes only its own process down;
the parent sees an exit status and records the run as failed, and a pool can
neither be "broken" nor leak torch state (threads, allocator, RNG) from one run
into the next. The interpreter start (~2 s for torch) is noise next to a run of
minutes. Threads are fixed through the environment before torch is imported.

The worker reads ``runs/NAME/config.yaml`` (written and validated by the
parent), calls the run function ``fn(cfg, run_dir, resume) -> final eval
scalars`` (the trainer by default; tests inject cheap fakes with ``--fn
module:function``), then writes ``results/NAME.json`` and rebuilds the table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_FN = "moe_testbed.study.worker:train_run"
SYS_PATH_ENV = "MOE_TESTBED_STUDY_SYS_PATH"
EXIT_BUSY = 3


def train_run(cfg: Any, run_dir: Path, resume: bool) -> dict:
    """The default run function: the real trainer."""
    from moe_testbed.train.trainer import run_training

    _, final = run_training(cfg, run_dir, resume=resume)
    return final


def load_fn(spec: str) -> Callable[[Any, Path, bool], dict]:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"run function {spec!r} must look like package.module:function")
    return getattr(importlib.import_module(module), name)


def run_one(study_dir: Path, name: str, fn_spec: str = DEFAULT_FN) -> int:
    """Run ``name`` of the study, record its result; returns the process exit status."""
    from moe_testbed.study.locks import FileLock, LockBusy
    from moe_testbed.study.results import make_record, read_result, rebuild_table, write_result
    from moe_testbed.study.state import RUN_LOCK, checkpoint_step, read_summary

    run_dir = study_dir / "runs" / name
    try:
        lock = FileLock(run_dir / RUN_LOCK, blocking=False).acquire()
    except LockBusy:
        print(f"run {name} is already being trained by another process", file=sys.stderr)
        return EXIT_BUSY
    try:
        record = read_result(study_dir, name) or make_record(name, "running", {})
        resume = checkpoint_step(run_dir) is not None
        t0 = time.time()
        status, reason, final, code = "complete", None, {}, 0
        try:
            cfg = _load_config(run_dir)
            fn = load_fn(fn_spec)
            final = fn(cfg, run_dir, resume) or {}
            (run_dir / "error.txt").unlink(missing_ok=True)  # left by an earlier failed attempt
        except KeyboardInterrupt:
            status, reason, code = "interrupted", "interrupted; re-run the study to resume it", 130
        except Exception as exc:  # noqa: BLE001 - any crash of a run is recorded, not raised
            status, code = "failed", 1
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reason = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
            reason += f" (traceback in {run_dir / 'error.txt'})"
            (run_dir / "error.txt").write_text(traceback.format_exc())
            traceback.print_exc()
        # Recording the result must not be cut short by a second interrupt (a second
        # Ctrl-C, the parent's SIGTERM after a Ctrl-C): hold signals until exit.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        summary = read_summary(run_dir)
        summary.setdefault("wall_s", round(time.time() - t0, 2))
        write_result(
            study_dir,
            make_record(
                name, status, record.get("params", {}), reason=reason, summary=summary, final=final,
                run_dir=record.get("run_dir"), resumed=resume,
            ),
        )  # fmt: skip
        rebuild_table(study_dir)
        return code
    finally:
        lock.release()


def _load_config(run_dir: Path) -> Any:
    # Not Config.load: the parent has validated it already, and validation imports
    # the routing registry (torch), which cheap test run functions do not need.
    import yaml

    from moe_testbed.config import Config

    return Config.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))


def _die_with_parent(parent_pid: int) -> None:
    """Get SIGTERM when the parent study process dies (Linux), so that no orphan keeps training.

    SIGTERM becomes KeyboardInterrupt: the trainer then marks its summary failed
    and the worker records the run as interrupted; its checkpoints stay for resume.
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    if parent_pid and os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise KeyboardInterrupt


def _raise_interrupt(signum: int, frame: Any) -> None:
    # One interrupt is enough; further SIGTERMs (the kernel may send the parent-death
    # signal more than once) must not interrupt the clean-up that the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_testbed.study.worker")
    parser.add_argument("study_dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--fn", default=DEFAULT_FN, help="run function, package.module:function")
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args(argv)
    # The parent's import path, as multiprocessing's spawn does, so that an
    # injected run function importable there is importable here.
    if os.environ.get(SYS_PATH_ENV):
        sys.path[:] = list(dict.fromkeys([*json.loads(os.environ[SYS_PATH_ENV]), *sys.path]))
    try:
        _die_with_parent(args.parent_pid)
    except KeyboardInterrupt:
        return 130
    return run_one(args.study_dir, args.name, args.fn)


if __name__ == "__main__":
    sys.exit(main())
