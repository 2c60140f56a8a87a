"""Checking a raw YAML value against a section field's annotation (int, float, bool, str, lists, mappings)."""

from __future__ import annotations

import types
import typing
from typing import Any

from moe_testbed.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int -> float."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {_type_name(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # `model.x=a,b` on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a list")
        return [coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a mapping")
        return {coerce(key, k, key_tp): coerce(f"{key}.{k}", v, val_tp) for k, v in value.items()}
    return _coerce_scalar(key, value, tp)


def _coerce_scalar(key: str, value: Any, tp: Any) -> Any:
    expected = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    if tp not in expected:
        return value
    ok = {
        float: not isinstance(value, bool) and isinstance(value, (int, float)),
        int: not isinstance(value, bool) and isinstance(value, int),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {expected[tp]}")
    return float(value) if tp is float else value
