"""Running a study: plan, prepare the data once, run N worker processes, collect the table, write the report.

Layout of a study directory::

    STUDY/plan.json             run order, varied keys, provenance
    STUDY/spec.yaml             a copy of the spec that was run
    STUDY/runs/NAME/            one run directory per run (config.yaml, metrics.jsonl, ...,
                                train.log: the worker's output, error.txt: why it failed)
    STUDY/results/NAME.json     one result record per run (see results.py)
    STUDY/results.parquet, results.csv   one row per run
    STUDY/summary.csv           one row per configuration: mean, std, 95% interval over seeds
    STUDY/verdicts.json, .csv   the spec's claims and their verdicts (claims.py)
    STUDY/report/report.html    moe_testbed.analysis.report, when installed

Each run is a subprocess (pool.py, worker.py); this process plans, records,
and compares the results with the preset's reference (reference.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, TextIO

from moe_testbed.study import StudyError
from moe_testbed.study.depends import resolve_sources, source_problem, split_phases
from moe_testbed.study.locks import FileLock, LockBusy, holder_pid
from moe_testbed.study.plan import PlannedRun, expand, parse_cli_overrides, select
from moe_testbed.study.pool import Job, run_jobs
from moe_testbed.study.reference import compare, reference_path, write_reference
from moe_testbed.study.report import report_is_current, write_study_report
from moe_testbed.study.results import make_record, read_result, rebuild_table, write_plan, write_result
from moe_testbed.study.spec import StudySpec, load_spec
from moe_testbed.study.state import classify, read_summary
from moe_testbed.study.summary import SUMMARY_FILE, VERDICTS_FILE, read_verdicts, verdict_lines
from moe_testbed.study.worker import DEFAULT_FN

STUDY_LOCK = ".study.lock"


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
    seeds: list[int] | None = None,
    save_reference: bool = False,
) -> int:
    """Run (or resume) a study; returns 0 when every selected run is complete or skipped, else 1.

    ``run_fn``: ``package.module:function`` called in each worker as
    ``fn(cfg, run_dir, resume) -> final eval scalars``; it must write the run
    directory's summary.json like the trainer does. ``prepare_data``: build the
    data mixes in this process before starting workers (default: only with the
    real trainer). ``seeds``: run every configuration with these seeds (default: the spec's).
    ``save_reference``: write the results as the preset's reference (study/reference.py); otherwise
    they are compared with it when it exists.
    """
    stream = stream or sys.stdout

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    if workers < 1:
        raise StudyError(f"--workers {workers} must be >= 1")
    spec = spec if isinstance(spec, StudySpec) else load_spec(spec)
    runs = expand(spec, parse_cli_overrides(overrides), seeds)
    chosen = select(runs, only)
    study_dir = Path(out) if out else Path("studies") / spec.name
    seed_key = ["train.seed"] if seeds is not None and "train.seed" not in spec.varied_keys() else []
    varied = spec.varied_keys() + seed_key
    sources = resolve_sources(runs, study_dir)  # model.init_from=@CONFIG: that run's directory
    jobs, workers, threads = _plan_jobs(runs, chosen, study_dir, varied, workers)
    _announce(spec.name, runs, chosen if only else None, jobs, workers, threads, study_dir, say)
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
            overrides=list(overrides), description=spec.description, configs={r.name: r.config for r in runs},
            seeds=[r.seed for r in runs], claims=spec.claims, moe_configs=_moe_configs(runs),
        )  # fmt: skip
        queue = _record_static(jobs, study_dir, say)
        if prepare_data if prepare_data is not None else run_fn == DEFAULT_FN:
            _prepare_data([j.run.cfg for j in queue], say)
        first, later = split_phases(queue, sources)
        if first:
            run_jobs(first, study_dir, workers, threads, run_fn, progress, stream)
        ready = _sources_ready(later, sources, study_dir, say)  # they start from a run of this study
        if ready:
            run_jobs(ready, study_dir, workers, threads, run_fn, progress, stream)
        rows = rebuild_table(study_dir)
        code = _finish(jobs, rows, study_dir, report, say)
        _reference(spec, study_dir, rows, save_reference, say)
        return code
    finally:
        study_lock.release()


def _announce(name: str, runs: list[PlannedRun], chosen: list[PlannedRun] | None, jobs: list[Job], workers: int,
              threads: int, study_dir: Path, say) -> None:  # fmt: skip
    cores, n_todo = usable_cores(), sum(j.state.action in ("start", "resume") for j in jobs)
    n_skip = sum(j.state.action == "skip" for j in jobs)
    selected = f", {len(chosen)} selected by --only" if chosen is not None else ""
    say(
        f"study {name}: {len(runs)} runs{selected} ({n_skip} skipped as invalid, {n_todo} to run); "
        f"{workers} worker{'s' if workers > 1 else ''} x {threads} thread{'s' if threads > 1 else ''} -> {study_dir}"
    )
    if workers > cores:
        say(f"warning: {workers} workers on {cores} cores: runs will compete for CPU and each will be slower")


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


def _reference(spec: StudySpec, study_dir: Path, rows: list[dict[str, Any]], save: bool, say) -> None:
    path = reference_path(spec.source, spec.name)
    if save:
        if path is None:
            raise StudyError("--write-reference needs a spec file: the reference is written beside it")
        say(f"reference {write_reference(study_dir, rows, path, spec.name)} written")
    elif path is not None and path.is_file():
        for line in compare(study_dir, rows, path):
            say(line)


def _moe_configs(runs: list[PlannedRun]) -> list[str]:
    """The configurations a correlation claim spans by default: every MoE run but the reference router."""
    moe = [r.config for r in runs if not r.cfg.model.dense and r.cfg.routing.router != "reference" and not r.skip]
    return list(dict.fromkeys(moe))


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


def _sources_ready(jobs: list[Job], sources: dict[str, str], study_dir: Path, say) -> list[Job]:
    """The jobs whose source run is complete; the others are recorded as failed, naming it."""
    ready = []
    for job in jobs:
        problem = source_problem(job, sources, study_dir)
        if problem is None:
            ready.append(job)
            continue
        write_result(study_dir, make_record(job.run.name, "failed", job.params, reason=problem))
        say(f"failed    {job.run.name}: {problem}")
    return ready


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
    say(f"results   {study_dir / 'results.csv'} ({summary}); per configuration: {study_dir / SUMMARY_FILE}")
    verdicts = read_verdicts(study_dir)
    if verdicts:
        say(f"verdicts  {study_dir / VERDICTS_FILE} (95% intervals over seeds; docs/studies.md#claims-and-verdicts)")
        for line in verdict_lines(verdicts):
            say(f"          {line}")
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
