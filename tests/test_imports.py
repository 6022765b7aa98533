"""The import graph of src/mobe, read from the source with `ast`: no circle, and the lower stages stay below.

An edge is module -> module it imports, wherever the import stands (inside functions too): `from .base import X`
is an edge to the package's `base` module, `from . import y` to its module `y`, `from .. import name` (a name, not
a module) to the package's `__init__`, `import a.b` to `a.b`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "mobe"
LOWER_STAGES = ("mobe.config", "mobe.factorize")  # pure settings and tensor maths: they import no other stage


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((SRC / ROOT).rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that module `name` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]], within: set[str] | None = None) -> list[str] | None:
    """One import circle (its modules, the first repeated at the end) among `within` (default all), or None."""
    nodes = set(graph) if within is None else within
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node] & nodes):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(nodes):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _closure(graph: dict[str, set[str]], start: set[str]) -> set[str]:
    seen, todo = set(start), list(start)
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def _in_lower_stage(module: str) -> bool:
    return any(module == stage or module.startswith(stage + ".") for stage in LOWER_STAGES)


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "mobe.factorize.primitives" in graph["mobe.factorize.mobe"]  # from .primitives import ...
    assert "mobe.config" in graph["mobe.factorize.mobe"]  # from ..config import ...
    assert "mobe.factorize.base" in graph["mobe.factorize"]  # a package's re-exports
    assert "mobe.quantize.groupwise" in graph["mobe.quantize.checkpoint"]  # from . import groupwise


def test_find_cycle_names_the_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_mobe():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("stage", LOWER_STAGES)
def test_lower_stages_import_no_other_stage(stage):
    graph = import_graph()
    start = {m for m in graph if m == stage or m.startswith(stage + ".")}
    above = sorted(m for m in _closure(graph, start) if not _in_lower_stage(m))
    assert not above, f"{stage} reaches {above}"


@pytest.mark.parametrize("stage", LOWER_STAGES)
def test_lower_stages_import_at_the_top_only(stage):
    """Every import of config.py and factorize/ stands at module level: what a module needs is in its header."""
    late = []
    for name, path in _modules().items():
        if not (name == stage or name.startswith(stage + ".")):
            continue
        tree = ast.parse(path.read_text(), str(path))
        top = {id(node) for node in tree.body}
        late += [
            f"{name}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top
        ]
    assert not late, f"imports inside functions or blocks: {late}"
