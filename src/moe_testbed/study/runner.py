"""Running a study: plan, prepare the data once, run N worker processes, collect the table, write the report.

Layout of a study directory::

    STUDY/plan.json             run order, varied keys, provenance
    STUDY/spec.yaml             a copy of the spec that was run
    STUDY/runs/NAME/            one run directory per run (config.yaml, metrics.jsonl, ...,
                                train.log: the worker's output, error.txt: why it failed)
    STUDY/results/NAME.json     one result record per run (see results.py)
    STUDY/results.parquet, results.csv
    STUDY/report/report.html    moe_testbed.analysis.report, when installed

Each run is a subprocess (worker.py says why); the parent only schedules,
watches exit statuses and draws progress, so it holds no torch state and a
crashed run never takes the study down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

from moe_testbed.study import StudyError
from moe_testbed.study.locks import FileLock, LockBusy, holder_pid
from moe_testbed.study.plan import PlannedRun, expand, parse_cli_overrides, select
from moe_testbed.study.progress import StudyProgress, current_step
from moe_testbed.study.report import report_is_current, write_study_report
from moe_testbed.study.results import make_record, read_result, rebuild_table, write_plan, write_result
from moe_testbed.study.spec import StudySpec, load_spec
from moe_testbed.study.state import RunState, checkpoint_step, classify, read_summary, reset_run_dir
from moe_testbed.study.worker import DEFAULT_FN, EXIT_BUSY, SYS_PATH_ENV

STUDY_LOCK = ".study.lock"
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


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset / container CPU sets
    except AttributeError:
        return os.cpu_count() or 1


def run_study(
    spec: str | StudySpec,
    *,
    workers: int = 1,
    out: str | Path | None = None,
    only: list[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    dry_run: bool = False,
    report: bool = True,
    run_fn: str = DEFAULT_FN,
    prepare_data: bool | None = None,
    progress: str = "auto",
    stream: TextIO | None = None,
) -> int:
    """Run (or resume) a study; returns 0 when every selected run is complete or skipped, else 1.

    ``run_fn``: ``package.module:function`` called in each worker as
    ``fn(cfg, run_dir, resume) -> final eval scalars``; it must write the run
    directory's summary.json like the trainer does. ``prepare_data``: build the
    data mixes in this process before starting workers (default: only with the
    real trainer).
    """
    stream = stream or sys.stdout

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    if workers < 1:
        raise StudyError(f"--workers {workers} must be >= 1")
    spec = spec if isinstance(spec, StudySpec) else load_spec(spec)
    runs = expand(spec, parse_cli_overrides(overrides))
    chosen = select(runs, only)
    study_dir = Path(out) if out else Path("studies") / spec.name
    varied = spec.varied_keys()
    jobs, workers, threads = _plan_jobs(runs, chosen, study_dir, varied, workers)
    cores, n_todo = usable_cores(), sum(j.state.action in ("start", "resume") for j in jobs)
    n_skip = sum(j.state.action == "skip" for j in jobs)
    selected = f", {len(chosen)} selected by --only" if only else ""
    say(
        f"study {spec.name}: {len(runs)} runs{selected} ({n_skip} skipped as invalid, {n_todo} to run); "
        f"{workers} worker{'s' if workers > 1 else ''} x {threads} thread{'s' if threads > 1 else ''} -> {study_dir}"
    )
    if workers > cores:
        say(f"warning: {workers} workers on {cores} cores: runs will compete for CPU and each will be slower")
    if dry_run:
        _print_plan(jobs, say)
        return 0

    study_dir.mkdir(parents=True, exist_ok=True)
    try:
        study_lock = FileLock(study_dir / STUDY_LOCK, blocking=False).acquire()
    except LockBusy:
        pid = holder_pid(study_dir / STUDY_LOCK)
        raise StudyError(
            f"{study_dir} is in use by another study process (pid {pid}); wait for it or stop it"
        ) from None
    try:
        if spec.source is not None:
            shutil.copyfile(spec.source, study_dir / "spec.yaml")
        write_plan(
            study_dir, [r.name for r in runs], varied, study=spec.name, spec=str(spec.source or ""),
            overrides=list(overrides), description=spec.description,
        )  # fmt: skip
        queue = _record_static(jobs, study_dir, say)
        if prepare_data if prepare_data is not None else run_fn == DEFAULT_FN:
            _prepare_data([j.run.cfg for j in queue], say)
        if queue:
            _run_jobs(queue, study_dir, workers, threads, run_fn, progress, stream)
        rows = rebuild_table(study_dir)
        return _finish(jobs, rows, study_dir, report, say)
    finally:
        study_lock.release()


def _plan_jobs(runs: list[PlannedRun], chosen: list[PlannedRun], study_dir: Path, varied: list[str],
               workers: int) -> tuple[list[Job], int, int]:  # fmt: skip
    """The chosen runs as jobs with what to do with each; (jobs, workers, threads per worker)."""
    for run in runs:
        run.cfg.run.out_dir = str(study_dir / "runs")
        run.cfg.run.progress = "log"
    jobs = []
    for run in chosen:
        run_dir = study_dir / "runs" / run.name
        params = {k: _flat(run.cfg).get(k) for k in varied}
        jobs.append(Job(run, classify(run.cfg, run.skip, run_dir), run_dir, params))
    # Threads per worker: the cores shared by the workers that will actually run, so that
    # two runs left on eight cores get four threads each. (config_diff ignores this key.)
    n_todo = sum(j.state.action in ("start", "resume") for j in jobs)
    workers = min(workers, max(n_todo, 1))
    threads = max(1, usable_cores() // workers)
    for job in jobs:
        job.run.cfg.train.threads = threads
    return jobs, workers, threads


def _record_static(jobs: list[Job], study_dir: Path, say) -> list[Job]:
    """Write records of runs that need no worker; return the jobs to run."""
    queue, done = [], 0
    for job in jobs:
        rel = f"runs/{job.run.name}"
        action, detail = job.state.action, job.state.detail
        if action == "skip":
            record = make_record(job.run.name, "skipped", job.params, reason=detail)
            old = read_result(study_dir, job.run.name) or {}
            if any(old.get(k) != record[k] for k in ("status", "reason", "params")):  # keep the report current
                write_result(study_dir, record)
            say(f"skipped   {job.run.name}: {detail}")
        elif action == "done":
            done += 1
            record = read_result(study_dir, job.run.name)
            if not record or record.get("status") != "complete":  # e.g. the study died just before writing it
                summary = read_summary(job.run_dir)
                write_result(study_dir, make_record(job.run.name, "complete", job.params, summary=summary, run_dir=rel))
        elif action in ("conflict", "busy"):
            # Never overwrite: the existing record (maybe a complete result) stays as it is.
            say(f"{action:<9} {job.run.name}: {detail}")
        else:
            queue.append(job)
    if done:
        say(f"{done} run{'s' if done > 1 else ''} already complete (not run again)")
    return queue


def _prepare_data(cfgs: list[Any], say) -> None:
    """Build each distinct data mix once, here, so that workers never race to build the same one."""
    if not cfgs:
        return
    try:
        from moe_testbed.data import ensure_mix
    except ImportError as exc:
        raise StudyError(f"cannot prepare data: moe_testbed.data is not available ({exc})") from None
    seen = set()
    for cfg in cfgs:
        key = json.dumps(cfg.to_dict()["data"], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        say(f"data      {cfg.data.dir or f'preset {cfg.data.preset}'}: checking / building")
        ensure_mix(cfg.data)


def _run_jobs(
    queue: list[Job], study_dir: Path, workers: int, threads: int, run_fn: str, mode: str, stream: TextIO
) -> None:
    remaining = sum(j.run.cfg.train.steps - (checkpoint_step(j.run_dir) or 0) for j in queue)
    progress = StudyProgress(len(queue), remaining, mode, stream)
    pending, running = deque(queue), {}
    env = _worker_env(threads)
    previous = _on_sigterm_interrupt()
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.popleft()
                _launch(job, study_dir, run_fn, env, progress)
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


def _finish(jobs: list[Job], rows: list[dict[str, Any]], study_dir: Path, report: bool, say) -> int:
    chosen = {j.run.name for j in jobs}
    counts: dict[str, int] = {}
    for row in rows:
        if row["name"] in chosen:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
    for job in jobs:  # conflict/busy runs may have no record at all
        if job.state.action in ("conflict", "busy") and job.run.name not in {r["name"] for r in rows}:
            counts[job.state.action] = counts.get(job.state.action, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    if any(r["name"] not in chosen for r in rows):  # --only: the table also holds the other runs' rows
        summary += f" of the {len(chosen)} selected runs; {len(rows)} rows in the table"
    say(f"results   {study_dir / 'results.csv'} ({summary})")
    failed = [r for r in rows if r["name"] in chosen and r["status"] not in ("complete", "skipped")]
    for row in failed:
        say(f"          {row['name']}: {row['status']}: {row['reason'] or ''}")
    code = 1 if failed or any(j.state.action in ("conflict", "busy") for j in jobs) else 0
    complete = [study_dir / r["run_dir"] for r in rows if r["status"] == "complete" and r.get("run_dir")]
    if report and complete:
        if report_is_current(study_dir):
            say(f"report    {study_dir / 'report' / 'report.html'} (up to date)")
        else:
            code = max(code, write_study_report(complete, study_dir / "report", say))
    return code


def _print_plan(jobs: list[Job], say) -> None:
    width = max((len(j.run.name) for j in jobs), default=4)
    labels = {"start": "run", "resume": "resume", "done": "complete", "skip": "skipped"}
    for job in jobs:
        action = labels.get(job.state.action, job.state.action)
        detail = f" ({job.state.detail})" if job.state.detail and job.state.action != "skip" else ""
        values = " ".join(f"{k}={v}" for k, v in job.run.values.items())
        say(f"  {job.run.name:<{width}}  {action}{detail}  {values}")
        if job.state.action == "skip":
            say(f"  {'':<{width}}    skipped: {job.state.detail}")


# ---- helpers ------------------------------------------------------------------


def _flat(cfg: Any) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, fields in cfg.to_dict().items() for k, v in fields.items()}


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
