"""Building typed sections from raw YAML mappings, and dotted command-line overrides (``model.n_experts=16``)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from moe_testbed.config.coerce import coerce
from moe_testbed.config.knob_section import KnobSection, field_names
from moe_testbed.errors import ConfigError


def build(cls: type, raw: Any, prefix: str) -> Any:
    """A section (or the whole config) from its raw mapping, every field type-checked.

    Keys that are not fields of a :class:`KnobSection` are kept raw: they are
    checked against the components' knobs when first needed (knob_section.py),
    so that parsing a config needs no registry.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [n for n in field_names(cls) if n != "knobs"]
    extra = {k: v for k, v in raw.items() if k not in names}
    if extra and not issubclass(cls, KnobSection):
        allowed = ", ".join(prefix + n for n in names)
        raise ConfigError(f"unknown key {prefix}{next(iter(extra))}: allowed keys are {allowed}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, raw[name] if raw[name] is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(prefix + name, raw[name], tp)
    section = cls(**kwargs)
    if extra:
        section.set_raw_knobs(extra)
    return section


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. routing.top_k=4)")
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    for text in overrides:
        key, value = parse_override(text)
        if "." not in key:
            raise ConfigError(f"override {text!r} must name a section and a key, e.g. train.steps=100")
        set_dotted(raw, key, value)
