"""Reading a study spec: a preset name or a YAML file with a base config, overrides, a grid and extra runs.

The format (docs/studies.md has the full description)::

    name: scope                  # optional; default: the preset / file name
    description: ...             # optional, one paragraph
    base: ../quick.yaml          # a config file (relative to this file) or a mapping of sections
    overrides: {train.steps: 100}            # dotted keys applied to every run
    grid:                                    # the cartesian product of these values
      balance.method: [lbl, eb]
      balance.scope: [sequence, global]
    name_format: "{balance.method}-{balance.scope}"   # optional run-name template for grid runs
    runs:                                    # extra runs, each one mapping of dotted keys
      - {name: reference, routing.router: reference, balance.method: none}
      - {name: "lbl-cf{balance.capacity_factor}", grid: {balance.capacity_factor: [1.0, 1.5]}}

Config sections (``model:``, ``train:``, ...) may also sit at the top level; they
are merged over ``base``. The study keys may instead sit under a ``study:``
section, so that one file is both a config for ``moe-testbed train`` (which
ignores ``study:``) and a study spec.

Everything here is pure: no training, no torch. Mistakes in the spec itself
(unknown keys, a grid that is not a list, a missing base file) are
:class:`StudyError`; an *invalid combination* of valid values is not an error
but a skipped run, decided in :mod:`moe_testbed.study.plan`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moe_testbed.config import Config, parse_override
from moe_testbed.errors import ConfigError
from moe_testbed.study import StudyError
from moe_testbed.study.claims import parse_claim

STUDY_KEYS = ("name", "description", "base", "overrides", "grid", "runs", "name_format", "seeds", "claims")
SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


@dataclass
class RunGroup:
    """One entry of ``runs:``: fixed dotted-key values, optionally crossed with its own grid."""

    name: str | None  # a name or a template such as "lbl-cf{balance.capacity_factor}"
    values: dict[str, Any]
    grid: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class StudySpec:
    name: str
    description: str
    source: Path | None  # the YAML file, None for a spec built in code
    base: dict[str, Any]  # raw config sections (base file + inline sections)
    overrides: dict[str, Any] = field(default_factory=dict)  # applied to every run
    grid: dict[str, list[Any]] = field(default_factory=dict)
    name_format: str | None = None
    runs: list[RunGroup] = field(default_factory=list)
    seeds: list[int] | None = None  # None: one run per configuration, named without a seed
    claims: list = field(default_factory=list)  # study/claims.py, checked against the configurations

    def varied_keys(self) -> list[str]:
        """Keys that the grid or the extra runs set: the columns of the results table."""
        keys = list(self.grid)
        for group in self.runs:
            keys += [*group.grid, *group.values]
        if self.seeds is not None:
            keys.append("train.seed")
        return list(dict.fromkeys(keys))


# ---- finding presets ----------------------------------------------------------


def config_dirs() -> list[Path]:
    """Where presets live: ./configs first (a user's own project), then the package's repo.

    The package is used from a source checkout (``pip install -e .``), so
    ``src/moe_testbed/study/spec.py`` -> ``parents[3]`` is the repository root.
    """
    candidates = [Path.cwd() / "configs", Path(__file__).resolve().parents[3] / "configs"]
    out: list[Path] = []
    for path in candidates:
        if path.is_dir() and all(path.resolve() != p.resolve() for p in out):
            out.append(path)
    return out


def preset_names() -> list[str]:
    names = {p.stem for d in config_dirs() for p in (d / "studies").glob("*.yaml")}
    return sorted(names)


def resolve_spec_path(spec: str) -> Path:
    """A preset name (``quick``) or a path to a YAML file."""
    path = Path(spec)
    looks_like_path = spec.endswith((".yaml", ".yml")) or os.sep in spec or "/" in spec
    if path.is_file():
        return path
    if looks_like_path:
        raise StudyError(f"study spec {spec} not found")
    for root in config_dirs():
        candidate = root / "studies" / f"{spec}.yaml"
        if candidate.is_file():
            return candidate
    names = preset_names()
    hint = f"; presets: {', '.join(names)}" if names else " (no configs/studies/ directory found)"
    raise StudyError(f"unknown study {spec!r}: pass a preset name or a YAML file{hint}")


# ---- loading ------------------------------------------------------------------


def load_spec(spec: str | Path) -> StudySpec:
    path = resolve_spec_path(str(spec))
    raw = _read_yaml(path, "study spec")
    return spec_from_dict(raw, source=path, default_name=path.stem)


def spec_from_dict(raw: dict[str, Any], source: Path | None = None, default_name: str = "study") -> StudySpec:
    raw = dict(raw)
    if isinstance(raw.get("study"), dict):  # study keys under `study:` (file doubles as a config)
        raw.update(raw.pop("study"))
    unknown = [k for k in raw if k not in STUDY_KEYS and k not in SECTIONS]
    if unknown:
        raise StudyError(
            f"{_where(source)}unknown top-level key {unknown[0]!r}: allowed are {', '.join(STUDY_KEYS)} "
            f"and config sections ({', '.join(SECTIONS)})"
        )
    base = _load_base(raw.get("base"), source)
    for section in SECTIONS:
        if section in raw:
            if not isinstance(raw[section], dict):
                raise StudyError(f"{_where(source)}section {section}: must be a mapping")
            base[section] = {**(base.get(section) or {}), **raw[section]}
    name = str(raw.get("name") or default_name)
    spec = StudySpec(
        name=name,
        description=str(raw.get("description") or "").strip(),
        source=source,
        base=base,
        overrides=_dotted_mapping(raw.get("overrides"), "overrides", source),
        grid=_grid(raw.get("grid"), "grid", source),
        name_format=raw.get("name_format"),
        runs=[_run_group(entry, i, source) for i, entry in enumerate(_as_list(raw.get("runs"), "runs", source))],
        seeds=parse_seeds(raw.get("seeds"), f"{_where(source)}seeds"),
        claims=_as_list(raw.get("claims"), "claims", source),
    )
    for i, entry in enumerate(spec.claims):
        parse_claim(entry, f"{_where(source)}claims[{i}]")  # a bad claim fails when the spec is read
    if not spec.grid and not spec.runs:
        raise StudyError(f"{_where(source)}a study needs a grid or runs (or both)")
    if "/" in name or name.startswith("."):
        raise StudyError(f"{_where(source)}name {name!r} must be a plain directory name")
    return spec


def parse_seeds(value: Any, where: str) -> list[int] | None:
    """``seeds: 3`` (seeds 0, 1, 2) or ``seeds: [0, 5, 9]``; None when absent."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise StudyError(f"{where}={value} must be >= 1 (the number of seeds) or a list of seeds")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if len(set(value)) != len(value):
            raise StudyError(f"{where}={value} names a seed twice")
        return list(value)
    raise StudyError(f"{where}={value!r} must be a number of seeds (e.g. 3) or a list of integer seeds")


def check_key(key: str, where: str) -> None:
    """A dotted key must name a config field (``section.key``); suggest the closest on a typo."""
    known = known_keys()
    if key in known:
        return
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else " (keys look like balance.scope, train.seed)"
    raise StudyError(f"{where}: unknown config key {key!r}{hint}")


def known_keys() -> list[str]:
    defaults = Config().to_dict()
    return [f"{section}.{name}" for section, fields in defaults.items() for name in fields]


# ---- helpers ------------------------------------------------------------------


def _where(source: Path | None) -> str:
    return f"{source}: " if source else ""


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StudyError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise StudyError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a {what} must be a mapping")
    return raw


def _load_base(base: Any, source: Path | None) -> dict[str, Any]:
    if base is None:
        return {}
    if isinstance(base, dict):
        unknown = [k for k in base if k not in SECTIONS]
        if unknown:
            raise StudyError(f"{_where(source)}base: unknown section {unknown[0]!r}")
        return {k: dict(v or {}) for k, v in base.items()}
    if not isinstance(base, str):
        raise StudyError(f"{_where(source)}base must be a config file path or a mapping of sections")
    root = source.parent if source else Path.cwd()
    path = (root / base).resolve()
    if not path.is_file():
        # `base: quick` also finds configs/quick.yaml, like a preset name.
        found = [d / f"{base}.yaml" for d in config_dirs() if (d / f"{base}.yaml").is_file()]
        if not found:
            raise StudyError(f"{_where(source)}base config {base} not found (looked at {path})")
        path = found[0]
    raw = _read_yaml(path, "base config")
    raw.pop("study", None)
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise StudyError(f"{path}: unknown section {unknown[0]!r} in base config")
    return {k: dict(v or {}) for k, v in raw.items()}


def _as_list(value: Any, what: str, source: Path | None) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise StudyError(f"{_where(source)}{what} must be a list")
    return value


def _dotted_mapping(value: Any, what: str, source: Path | None) -> dict[str, Any]:
    """``{train.steps: 100}`` or ``["train.steps=100"]`` -> a checked dotted-key mapping."""
    if value is None:
        return {}
    if isinstance(value, list):
        try:
            value = dict(parse_override(str(v)) for v in value)
        except ConfigError as exc:
            raise StudyError(f"{_where(source)}{what}: {exc}") from None
    if not isinstance(value, dict):
        raise StudyError(f"{_where(source)}{what} must be a mapping of dotted keys, e.g. {{train.steps: 100}}")
    for key in value:
        check_key(str(key), f"{_where(source)}{what}")
    return {str(k): v for k, v in value.items()}


def _grid(value: Any, what: str, source: Path | None) -> dict[str, list[Any]]:
    grid = _dotted_mapping(value, what, source)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise StudyError(f"{_where(source)}{what}.{key} must be a non-empty list of values, got {values!r}")
    return grid


def _run_group(entry: Any, index: int, source: Path | None) -> RunGroup:
    what = f"runs[{index}]"
    if not isinstance(entry, dict):
        raise StudyError(f"{_where(source)}{what} must be a mapping such as {{name: ref, routing.router: reference}}")
    entry = dict(entry)
    name = entry.pop("name", None)
    grid = _grid(entry.pop("grid", None), f"{what}.grid", source)
    values = _dotted_mapping(entry, what, source)
    both = set(grid) & set(values)
    if both:
        raise StudyError(f"{_where(source)}{what}: {sorted(both)[0]} is both fixed and in the run's grid")
    if not values and not grid:
        raise StudyError(f"{_where(source)}{what} sets no config key")
    return RunGroup(None if name is None else str(name), values, grid)
