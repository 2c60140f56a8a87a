"""Knobs: a component's own config keys, declared in the component's file.

A router or balancing method declares the keys it reads as class attribute
``knobs = {"eb_rate": Knob(1e-3, float, "bias step per optimizer step", positive)}``.
The config section it belongs to (``routing`` for routers, ``balance`` for
methods) accepts those keys, coerces their type, fills the default, validates
the value with ``check`` and writes it into ``config.yaml`` like any other key;
the component reads it as ``cfg.balance.eb_rate``. So a new method with a knob
is one file: nothing in ``config.py`` changes (docs/extending.md).

``check`` returns ``None`` for a valid value or the rest of a sentence
(``"must be > 0"``) that the config turns into one error line naming the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Knob:
    default: Any
    type: Any  # an annotation the config coerces to: int, float, bool, str, float | None, dict[str, list[int]] | None
    help: str
    check: Check | None = None


def at_least(low: float) -> Check:
    return lambda v: None if v is None or v >= low else f"must be >= {low}"


def positive(v: Any) -> str | None:
    return None if v is None or v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    return None if v is None or v >= 0 else "must be >= 0"


def one_of(*allowed: str) -> Check:
    return lambda v: None if v in allowed else f"is not allowed: choose one of {', '.join(allowed)}"
