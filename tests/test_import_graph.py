"""No import cycles inside ``globalcom2``: every module is parsed with ``ast`` (nothing is imported).

Edges are the intra-package imports a module can run: module-level ones and those inside functions, methods and
``if`` / ``try`` blocks alike; absolute (``import globalcom2.x``, ``from globalcom2.x import y``) and relative
(``from . import x``, ``from .x import y``, ``from ..x.y import z``), each resolved to the module it loads: ``from
pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. ``importlib.import_module`` with
a literal ``"globalcom2..."`` name counts too. Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "globalcom2"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def module_files(root: Path = SRC) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file of the package (``pkg/__init__.py`` is ``pkg``)."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks (their ``else`` still runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is a module of the package (``None`` outside it)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports (see module docstring)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    target = _resolve(alias.name, modules)
                    if target:
                        found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # the package a relative import starts from: the module itself for an __init__, else its parent
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                if node.level - 1 > len(anchor) - 1:
                    raise AssertionError(f"{path}: relative import beyond the top-level package")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + (node.module.split(".") if node.module else []))
            else:
                base = node.module or ""
                if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                    continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in modules else _resolve(base, modules)
                if target:
                    found.add(target)
        elif isinstance(node, ast.Call):
            func = node.func
            name = getattr(func, "attr", None) or getattr(
                func, "id", ""
            )  # importlib.import_module / import_module
            if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
                value = node.args[0].value
                if isinstance(value, str) and (value == PACKAGE or value.startswith(PACKAGE + ".")):
                    target = _resolve(value, modules)
                    if target:
                        found.add(target)
    return found


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every self-import (``[a, a]``), then one shortest cycle (``[a, b, ..., a]``) per strongly connected
    component of two or more modules (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    self_imports = [[m, m] for m in sorted(graph) if m in graph[m]]
    return self_imports + [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first search inside the component, self-
    imports aside)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component - {node}):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in component {sorted(component)}")


def test_the_parser_sees_the_package():
    graph = import_graph()
    assert f"{PACKAGE}.cli" in graph and f"{PACKAGE}.loading" in graph
    assert f"{PACKAGE}.loading" in graph[f"{PACKAGE}.cli"]  # a function-level or module-level edge


def test_cycle_finder_on_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"a"}}
    assert find_cycles(graph) == [["e", "e"], ["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a", "b"}, "b": {"a"}}) == [["a", "a"], ["a", "b", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .sub import helper\n",
        "top.py": "def f():\n    from . import sub\n    from .sub.helper import g\n    import globalcom2.other\n",
        "other.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .top import f\n",
        "sub/__init__.py": "from .. import top\n",
        "sub/helper.py": "from ..other import x\nimport importlib\nimportlib.import_module('globalcom2.top')\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    g = PACKAGE
    assert graph[g] == {f"{g}.sub.helper"}
    assert graph[f"{g}.top"] == {f"{g}.sub", f"{g}.sub.helper", f"{g}.other"}
    assert graph[f"{g}.other"] == set()  # TYPE_CHECKING only
    assert graph[f"{g}.sub"] == {f"{g}.top"}
    assert graph[f"{g}.sub.helper"] == {f"{g}.other", f"{g}.top"}
    assert find_cycles(graph) == [[f"{g}.sub", f"{g}.top", f"{g}.sub"]]


def test_no_import_cycles():
    graph = import_graph()
    cycles = find_cycles(graph)
    message = "\n".join(" -> ".join(c) for c in cycles)
    print(message)
    assert not cycles, f"import cycles inside {PACKAGE}:\n{message}"
