"""A checkpoint's training state as safetensors plus JSON: data only, nothing that runs code when read.

Run directories are shared between people, and ``torch.load`` of a pickle can
execute whatever the file says; so the state (optimizer moments, RNG states,
loader position, statistics) is split into its tensors, stored with
safetensors, and the structure around them, stored as JSON. Dict keys keep
their type (the optimizer's parameter ids are ints) and tuples stay tuples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able structure of ``obj``; its tensors and arrays go into ``tensors`` under generated keys."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, dict):
        return {"__map__": [[encode(k, tensors), encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint: only tensors, arrays and plain data")


def decode(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        return tensors[data["__tensor__"]]
    if "__ndarray__" in data:
        return tensors[data["__ndarray__"]].numpy()
    if "__map__" in data:
        return {_key(decode(k, tensors)): decode(v, tensors) for k, v in data["__map__"]}
    if "__tuple__" in data:
        return tuple(decode(v, tensors) for v in data["__tuple__"])
    if "__float__" in data:
        return float(data["__float__"])
    raise ValueError(f"unknown entry {sorted(data)} in a checkpoint's state.json")


def _key(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def save_state(state: dict[str, Any], tensors_path: Path, json_path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = encode(state, tensors)
    save_file(tensors, str(tensors_path))
    json_path.write_text(json.dumps(structure))


def load_state(tensors_path: Path, json_path: Path) -> dict[str, Any]:
    return decode(json.loads(json_path.read_text()), load_file(str(tensors_path)))
