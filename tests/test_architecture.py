"""The library's floors: every import of a module of ``fcnseg`` goes down or stays level.

Floors, lowest first (a module may import its own floor and those below):

    0  fcnseg.errors, fcnseg.metrics, fcnseg.utils.*
    1  fcnseg.data.*, fcnseg.models.*    (data never imports models, models never imports data)
       fcnseg.deploy.*                   (export and onnxruntime; imports models, not data)
    2  fcnseg.engine.*
    3  fcnseg.bench.*
       fcnseg (the package's __init__) re-exports and may import anything; nothing imports it.

Imports are read from the source with ``ast``, at module level and inside functions alike (a
lazy import is still a dependency), relative imports resolved. ``from package import name``
counts as an import of ``package.name`` when that is a module, else of ``package``.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import fcnseg

ROOT = Path(fcnseg.__file__).parent

#: the top-level parts of fcnseg and their floors.
FLOORS = {
    "fcnseg.errors": 0,
    "fcnseg.metrics": 0,
    "fcnseg.utils": 0,
    "fcnseg.data": 1,
    "fcnseg.models": 1,
    "fcnseg.deploy": 1,
    "fcnseg.engine": 2,
    "fcnseg.bench": 3,
}
#: parts of the same floor that must not import one another.
APART = {
    ("fcnseg.data", "fcnseg.models"),
    ("fcnseg.models", "fcnseg.data"),
    ("fcnseg.deploy", "fcnseg.data"),
    ("fcnseg.models", "fcnseg.deploy"),
}
#: configuration belongs to the scripts; the library takes plain arguments.
FORBIDDEN = ("hydra", "omegaconf")

#: Imports tolerated for now, each an exact (importer, imported) edge. fcnseg/engine is being
#: redesigned; these go with it, and an entry that no longer occurs fails the test so that the
#: list only shrinks. Nothing outside fcnseg/engine may be listed here.
KNOWN: set[tuple[str, str]] = set()  # none left


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name: str) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every ``import`` and ``from`` statement of module ``name``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                yield node.lineno, sub if sub in MODULES else source


def part(name: str) -> str | None:
    """The top-level part of fcnseg that module ``name`` belongs to (``None``: fcnseg itself)."""
    parts = name.split(".")
    return None if len(parts) == 1 else ".".join(parts[:2])


def floor(name: str) -> float:
    top = part(name)
    return float("inf") if top is None else FLOORS[top]


def edges() -> dict[tuple[str, str], list[str]]:
    """Every import of one fcnseg module by another: (importer, imported) -> ``file:line``."""
    out: dict[tuple[str, str], list[str]] = {}
    for name in MODULES:
        for line, target in imports(name):
            if target in MODULES and target != name:
                where = f"{MODULES[name].relative_to(ROOT.parent)}:{line}"
                found = out.setdefault((name, target), [])
                if where not in found:  # one entry per statement, however many names
                    found.append(where)
    return out


EDGES = edges()


def describe(pairs, why) -> str:
    return "\n".join(
        f"  {a} -> {b} ({', '.join(EDGES[a, b])}): {why(a, b)}" for a, b in sorted(pairs)
    )


def test_every_module_has_a_floor():
    unplaced = sorted(n for n in MODULES if part(n) is not None and part(n) not in FLOORS)
    assert not unplaced, (
        f"modules outside the floors {sorted(FLOORS)}: {unplaced}; give their package a floor "
        "in tests/test_architecture.py"
    )


def floor_violation(a: str, b: str) -> str | None:
    if part(a) is None:  # fcnseg/__init__.py re-exports from anywhere
        return None
    if floor(b) > floor(a):
        where = "fcnseg itself" if part(b) is None else f"{part(b)} (floor {floor(b)})"
        return f"{part(a)} (floor {floor(a)}) imports upward, from {where}"
    if (part(a), part(b)) in APART:
        return f"{part(a)} and {part(b)} share a floor and must not import one another"
    return None


def reaches(start: str, goal: str) -> bool:
    """Whether module ``start`` imports ``goal``, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo += [b for a, b in EDGES if a == node]
    return False


def test_known_edges_are_engine_imports_that_still_offend():
    outside = sorted(e for e in KNOWN if part(e[0]) != "fcnseg.engine")
    assert not outside, f"KNOWN may only excuse fcnseg.engine's imports, not {outside}"
    gone = sorted(
        (a, b)
        for a, b in KNOWN
        if (a, b) not in EDGES or not (floor_violation(a, b) or reaches(b, a))
    )
    assert not gone, f"these KNOWN imports no longer occur or offend; remove them: {gone}"


def tolerate(pairs, why) -> None:
    """Reports the KNOWN imports among ``pairs`` in pytest's warnings summary."""
    if pairs:
        warnings.warn(f"tolerated KNOWN imports:\n{describe(pairs, why)}", stacklevel=2)


def test_imports_go_down_the_floors():
    bad = {e for e in EDGES if floor_violation(*e)}
    tolerate(bad & KNOWN, floor_violation)
    offending = describe(bad - KNOWN, floor_violation)
    assert not offending, f"imports that cross the floors:\n{offending}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or ``None`` (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_no_import_cycle():
    tolerate(KNOWN & EDGES.keys(), lambda a, b: "excused from the cycle check")
    graph: dict[str, set[str]] = {}
    for a, b in EDGES.keys() - KNOWN:
        graph.setdefault(a, set()).add(b)
    cycle = find_cycle(graph) or []
    steps = "\n".join(f"  {a} -> {b} ({', '.join(EDGES[a, b])})" for a, b in zip(cycle, cycle[1:]))
    assert not cycle, f"import cycle {' -> '.join(cycle)}:\n{steps}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_library_never_imports_configuration(name):
    found = [
        f"{MODULES[name].relative_to(ROOT.parent)}:{line} imports {target}"
        for line, target in imports(name)
        if target.split(".")[0] in FORBIDDEN
    ]
    assert not found, "the library takes plain arguments, never Hydra/OmegaConf:\n" + "\n".join(
        found
    )
