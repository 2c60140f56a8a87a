"""Running a study's jobs in worker processes: launch, watch, collect, stop.

Each run is a subprocess (worker.py says why); this process only schedules,
watches exit statuses and draws progress, so it holds no torch state and a
crashed run never takes the study down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

from moe_testbed.study.plan import PlannedRun
from moe_testbed.study.progress import StudyProgress, current_step
from moe_testbed.study.results import make_record, read_result, rebuild_table, write_result
from moe_testbed.study.state import RunState, checkpoint_step, read_summary, reset_run_dir
from moe_testbed.study.worker import EXIT_BUSY, SYS_PATH_ENV

POLL_S = 0.5  # how often the parent looks at its workers
STOP_GRACE_S = 30.0  # after an interrupt, how long workers get to write their records


@dataclass
class Job:
    run: PlannedRun
    state: RunState
    run_dir: Path
    params: dict[str, Any]
    proc: subprocess.Popen | None = None
    log: IO | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def run_jobs(
    queue: list[Job], study_dir: Path, workers: int, threads: int, run_fn: str, mode: str, stream: TextIO
) -> None:
    remaining = sum(j.run.cfg.train.steps - (checkpoint_step(j.run_dir) or 0) for j in queue)
    progress = StudyProgress(len(queue), remaining, mode, stream)
    pending, running = deque(queue), {}
    env = _worker_env(threads)
    gpus = visible_gpus()
    previous = _on_sigterm_interrupt()
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.popleft()
                job_env = env
                if gpus:  # one GPU per worker: the least busy one
                    job.extra["gpu"] = least_busy_gpu(gpus, [j.extra.get("gpu") for j in running.values()])
                    job_env = {**env, "CUDA_VISIBLE_DEVICES": job.extra["gpu"]}
                _launch(job, study_dir, run_fn, job_env, progress)
                running[job.run.name] = job
            time.sleep(POLL_S)
            for name, job in list(running.items()):
                code = job.proc.poll()
                if code is None:
                    progress.update(name, current_step(job.run_dir))
                    continue
                del running[name]
                progress.finished(name, _collect(job, code, study_dir))
    except KeyboardInterrupt as exc:
        progress.note(f"interrupted: stopping {len(running)} worker(s); re-run the same command to resume")
        # A Ctrl-C on a terminal has reached the workers too (same process group): give them
        # a moment first; a SIGTERM sent to this process only has not, so stop them at once.
        _stop(list(running.values()), study_dir, grace=0.0 if isinstance(exc, _Terminated) else 2.0)
        rebuild_table(study_dir)
        raise
    finally:
        progress.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _launch(job: Job, study_dir: Path, run_fn: str, env: dict[str, str], progress: StudyProgress) -> None:
    name, run_dir = job.run.name, job.run_dir
    if job.state.action == "start":
        reset_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    job.run.cfg.save(run_dir / "config.yaml")
    resumed = job.state.action == "resume"
    write_result(study_dir, make_record(name, "running", job.params, run_dir=f"runs/{name}", resumed=resumed))
    rebuild_table(study_dir)  # the table shows what is running, even if this process is killed
    job.log = open(run_dir / "train.log", "a")  # noqa: SIM115 - closed in _collect
    job.log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} study worker: {job.state.action} {job.state.detail}\n")
    job.log.flush()
    cmd = [sys.executable, "-m", "moe_testbed.study.worker", str(study_dir), name, "--fn", run_fn]
    cmd += ["--parent-pid", str(os.getpid())]
    job.proc = subprocess.Popen(cmd, stdout=job.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    job.extra["t0"] = time.time()
    start = checkpoint_step(run_dir) or 0
    progress.started(name, job.state.detail, start, job.run.cfg.train.steps)


def _collect(job: Job, code: int, study_dir: Path) -> dict[str, Any]:
    """The finished worker's record; written here when the worker died before it could."""
    if job.log is not None:
        job.log.close()
    record = read_result(study_dir, job.run.name)
    if code == EXIT_BUSY:
        reason = "another process is training this run (a worker of an earlier, killed study?)"
        record = make_record(job.run.name, "busy", job.params, reason=reason, run_dir=f"runs/{job.run.name}")
    elif record is None or record.get("status") == "running":
        reason = _exit_text(code)
        summary = read_summary(job.run_dir)
        summary.setdefault("wall_s", round(time.time() - job.extra.get("t0", time.time()), 2))
        status = "interrupted" if code in (-signal.SIGINT, -signal.SIGTERM, 130) else "failed"
        record = make_record(
            job.run.name, status, job.params, reason=reason, summary=summary, run_dir=f"runs/{job.run.name}",
            resumed=job.state.action == "resume",
        )  # fmt: skip
        if status == "failed":
            (job.run_dir / "error.txt").write_text(f"{reason}\n\nend of train.log:\n{_tail(job.run_dir / 'train.log')}")
    else:
        return record
    write_result(study_dir, record)
    rebuild_table(study_dir)
    return record


def _stop(jobs: list[Job], study_dir: Path, grace: float) -> None:
    """Let workers record themselves as interrupted; kill what does not stop in time."""
    deadline = time.time() + grace
    while time.time() < deadline and any(j.proc.poll() is None for j in jobs):
        time.sleep(0.1)
    for job in jobs:
        if job.proc.poll() is None:
            job.proc.terminate()
    deadline = time.time() + STOP_GRACE_S
    for job in jobs:
        try:
            job.proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            job.proc.kill()
            job.proc.wait()
        _collect(job, job.proc.returncode, study_dir)


def visible_gpus() -> list[str]:
    """The CUDA devices workers may use (``CUDA_VISIBLE_DEVICES``'s entries, else every device); [] on CPU."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    if "torch" not in sys.modules and not Path("/proc/driver/nvidia/gpus").is_dir():
        return []  # no NVIDIA driver: do not pay for importing torch in the study process
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def least_busy_gpu(gpus: list[str], busy: list[str | None]) -> str:
    """The device with the fewest running workers (the first of them on a tie)."""
    return min(gpus, key=lambda g: (busy.count(g), gpus.index(g)))


def _worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # Thread pools are sized when torch loads; the environment is the only way in before that.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"  # train.log shows progress as it happens
    env[SYS_PATH_ENV] = json.dumps([os.path.abspath(p) if p else os.getcwd() for p in sys.path])
    return env


def _on_sigterm_interrupt():
    """Treat SIGTERM like Ctrl-C while workers run, so that they are stopped and recorded too."""
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread: leave signals alone
        return None


class _Terminated(KeyboardInterrupt):
    """SIGTERM to the study process (its workers have not been signalled)."""


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise _Terminated


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory? see dmesg)" if -code == signal.SIGKILL else ""
        return f"worker killed by {name}{hint} before recording a result"
    return f"worker exited with status {code} before recording a result"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
