"""Cheap stand-ins for the trainer, injected into study workers with ``run_fn="tests.study.fakes:NAME"``.

Each follows the trainer's contract: ``fn(cfg, run_dir, resume) -> final eval
scalars``, writing ``summary.json`` with status complete. ``attempts.log`` in
the run directory gets one line per call ("fresh" or "resume"), so tests can
tell how often, and how, a run was started.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

DOMAINS = ("python", "english")


def _final(cfg) -> dict:
    seed = cfg.train.seed
    scope_bonus = {"sequence": 0.0, "microbatch": 0.1, "global": 0.2}.get(cfg.balance.scope, 0.0)
    final = {"kind": "eval", "step": cfg.train.steps, "val/loss": 3.0 + 0.01 * seed - scope_bonus}
    for i, domain in enumerate(DOMAINS):
        final[f"val/loss/{domain}"] = final["val/loss"] + 0.1 * i
    final.update({"val/util/mean": 0.9, "val/purity/mean": 0.2 + scope_bonus, "val/nmi/mean": 0.1})
    final.update({"val/specialization/mean": scope_bonus, "val/drop_rate/mean": 0.0})
    return final


def _attempt(run_dir: Path, resume: bool) -> None:
    with open(run_dir / "attempts.log", "a") as fh:
        fh.write(("resume" if resume else "fresh") + "\n")


def _checkpoint(run_dir: Path, step: int = 1) -> None:
    (run_dir / "checkpoints" / f"step_{step:06d}").mkdir(parents=True, exist_ok=True)


def _complete(cfg, run_dir: Path) -> dict:
    final = _final(cfg)
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": "train", "step": cfg.train.steps, "loss": final["val/loss"]}) + "\n")
    summary = {"status": "complete", "steps": cfg.train.steps, "tokens": 1000 * cfg.train.steps}
    summary.update({"wall_s": 0.1, "tokens_per_s": 1234.5, "params_active": 10, "params_total": 20, "final": final})
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary))
    os.replace(tmp, run_dir / "summary.json")
    return final


def run_ok(cfg, run_dir: Path, resume: bool) -> dict:
    _attempt(run_dir, resume)
    (run_dir / "threads.txt").write_text(f"{os.environ.get('OMP_NUM_THREADS')} {cfg.train.threads}")
    (run_dir / "gpu.txt").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "none"))
    return _complete(cfg, run_dir)


def run_mixed(cfg, run_dir: Path, resume: bool) -> dict:
    """By run name: "crash" raises, "oom" dies by SIGKILL (as the OOM killer would), others complete."""
    _attempt(run_dir, resume)
    if "crash" in cfg.run.name:
        raise RuntimeError("boom: a deliberate crash")
    if "oom" in cfg.run.name:
        os.kill(os.getpid(), signal.SIGKILL)
    return _complete(cfg, run_dir)


def run_die_once(cfg, run_dir: Path, resume: bool) -> dict:
    """First attempt: write a checkpoint, then die by SIGKILL; a resumed attempt completes."""
    _attempt(run_dir, resume)
    if not resume:
        _checkpoint(run_dir)
        os.kill(os.getpid(), signal.SIGKILL)
    return _complete(cfg, run_dir)


def run_block_once(cfg, run_dir: Path, resume: bool) -> dict:
    """First attempt: write a checkpoint, say "started", then wait to be killed; a resume completes."""
    _attempt(run_dir, resume)
    if not resume:
        _checkpoint(run_dir)
        (run_dir / "started").write_text(str(os.getpid()))
        time.sleep(120)
        raise RuntimeError("run_block_once was not killed")
    return _complete(cfg, run_dir)


def run_from_source(cfg, run_dir: Path, resume: bool) -> dict:
    """Writes ``source.txt``: the run it starts from (model.init_from) and that run's status when it starts."""
    _attempt(run_dir, resume)
    if cfg.model.init_from:
        source = Path(cfg.model.init_from)
        status = json.loads((source / "summary.json").read_text())["status"] if (source / "summary.json").exists() \
            else "missing"  # fmt: skip
        (run_dir / "source.txt").write_text(f"{source} {status}")
    if "crash" in cfg.run.name:
        raise RuntimeError("boom: a deliberate crash")
    return _complete(cfg, run_dir)
