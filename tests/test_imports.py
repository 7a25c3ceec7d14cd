"""The treedistill package's modules import each other without a cycle.

Every import of a treedistill module counts, wherever it is written: at the top, inside a function
(where a cycle hides from Python until that function runs) or under `if TYPE_CHECKING:` (a cycle
of types is still two modules that each need the other). The files are read with `ast`; nothing is
imported.

Package `__init__` edges: `from treedistill.envs import base` is an edge to the submodule
`treedistill.envs.base` only. Python runs `treedistill/envs/__init__.py` first, but that implicit
edge from every submodule to its package is not counted: with it, every package whose `__init__`
re-exports its submodules would be a cycle. `from treedistill.envs import get_env` (a name of the
`__init__`) is an edge to `treedistill.envs`: a cycle when that `__init__` imports the importer.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(importlib.util.find_spec("treedistill").submodule_search_locations[0])


def module_files(root: Path = ROOT, package: str = "treedistill") -> dict[str, tuple[Path, bool]]:
    """{module name: (file, is a package's __init__)} for every .py file under packages of `root`."""
    found = {package: (root / "__init__.py", True)}
    for path in sorted(root.iterdir()):
        if path.is_dir() and (path / "__init__.py").is_file():
            found.update(module_files(path, f"{package}.{path.name}"))
        elif path.suffix == ".py" and path.name != "__init__.py":
            found[f"{package}.{path.stem}"] = (path, False)
    return found


def imported_modules(source: str, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of `modules` that `source` (module `module`) imports, anywhere in the file.

    `import a.b.c`: a.b.c (or its longest prefix in `modules`); `from a.b import c`: a.b.c when that
    is a module, else a.b; relative imports resolve against the module's package.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import a.b.c` where only a.b is ours (a.b.c: a name)
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the treedistill modules it imports} over the whole package."""
    files = module_files()
    modules = set(files)
    return {name: imported_modules(path.read_text(encoding="utf-8"), name, is_package, modules)
            for name, (path, is_package) in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] per strongly connected component that has one (Tarjan's algorithm),
    sorted; [] for an acyclic graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # recursion depth <= number of modules (~100)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(_cycle_in(graph, component) for component in components)


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first node, by breadth-first search inside it."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if nxt in component and nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "treedistill.pretrain" in graph  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (each: a imports b imports ... a):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles)


def test_cycle_finder_on_small_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []  # a diamond is not a cycle
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    # Two separate cycles, each reported once, by its shortest path through its first node.
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"e"}, "e": {"c", "f"}, "f": set()}
    assert find_cycles(graph) == [["a", "b", "a"], ["c", "d", "e", "c"]]
    graph = {"a": {"b", "d"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "d", "a"]]


MODULES = {"p", "p.sub", "p.sub.x", "p.sub.y", "p.z"}


@pytest.mark.parametrize("source, module, is_package, expected", [
    ("import p.sub.x\n", "p.z", False, {"p.sub.x"}),
    ("import p.sub.x.name\n", "p.z", False, {"p.sub.x"}),  # an attribute path ends at its module
    ("def f():\n    from p.sub import x\n", "p.z", False, {"p.sub.x"}),  # inside a function, a submodule
    ("from p.sub import thing\n", "p.sub.x", False, {"p.sub"}),  # a name of the package __init__
    ("from p.sub import x, thing\n", "p.z", False, {"p.sub.x", "p.sub"}),
    ("from . import y\n", "p.sub.x", False, {"p.sub.y"}),
    ("from .y import thing\n", "p.sub.x", False, {"p.sub.y"}),
    ("from ..z import thing\n", "p.sub.x", False, {"p.z"}),
    ("from .x import thing\n", "p.sub", True, {"p.sub.x"}),  # relative to the package itself
    ("if TYPE_CHECKING:\n    from p.z import T\n", "p.sub.x", False, {"p.z"}),
    ("import os\nfrom torch import nn\nimport p.sub.x\n", "p.sub.x", False, set()),  # others and itself
])
def test_imports_are_resolved(source, module, is_package, expected):
    assert imported_modules(source, module, is_package, MODULES) == expected


def test_a_function_level_import_closes_a_cycle():
    # The shape of the cycles this test exists for: a top-level import one way, a function-level
    # import back.
    files = {"p.a": "from p.b import helper\n", "p.b": "def helper():\n    from p.a import thing\n"}
    graph = {m: imported_modules(src, m, False, set(files)) for m, src in files.items()}
    assert find_cycles(graph) == [["p.a", "p.b", "p.a"]]
