"""Config sections whose keys are partly declared by components: the routers' and methods' knobs.

A component declares its own keys as ``knobs`` (moe_testbed/knobs.py); the
``routing`` and ``balance`` sections accept them, read them like fields
(``cfg.balance.eb_rate``) and write them into ``config.yaml``. The registries
that hold the components are imported on first need, so that parsing a config
that names no knob stays cheap (no torch).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

from moe_testbed.config.coerce import coerce
from moe_testbed.errors import ConfigError
from moe_testbed.knobs import Knob


class KnobSection:
    """A section whose keys are partly declared by components (see moe_testbed/knobs.py).

    Declared knobs read like fields (``cfg.balance.eb_rate``): values given in a
    file or an override live in ``knobs`` (type-checked when first needed, see
    :meth:`set_raw_knobs`), and so does a default once it was read.
    """

    KIND: ClassVar[str]  # "routing" (the routers' knobs) or "balance" (the methods')

    def set_raw_knobs(self, raw: dict[str, Any]) -> None:
        """Values of keys that are not fields, as parsed: checked against the declared knobs on first use.

        Deferred so that reading a config file needs no registry (which imports
        torch and every component): a study worker parses configs too.
        """
        self.__dict__["_raw_knobs"] = dict(raw)

    def resolve_knobs(self) -> dict[str, Any]:
        """``knobs`` with every raw value checked and coerced; an unknown key is a ConfigError."""
        knobs = self.__dict__.setdefault("knobs", {})
        raw = self.__dict__.pop("_raw_knobs", None)
        if raw:
            declared = section_knobs(self.KIND)
            for key, value in raw.items():
                if key not in declared:
                    allowed = ", ".join(
                        f"{self.KIND}.{n}" for n in [*field_names(type(self)), *declared] if n != "knobs"
                    )
                    raise ConfigError(f"unknown key {self.KIND}.{key}: allowed keys are {allowed}")
                knobs[key] = coerce(f"{self.KIND}.{key}", value, declared[key].type)
        return knobs

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "knobs":
            raise AttributeError(name)
        knobs = self.resolve_knobs()
        if name not in knobs:  # first read of a default: resolve it once (routers read knobs every forward)
            declared = section_knobs(self.KIND)
            if name not in declared:
                raise AttributeError(f"config section {self.KIND} has no key {name!r}")
            knobs[name] = copy.deepcopy(declared[name].default)
        return knobs[name]

    def __eq__(self, other: object) -> bool:  # knobs set explicitly equal the same knobs left at default
        return type(self) is type(other) and section_dict(self) == section_dict(other)

    __hash__ = None  # mutable, like every dataclass with eq

    def __setattr__(self, name: str, value: Any) -> None:
        if name in field_names(type(self)) or name.startswith("_"):
            object.__setattr__(self, name, value)
        elif name in section_knobs(self.KIND):
            self.resolve_knobs()[name] = value
        else:
            raise AttributeError(f"config section {self.KIND} has no key {name!r}")


def section_knobs(kind: str) -> dict[str, Knob]:
    """The knobs the registered components declare for section ``kind`` (imports them on first use)."""
    from moe_testbed.routing.registry import declared_knobs

    return declared_knobs(kind)


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def section_dict(section: Any) -> dict[str, Any]:
    out = {f.name: copy.deepcopy(getattr(section, f.name)) for f in dataclasses.fields(section) if f.name != "knobs"}
    if isinstance(section, KnobSection):
        out.update({name: getattr(section, name) for name in section_knobs(section.KIND)})
    return out


def check_knobs(section: KnobSection) -> None:
    """Validate the knobs given or read (defaults not read yet are valid by construction: a test checks them)."""
    knobs = section.resolve_knobs()
    if not knobs:
        return
    declared = section_knobs(section.KIND)
    for name, value in knobs.items():
        problem = declared[name].check(value) if declared[name].check else None
        if problem:
            raise ConfigError(f"{section.KIND}.{name}={value!r} {problem}")
