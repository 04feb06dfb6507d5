"""The layout holds: small files, no import cycles, each Flower app reaches only its own side and shared/.

The import graph is read with ``ast`` (nothing is imported). It counts every import statement in a module,
function-level ones included, and skips only ``if TYPE_CHECKING:`` blocks, which never run.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folder in the repository -> the package name it installs as (pyproject's [tool.setuptools.package-dir]).
PACKAGE_DIRS = {
    "fedchurn": "fedchurn",
    "server": "fedchurn.server",
    "clients": "fedchurn.clients",
    "shared": "fedchurn.shared",
}
MAX_LINES = 500
APP_SIDES = {
    "fedchurn.server.app": ("fedchurn.server", "fedchurn.shared"),
    "fedchurn.clients.app": ("fedchurn.clients", "fedchurn.shared"),
}


@cache
def modules() -> dict[str, Path]:
    """Every fedchurn module, by its import name."""
    found: dict[str, Path] = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, module: str, is_package: bool, *, type_only: bool = False) -> list[str]:
    """Every name an import statement in ``tree`` names; ``if TYPE_CHECKING:`` bodies only with ``type_only``."""
    names: list[str] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not type_only:
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return names


@cache
def graph(*, type_only: bool = False) -> dict[str, frozenset[str]]:
    """Module -> the fedchurn modules it imports (a ``from package import module`` counts as the module)."""
    known = modules()
    edges: dict[str, frozenset[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = {
            target
            for target in _imported_names(tree, name, path.name == "__init__.py", type_only=type_only)
            if target in known and target != name
        }
        edges[name] = frozenset(targets)
    return edges


def reached_from(start: str) -> set[str]:
    """The modules importing ``start`` loads, following the graph (the parent packages are empty and skipped)."""
    edges = graph()
    seen = {start}
    todo = [start]
    while todo:
        for target in edges[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def cycles(edges: Mapping[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


# --- the graph reader itself --------------------------------------------------------------------------------------


def test_graph_reader_sees_every_kind_of_import_but_type_checking_blocks() -> None:
    source = (
        "import fedchurn.shared.a\n"
        "from fedchurn.shared import b\n"
        "from fedchurn.shared.c import thing\n"
        "def f():\n    from fedchurn.shared import d\n"
        "if TYPE_CHECKING:\n    from fedchurn.shared import e\nelse:\n    import fedchurn.shared.g\n"
        "from . import h\n"
    )
    found = set(_imported_names(ast.parse(source), "fedchurn.shared.x", is_package=False))
    for expected in ("a", "b", "c", "d", "g", "h"):
        assert f"fedchurn.shared.{expected}" in found
    assert "fedchurn.shared.e" not in found


def test_graph_knows_the_app_folders_by_their_import_names() -> None:
    known = modules()
    assert known["fedchurn.server.app"] == REPO / "server" / "app.py"
    assert known["fedchurn.clients.app"] == REPO / "clients" / "app.py"
    assert known["fedchurn.shared.config"] == REPO / "shared" / "config.py"
    assert "fedchurn.shared.config" in graph()["fedchurn.server.app"]
    assert "fedchurn.shared.wire" in reached_from("fedchurn.clients.app")


def test_cycle_finder_finds_a_loop_and_only_the_loop() -> None:
    edges = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a", "d"}), "d": frozenset()}
    assert cycles(edges) == [["a", "b", "c"]]
    edges["c"] = frozenset({"d"})
    assert cycles(edges) == []


# --- the rules ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_file_is_small(name: str) -> None:
    path = modules()[name]
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines < MAX_LINES, f"{path.relative_to(REPO)} has {lines} lines; split it by concern (limit {MAX_LINES})"


@pytest.mark.parametrize("type_only", [False, True], ids=["runtime imports", "with type-only imports"])
def test_no_import_cycles(type_only: bool) -> None:
    """No loop, not even one hidden in a function or behind ``if TYPE_CHECKING:``: move the shared piece instead."""
    found = cycles(graph(type_only=type_only))
    assert found == [], "modules that import each other (directly or around a loop): " + "; ".join(
        " <-> ".join(component) for component in found
    )


@pytest.mark.parametrize("app", sorted(APP_SIDES))
def test_each_flower_app_reaches_only_its_side_and_shared(app: str) -> None:
    allowed = APP_SIDES[app]
    outside = sorted(
        name
        for name in reached_from(app)
        if name != "fedchurn" and not any(name == side or name.startswith(side + ".") for side in allowed)
    )
    assert outside == [], f"{app} loads operator or other-side code: {outside}"


def test_shared_imports_only_shared() -> None:
    offenders = {
        name: sorted(target for target in targets if not target.startswith("fedchurn.shared"))
        for name, targets in graph().items()
        if name.startswith("fedchurn.shared.")
    }
    offenders = {name: targets for name, targets in offenders.items() if targets}
    assert offenders == {}


# shared/ modules one app alone runs, and why they stay in shared/ all the same.
ONE_SIDED_SHARED = {
    # Planning DP-SGD: each bank plans its own training (training.plan: auto); `compare --plan` reads it too.
    "fedchurn.shared.dp_planning": ("fedchurn.clients.app",),
    # The accountant: the bank runs it; dp_planning (above) and the operator's audit recompose ε with it.
    "fedchurn.shared.privacy_accounting": ("fedchurn.clients.app",),
}


def test_every_shared_module_is_run_by_both_apps() -> None:
    """shared/ holds what both sides run: one side's code lives on that side, operator code in fedchurn/."""
    by_app = {app: reached_from(app) for app in APP_SIDES}
    found = {
        name: tuple(app for app in sorted(APP_SIDES) if name in by_app[app])
        for name in modules()
        if name.startswith("fedchurn.shared.")
    }
    one_sided = {name: apps for name, apps in found.items() if len(apps) < len(APP_SIDES)}
    assert one_sided == ONE_SIDED_SHARED


def test_server_aggregation_does_not_import_torch() -> None:
    for name in reached_from("fedchurn.server.strategy"):
        tree = ast.parse(modules()[name].read_text(encoding="utf-8"))
        third_party = {target.split(".")[0] for target in _imported_names(tree, name, is_package=False)}
        assert "torch" not in third_party, f"{name} (imported by server/strategy.py) imports torch"
