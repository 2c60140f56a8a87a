"""Checkpoints: safetensors weights + training state (safetensors + JSON), written atomically, verified on load.

Layout: ``RUN/checkpoints/step_000100/{model.safetensors, state.safetensors, state.json, manifest.json}``.
A checkpoint is written into ``step_000100.tmp/`` and renamed into place, so a
kill at any moment leaves either no checkpoint or a complete one; a write that
fails (a full disk) removes its temporary directory. The manifest holds the
sha256 of every file; a truncated or altered file fails loudly. Nothing in a
checkpoint is a pickle (train/serialize.py): reading a run directory someone
else wrote cannot execute code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from moe_testbed.errors import UserError
from moe_testbed.io import sha256_file
from moe_testbed.train.serialize import load_state, save_state

FILES = ("model.safetensors", "state.safetensors", "state.json")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint exists but cannot be trusted."""


class DiskFull(UserError, OSError):
    """No space left while writing part of a run directory."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    keep: int = 2,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically; ``weights``: the tensors to save instead of ``model``'s own
    (an expert-parallel run saves its gathered, unsharded weights)."""  # fmt: skip
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        if weights is None:
            save_model(model, str(tmp / "model.safetensors"))
        else:
            save_file(weights, str(tmp / "model.safetensors"))
        save_state(state, tmp / "state.safetensors", tmp / "state.json")
        files = {name: sha256_file(tmp / name) for name in FILES}
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "format": 2, "sha256": files}, indent=2))
        for name in (*FILES, "manifest.json"):
            with open(tmp / name, "rb+") as fh:
                os.fsync(fh.fileno())
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind to fill the disk
        if exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(root).free / 2**20
            raise DiskFull(
                f"disk full while writing checkpoint {final} (about {_size_mib(model, state):.0f} MiB needed, "
                f"{free:.0f} MiB free): free space and resume with --resume {run_dir}"
            ) from None
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _size_mib(model: torch.nn.Module, state: dict[str, Any]) -> float:
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 3 * n / 2**20  # the weights and, in the optimizer state, their two moments


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def checkpoint_identity(path: Path | None) -> str | None:
    """``step_NNNNNN:<manifest digest>`` of a checkpoint (None for none): equal only for the same checkpoint."""
    if path is None:
        return None
    try:
        return f"{path.name}:{hashlib.sha256((path / 'manifest.json').read_bytes()).hexdigest()[:16]}"
    except OSError:
        return f"{path.name}:unreadable"


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Temporary checkpoint directories of a write that never finished."""
    for tmp in (Path(run_dir) / "checkpoints").glob("step_*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def verify_checkpoint(path: Path) -> int:
    """Check every file against the manifest; return the checkpoint's step."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} has no readable manifest ({exc}): delete it to resume from an earlier one"
        ) from None
    if "state.pt" in manifest.get("sha256", {}):
        raise CheckpointError(
            f"checkpoint {path} was written by an older moe-testbed, with its training state as a pickle "
            "(state.pt), which is not loaded because reading one can run code: start the run afresh"
        )
    for name, digest in manifest["sha256"].items():
        file = path / name
        if not file.is_file() or sha256_file(file) != digest:
            raise CheckpointError(
                f"checkpoint file {file} is truncated or corrupted (sha256 mismatch): "
                "delete that checkpoint directory to resume from an earlier one"
            )
    return int(manifest["step"])


def load_checkpoint(path: Path, model: torch.nn.Module, transform=None) -> dict[str, Any]:
    """Verify and load checkpoint ``path`` into ``model``; ``transform`` maps the saved (unsharded) weights
    to ``model``'s names and shapes (expert parallelism). Returns the training state."""
    verify_checkpoint(path)
    try:
        if transform is None:
            missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        else:
            missing, unexpected = model.load_state_dict(transform(load_file(str(path / "model.safetensors"))),
                                                        strict=False)  # fmt: skip
    except RuntimeError as exc:  # a tensor of another shape
        shapes = str(exc).strip().splitlines()[-1]
        raise CheckpointError(
            f"checkpoint {path} holds a model of another shape than the config asks for ({shapes}): "
            "resume with the run's own model settings, or start a new run with --out"
        ) from None
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise CheckpointError(
            f"checkpoint {path} does not match the model (missing {missing}, unexpected {unexpected}): "
            "resume with the run's own model settings, or start a new run with --out"
        )
    return load_state(path / "state.safetensors", path / "state.json")
