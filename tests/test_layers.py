"""Imports point down: the blocks, tasks and flows sit on the private core, which never
imports them, and no module imports itself back at run time.

Read from the source with `ast`, imports inside functions included: an import inside a
function is an import all the same, only later.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "prefect_gpt_image"
FOLDERS = {
    PACKAGE: ROOT / "src" / PACKAGE,
    f"{PACKAGE}.blocks": ROOT / "blocks",
    f"{PACKAGE}.tasks": ROOT / "tasks",
    f"{PACKAGE}.flows": ROOT / "flows",
}
"""Where each part of the package lives in the repository (pyproject's `package-dir`)."""
PUBLIC_LAYERS = tuple(f"{PACKAGE}.{name}" for name in ("blocks", "tasks", "flows"))


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    type_only: bool
    """Under `if TYPE_CHECKING:`, which never runs."""


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST, type_only: bool = False) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement under `node`, at any depth, and whether it is type-only."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, type_only
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for statement in child.body:
                yield from _import_nodes(ast.Module(body=[statement], type_ignores=[]), True)
            for statement in child.orelse:
                yield from _import_nodes(ast.Module(body=[statement], type_ignores=[]), type_only)
        else:
            yield from _import_nodes(child, type_only)


def _targets(module: str, path: Path, node: ast.stmt) -> list[str]:
    """The package's modules `node` imports: each name's module, and the packages above it
    (importing `a.b.c` runs `a/__init__` and `a/b/__init__` first), but for the importer's
    own packages, which are imported before it is."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        assert isinstance(node, ast.ImportFrom)
        base = module if path.name == "__init__.py" else module.rpartition(".")[0]
        if node.level:
            base = ".".join(base.split(".")[: len(base.split(".")) - node.level + 1])
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        names = [source, *(f"{source}.{alias.name}" for alias in node.names)]
    found = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        while name:
            found.add(name)
            name = name.rpartition(".")[0]
    own = module
    while own:
        found.discard(own)
        own = own.rpartition(".")[0]
    return sorted(found)


def _imports() -> list[Import]:
    imports = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, type_only in _import_nodes(tree):
            for target in _targets(module, path, node):
                imports.append(Import(module, target, node.lineno, type_only))
    return imports


IMPORTS = _imports()


def _layer(module: str) -> str | None:
    return next((layer for layer in PUBLIC_LAYERS if module.startswith(layer)), None)


def _is_private_core(module: str) -> bool:
    return _layer(module) is None and any(
        part.startswith("_") and part != "__init__" for part in module.split(".")[1:]
    )


def test_the_walk_sees_the_package() -> None:
    """The walk reads every part of the package, and sees imports inside functions and
    under TYPE_CHECKING, which the rules below depend on."""
    assert {_layer(module) for module in MODULES} == {None, *PUBLIC_LAYERS}
    assert f"{PACKAGE}._runner" in MODULES and f"{PACKAGE}.testing.emulator" in MODULES
    by_importer = {(i.importer, i.imported, i.type_only) for i in IMPORTS}
    # blocks/_route.py imports the client inside `get_async_client`, and for types.
    assert (f"{PACKAGE}.blocks._route", f"{PACKAGE}._client", False) in by_importer
    assert (f"{PACKAGE}.blocks._route", f"{PACKAGE}._client", True) in by_importer


def test_private_modules_never_import_blocks_tasks_or_flows() -> None:
    """The private core is beneath the public layers: it speaks to a route through the
    `_routes.Route` protocol, never through a block class, even for types."""
    upward = [
        f"{i.importer} imports {i.imported} (line {i.line})"
        for i in IMPORTS
        if _is_private_core(i.importer) and _layer(i.imported)
    ]
    assert upward == []


@pytest.mark.parametrize("layer", PUBLIC_LAYERS)
def test_a_layer_imports_only_the_layers_beneath_it(layer: str) -> None:
    """Blocks import no task or flow; tasks import no flow."""
    above = PUBLIC_LAYERS[PUBLIC_LAYERS.index(layer) + 1 :]
    upward = [
        f"{i.importer} imports {i.imported} (line {i.line})"
        for i in IMPORTS
        if i.importer.startswith(layer) and _layer(i.imported) in above
    ]
    assert upward == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(edges.get(module, ())):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return components


def test_no_import_cycle_at_run_time() -> None:
    """No module reaches itself through the imports that run, at import time or later
    inside a function: each module can be read, and changed, knowing only those below."""
    edges: dict[str, set[str]] = {}
    for i in IMPORTS:
        if not i.type_only:
            edges.setdefault(i.importer, set()).add(i.imported)
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


MAX_MODULE_LINES = 800


def test_every_module_can_be_read_alone() -> None:
    """No module outgrows a sitting: the emulator, the largest part, is a package of its
    protocols."""
    long = {
        m: n
        for m, p in MODULES.items()
        if (n := len(p.read_text().splitlines())) >= MAX_MODULE_LINES
    }
    assert long == {}
