"""The package's layers hold: imports run down only, and no modules import each other in a circle.

Read from the source with ``ast`` (nothing is imported). An import counts wherever it is written, at module level
or inside a function; only ``if TYPE_CHECKING:`` blocks, which never run, are left out. A package's
``__init__`` counts as the package, so ``from dcp_plugin.storage import CheckpointStorage`` is an import of the
storage layer.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.paths import REPO

PACKAGE = Path(REPO) / "dcp_plugin"

LAYERS: list[set[str]] = [
    {"_lazy", "errors", "config", "logs"},
    {"storage"},
    {"format", "engine"},
    {"loading", "checkpointer"},
    {"policies", "tiers"},
    {"manager", "export"},
    {""},  # the root package: the public names, re-exported from the layers below
    {"lightning", "accelerate"},
    {"cli"},
]
"""Lowest first. The first part of a module's name below ``dcp_plugin`` places it (``""``: the root package)."""

SIDEWAYS = {("config", "errors"), ("logs", "errors"), ("checkpointer", "loading"), ("tiers", "policies")}
"""The only imports allowed between two parts of one layer (importer, imported); the reverse would be a circle."""

TOP_LEVEL_LIMIT = 10
"""Modules directly in ``dcp_plugin/`` (besides ``__init__`` and ``__main__``): the entry points a user meets
first. Everything else lives in the subpackage named for its job."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _part(module: str) -> str:
    names = module.split(".")
    return names[1] if len(names) > 1 else ""


def _layer(module: str) -> int:
    for index, parts in enumerate(LAYERS):
        if _part(module) in parts:
            return index
    raise AssertionError(f"{module} is in no layer: add {_part(module)!r} to LAYERS in tests/test_layout.py.")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node`` except those inside ``if TYPE_CHECKING:`` (its ``else`` runs, so it counts)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield other
                yield from _runtime_nodes(other)
            continue
        yield child
        yield from _runtime_nodes(child)


def _imports(module: str) -> set[str]:
    """The project modules ``module`` imports when it runs (a name imported from a package that is not one of
    its modules counts as the package)."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES and name != module}


IMPORTS = {module: _imports(module) for module in MODULES}


def test_imports_run_down_the_layers_only():
    wrong = []
    for module, imported in sorted(IMPORTS.items()):
        for target in sorted(imported):
            here, there = _layer(module), _layer(target)
            sideways = here == there and _part(module) != _part(target)
            if there > here or (sideways and (_part(module), _part(target)) not in SIDEWAYS):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "Imports that run up or sideways (move the code, or pass it in from above):\n" + "\n".join(wrong)


def test_the_root_package_re_exports_only_from_below_the_adapters():
    tree = ast.parse(MODULES["dcp_plugin"].read_text())
    lazy = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets)
    )
    targets = set(ast.literal_eval(lazy).values())
    assert targets and targets <= set(MODULES)
    assert not [t for t in sorted(targets) if _layer(t) >= _layer("dcp_plugin")]


def test_no_import_circles():
    circles = []
    state: dict[str, str] = {}  # "open" while on the current path, "done" once all it imports were visited
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(IMPORTS[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module)
    assert not circles, "Import circles (function-level imports count too):\n" + "\n".join(circles)


def test_few_modules_sit_directly_in_the_package():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in {"__init__.py", "__main__.py"})
    assert len(top) <= TOP_LEVEL_LIMIT, f"{len(top)} modules directly in dcp_plugin/: {top}"


CLASS_LINE_LIMIT = 250


def test_every_class_fits_in_250_lines():
    """A class longer than this does more than one job: split it along a seam that exists."""
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > CLASS_LINE_LIMIT:
                long.append(f"{module}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, f"classes over {CLASS_LINE_LIMIT} lines: {long}"


def test_the_checks_see_the_imports_they_guard():
    # the reading itself: function-level imports count, TYPE_CHECKING-only ones do not
    assert "dcp_plugin.lightning.inference" in IMPORTS["dcp_plugin.cli.export"]
    assert "dcp_plugin.checkpointer" not in IMPORTS["dcp_plugin.tiers.two_tiers"]
    assert "dcp_plugin.storage.transfer" in IMPORTS["dcp_plugin.storage"]
