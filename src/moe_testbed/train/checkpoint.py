"""Checkpoints: safetensors weights + training state, written atomically, verified on load.

Layout: ``RUN/checkpoints/step_000100/{model.safetensors, state.pt, manifest.json}``.
A checkpoint is written into ``step_000100.tmp/`` and renamed into place, so a
kill at any moment leaves either no checkpoint or a complete one. The manifest
holds the sha256 of every file; a truncated or altered file fails loudly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from moe_testbed.errors import UserError
from moe_testbed.io import sha256_file


class CheckpointError(UserError, RuntimeError):
    """A checkpoint exists but cannot be trusted."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict[str, Any], keep: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    files = {name: sha256_file(tmp / name) for name in ("model.safetensors", "state.pt")}
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "sha256": files}, indent=2))
    for name in ("model.safetensors", "state.pt", "manifest.json"):
        with open(tmp / name, "rb+") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def verify_checkpoint(path: Path) -> int:
    """Check every file against the manifest; return the checkpoint's step."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} has no readable manifest ({exc}): delete it to resume from an earlier one"
        ) from None
    for name, digest in manifest["sha256"].items():
        file = path / name
        if not file.is_file() or sha256_file(file) != digest:
            raise CheckpointError(
                f"checkpoint file {file} is truncated or corrupted (sha256 mismatch): "
                "delete that checkpoint directory to resume from an earlier one"
            )
    return int(manifest["step"])


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    verify_checkpoint(path)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise CheckpointError(
            f"checkpoint {path} does not match the model (missing {missing}, unexpected {unexpected})"
        )
    return torch.load(path / "state.pt", weights_only=False)
