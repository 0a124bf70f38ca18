"""The package's shape, as README's architecture section states it: front doors at the top, internals
grouped by concern in layers that import downwards only, no import cycles, no module too long to read
at once. Read with `ast` (nothing imported), function-level imports included."""
from __future__ import annotations

import ast
import os

import pytest

from tests.conftest import REPO

PACKAGE = os.path.join(REPO, "qlaunch")
# One module per command a user types (finetune.py is `cli`).
FRONT_DOORS = {"cli", "launch", "plan", "merge", "quantize", "chat", "evaluate", "demo"}
# Internal packages and their layer: a package may import only packages of a lower layer.
LAYERS = {"config": 0, "data": 1, "cluster": 1, "model": 2, "memory": 3, "train": 4}
MAX_LINES = 450


def modules() -> dict[str, str]:
    """Dotted name → path of every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    return out


def imports_of(path: str, name: str, known: set[str]) -> set[str]:
    """qlaunch modules that `name` imports anywhere in its body (`from a import b` counts a.b when b
    is a module)."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, name, set(found)) for name, path in found.items()}


def kind(module: str) -> tuple[str, str | None]:
    """('root' | 'door' | 'internal', the internal package)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "root", None
    if len(parts) == 2 and parts[1] in FRONT_DOORS:
        return "door", None
    return "internal", parts[1]


def test_every_module_is_a_declared_front_door_or_in_a_layered_package(graph):
    strays = [m for m in graph if kind(m)[0] == "internal" and kind(m)[1] not in LAYERS]
    assert not strays, f"not a front door nor in a package of LAYERS: {strays}"
    doors = {m.split(".")[1] for m in graph if kind(m)[0] == "door"}
    assert doors == FRONT_DOORS


def test_nothing_imports_a_front_door(graph):
    wrong = [(m, d) for m, deps in graph.items() for d in deps if kind(d)[0] == "door"]
    assert not wrong, f"front doors are imported by: {wrong}"


def test_internal_packages_import_only_lower_layers(graph):
    wrong = []
    for module, deps in graph.items():
        what, package = kind(module)
        if what != "internal":
            continue
        for dep in deps:
            dep_what, dep_package = kind(dep)
            if dep_what == "internal" and dep_package != package and LAYERS[dep_package] >= LAYERS[package]:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports against the layer order " + str(LAYERS) + ":\n" + "\n".join(wrong)


def test_no_import_cycles(graph):
    cycles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_is_too_long_to_read_at_once():
    long = {name: n for name, path in modules().items()
            if (n := sum(1 for _ in open(path, encoding="utf-8"))) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checker_sees_what_it_checks(graph):
    """The graph is real: known edges are found, including function-level imports."""
    assert "qlaunch.memory.planner" in graph["qlaunch.memory.fit"]
    assert "qlaunch.config.errors" in graph["qlaunch.config.resolve"]
    assert "qlaunch.model.inference" in graph["qlaunch.chat"]  # imported inside main()
    assert kind("qlaunch.plan") == ("door", None) and kind("qlaunch.memory.planner") == ("internal", "memory")


def test_test_modules_have_unique_basenames():
    """pytest imports test modules by basename (no packages here): two test_x.py in different folders stop
    the whole collection with an "import file mismatch"."""
    from collections import Counter

    root = os.path.join(REPO, "tests")
    names = Counter(f for _, _, files in os.walk(root) for f in files if f.startswith("test_") and f.endswith(".py"))
    assert [n for n, c in names.items() if c > 1] == []
