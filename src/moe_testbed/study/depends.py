"""Runs of a study that start from another of its runs: ``model.init_from: "@CONFIG"`` (upcycling).

In a spec, ``model.init_from: "@dense"`` names the configuration ``dense`` of the same study:
each seed's run starts from the same seed's ``dense`` run, whose run directory is filled in
once the study directory is known (so the run's config.yaml holds the real, absolute path; a
study whose directory has moved sees its upcycled runs as conflicts, study/state.py). The study
trains such runs after the others; a run whose source did not complete is recorded as failed,
naming the source, and never started from a partial checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from moe_testbed.study import StudyError
from moe_testbed.study.plan import PlannedRun
from moe_testbed.study.pool import Job
from moe_testbed.study.state import read_summary

REF = "@"


def resolve_sources(runs: list[PlannedRun], study_dir: Path) -> dict[str, str]:
    """Fill in every ``model.init_from=@CONFIG``; returns run name -> the name of the run it starts from."""
    by_config = {(r.config, r.seed): r for r in runs}
    configs = sorted({r.config for r in runs})
    sources = {}
    for run in runs:
        ref = run.cfg.model.init_from
        if not (isinstance(ref, str) and ref.startswith(REF)):
            continue
        source = by_config.get((ref[len(REF) :], run.seed))
        if source is None:
            raise StudyError(f"run {run.name}: model.init_from={ref} names no configuration of the study: "
                             f"choose from {', '.join(configs)}")  # fmt: skip
        if not source.cfg.model.dense or source.cfg.model.init_from:
            raise StudyError(f"run {run.name}: model.init_from={ref} must name a dense run trained from scratch "
                             f"(model.dense=true, no model.init_from); {source.name} is not")  # fmt: skip
        run.cfg.model.init_from = str((study_dir / "runs" / source.name).resolve())  # valid from any directory
        sources[run.name] = source.name
    return sources


def split_phases(queue: list[Job], sources: dict[str, str]) -> tuple[list[Job], list[Job]]:
    """(runs that start from nothing in the study, runs that start from another run)."""
    return [j for j in queue if j.run.name not in sources], [j for j in queue if j.run.name in sources]


def source_problem(job: Job, sources: dict[str, str], study_dir: Path) -> str | None:
    """Why ``job`` cannot start from its source run (it is not complete), or None."""
    name = sources[job.run.name]
    status = read_summary(study_dir / "runs" / name).get("status")
    if status == "complete":
        return None
    return (f"starts from run {name} (model.init_from), which is {status or 'not started'}, not complete: "
            "re-run the study once it completes")  # fmt: skip
