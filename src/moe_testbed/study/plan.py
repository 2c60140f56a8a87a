"""Expanding a study spec into named runs, each with its config or the reason it is skipped.

Precedence (later wins): base config < spec ``overrides`` < command-line
overrides < the run's own values (grid point or ``runs:`` entry). A
command-line override may not set a key that the study varies: it would make
the varied runs identical, so that is an error (use ``--only`` to pick runs).

A combination that :meth:`Config.validate` rejects (for example a balancing
method that a router does not support) is kept in the plan with
``skip = <reason>``: the results table then says why the cell is empty.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from moe_testbed.config import Config, parse_override
from moe_testbed.errors import ConfigError
from moe_testbed.study import StudyError
from moe_testbed.study.spec import RunGroup, StudySpec, check_key


@dataclass
class PlannedRun:
    name: str
    values: dict[str, Any]  # the dotted keys this run sets itself (grid point and/or runs: entry)
    cfg: Config  # resolved, not yet validated (see skip)
    skip: str | None = None  # why Config.validate() rejected it; None = runnable
    config: str = ""  # the configuration: the name without its seed suffix
    seed: int | None = None  # the seed of a study with a seeds axis


def parse_cli_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text in items:
        try:
            key, value = parse_override(text)
        except ConfigError as exc:
            raise StudyError(str(exc)) from None
        check_key(key, f"override {text!r}")
        out[key] = value
    return out


def expand(spec: StudySpec, cli_overrides: dict[str, Any] | None = None, seeds: list[int] | None = None
           ) -> list[PlannedRun]:  # fmt: skip
    """Every run of the study, in spec order: the grid first, then ``runs:`` entries.

    With seeds (``seeds`` here, from ``--seeds``, else the spec's), every configuration runs once
    per seed (``train.seed``), named ``<configuration>-s<seed>``, seeds next to each other.
    """
    seeds = seeds if seeds is not None else spec.seeds
    cli_overrides = dict(cli_overrides or {})
    varied = spec.varied_keys() + (["train.seed"] if seeds is not None else [])
    clash = [k for k in cli_overrides if k in varied]
    if clash:
        raise StudyError(
            f"override {clash[0]} is varied by study {spec.name!r}: overriding it would make runs identical; "
            "use --only NAME to pick runs instead"
        )
    try:
        base = Config.from_dict(spec.base).replace({**spec.overrides, **cli_overrides})
    except ConfigError as exc:
        raise StudyError(f"study {spec.name}: base config: {exc}") from None

    points: list[tuple[str | None, dict[str, Any]]] = []  # (name template or None, the run's values)
    for point in _product(spec.grid):
        points.append((spec.name_format, point))
    for group in spec.runs:
        for point in _product(group.grid) or [{}]:
            points.append((_group_template(group), {**group.values, **point}))

    runs = []
    for template, values in points:
        try:
            cfg = base.replace(values)
        except ConfigError as exc:
            raise StudyError(f"study {spec.name}: run {values}: {exc}") from None
        name = _render(template, cfg) if template else auto_name(values)
        if seeds is None:
            cfg.run.name = name
            runs.append(PlannedRun(name, values, cfg, _problem(cfg), config=name))
            continue
        for seed in seeds:
            run_cfg = cfg.replace({"train.seed": seed})
            run_cfg.run.name = f"{name}-s{seed}"
            runs.append(PlannedRun(run_cfg.run.name, {**values, "train.seed": seed}, run_cfg, _problem(run_cfg),
                                   config=name, seed=seed))  # fmt: skip
    _check_unique([r.name for r in runs], spec.name)
    check_claims(spec, runs)
    return runs


def check_claims(spec: StudySpec, runs: list[PlannedRun]) -> None:
    """Every configuration a claim names is one of the study's."""
    from moe_testbed.study.claims import parse_claim

    configs = {r.config for r in runs}
    for i, entry in enumerate(spec.claims):
        claim = parse_claim(entry, f"study {spec.name}: claims[{i}]")
        unknown = [c for c in claim.configs if c not in configs]
        if unknown:
            raise StudyError(
                f"study {spec.name}: claim {claim.text!r} names {unknown[0]!r}, which is not a configuration of the "
                f"study: choose from {', '.join(sorted(configs))}"
            )


def select(runs: list[PlannedRun], only: list[str] | None) -> list[PlannedRun]:
    """``--only`` keeps runs whose name contains any of the given substrings."""
    if not only:
        return runs
    chosen = [r for r in runs if any(s in r.name for s in only)]
    if not chosen:
        raise StudyError(f"--only {' '.join(only)} matches no run; runs are: {', '.join(r.name for r in runs)}")
    return chosen


def auto_name(values: dict[str, Any]) -> str:
    """A readable name from the values: strings as they are, other values after their key's last part."""
    return sanitize("-".join(_value_text(k, v) for k, v in values.items()) or "run")


def sanitize(name: str) -> str:
    """Run names become directory names: keep them shell- and URL-friendly."""
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", name).strip("_.") or "run"


# ---- helpers ------------------------------------------------------------------


def _product(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    if not grid:
        return []
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _group_template(group: RunGroup) -> str | None:
    """The name of a ``runs:`` entry; with a grid and no placeholder, the grid point is appended."""
    if group.name is None:
        return None
    if group.grid and "{" not in group.name:
        return group.name + "".join(f"-{{{k}}}" for k in group.grid)
    return group.name


def _value_text(key: str, value: Any) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if isinstance(value, bool):
        return leaf if value else f"no-{leaf}"
    if value is None:
        return f"{leaf}-none"
    if isinstance(value, (int, float)):
        return f"{leaf}{value}"
    if isinstance(value, str):
        return value
    return f"{leaf}-{json.dumps(value, separators=(',', ':'))}"


def _render(template: str, cfg: Config) -> str:
    """Fill ``{section.key}`` placeholders from the run's resolved config."""
    flat = {f"{s}.{k}": v for s, fields in cfg.to_dict().items() for k, v in fields.items()}

    def fill(match: re.Match) -> str:
        key = match.group(1)
        if key not in flat:
            raise StudyError(f"run name template {template!r}: unknown key {key!r}")
        value = flat[key]
        if value is None:
            return "none"
        if isinstance(value, bool):
            return str(value).lower()
        return str(value)

    return sanitize(re.sub(r"\{([^{}]+)\}", fill, template))


def _problem(cfg: Config) -> str | None:
    try:
        cfg.validate()
    except ConfigError as exc:
        return str(exc)
    return None


def _check_unique(names: list[str], study: str) -> None:
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    dupes = [n for n, c in seen.items() if c > 1]
    if dupes:
        raise StudyError(
            f"study {study}: several runs are named {dupes[0]!r}; give the runs: entries a name "
            "or set name_format with placeholders such as {balance.scope}"
        )
