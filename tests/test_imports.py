"""Imports inside the package flow one way: the graph of `hf_kdsearch` modules importing each other has no cycle.

Every `import` and `from ... import` statement counts, the ones inside functions too: a function-local import
hides a cycle from Python's import machinery, not from a reader. Run it alone with
`python -m pytest tests/test_imports.py -q`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "hf_kdsearch"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every `.py` file of the package (a package's name maps to its __init__)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names, resolving `.` and `..` against the importing module."""
    if not node.level:
        return node.module or ""
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The package modules that `module` imports anywhere in its file, each with the line of its first import.

    `from pkg import name` counts as importing `pkg.name` when that is a module, else `pkg` itself. Parent packages
    that Python initialises on the way are not counted: they are already importing when a submodule runs.
    """
    is_package = path.name == "__init__.py"
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, is_package, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            if target in modules and target != module:
                found.setdefault(target, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as `[a, b, ..., a]`, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
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

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return "\n".join(f"  {a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:]))


def test_the_checker_resolves_relative_and_function_local_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from ..a import f\nimport json\n")
    modules = module_files(pkg)
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph == {
        PACKAGE: {f"{PACKAGE}.a": 1},
        f"{PACKAGE}.a": {f"{PACKAGE}.sub.b": 2},
        f"{PACKAGE}.sub": {},
        f"{PACKAGE}.sub.b": {f"{PACKAGE}.a": 1},
    }
    assert find_cycle(graph) == [f"{PACKAGE}.a", f"{PACKAGE}.sub.b", f"{PACKAGE}.a"]
    assert find_cycle({"x": {"y": 1}, "y": {}}) is None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert f"{PACKAGE}.trainer" in graph and f"{PACKAGE}.gates.plan" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle:\n" + describe(cycle, graph)


def reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_teacher_reaches_neither_the_data_path_nor_the_datasets():
    # Loading a teacher needs loading, batch plumbing and checks; not the GPU data path, MNIST assets or `datasets`.
    reached = reachable(import_graph(), f"{PACKAGE}.teacher")
    assert not reached & {f"{PACKAGE}.fastpath", f"{PACKAGE}.data"}, sorted(reached)
    assert reachable(import_graph(), f"{PACKAGE}.batch") == set()
