"""The package's floors hold: no import circle, and no import from a lower floor to a higher one.

Every ``import`` of the package's own modules counts, wherever it stands (module
level, inside a function, under ``if TYPE_CHECKING``), read with ``ast``, so a
lazy import cannot hide an arrow that runs the wrong way. docs/architecture.md
draws the same floors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "moe_testbed"

# Lowest first. A module may import its own package and the packages of lower floors only.
FLOORS = [
    {"__init__", "errors", "io", "allocator", "knobs", "devices"},  # the ground floor
    {"data", "routing"},
    {"config"},
    {"model"},
    {"train"},
    {"analysis"},
    {"study", "bench"},
    {"cli"},
    {"__main__"},
]
# Ground-floor modules may import each other (devices uses errors); a cycle is still caught below.
SAME_FLOOR_OK = [FLOORS[0]]


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(name: str) -> str | None:
    """The module a dotted name refers to: itself, or its parent when the last part is an attribute."""
    for candidate in (name, name.rsplit(".", 1)[0]):
        rel = Path(*candidate.split("."))
        if (PKG.parent / rel).with_suffix(".py").is_file() or (PKG.parent / rel / "__init__.py").is_file():
            return candidate
    return None


def imports_of(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "moe_testbed":
                target = resolve(name)
                if target:
                    out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in sorted(PKG.rglob("*.py"))}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor(module: str) -> int:
    name = unit(module)
    for i, units in enumerate(FLOORS):
        if name in units:
            return i
    raise AssertionError(f"{module}: its package {name!r} has no floor in tests/test_layering.py: add it")


def test_every_module_has_a_floor():
    for module in import_graph():
        floor(module)


def test_no_import_runs_up_or_sideways():
    wrong = []
    for module, targets in import_graph().items():
        for target in targets:
            same_unit = unit(module) == unit(target)
            ok = floor(target) < floor(module) or same_unit
            ok = ok or any(unit(module) in f and unit(target) in f for f in SAME_FLOOR_OK)
            if not ok:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the floors:\n" + "\n".join(sorted(wrong))


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_the_checker_sees_lazy_and_type_only_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from moe_testbed.train.trainer import Trainer\n"
        "def f():\n    import moe_testbed.analysis.report\n    from moe_testbed.routing import tables\n"
    )
    assert imports_of(src) == {"moe_testbed.train.trainer", "moe_testbed.analysis.report", "moe_testbed.routing.tables"}
