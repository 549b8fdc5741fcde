"""The design card's import rules: dicom_node and train may use ai and db; ai and db use neither of the others; and
the project's modules import one another without cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import REPO

FORBIDDEN = {"ai": {"dicom_node", "train", "db"}, "db": {"dicom_node", "train", "ai"}}


def imported_packages(path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_upper_ones(package):
    for path in sorted((REPO / package).rglob("*.py")):
        bad = imported_packages(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_ai_does_not_network():
    for path in sorted((REPO / "ai").rglob("*.py")):
        assert not imported_packages(path) & {"pynetdicom", "socket", "sqlalchemy", "requests", "urllib"}, path


# --- no import cycles ---------------------------------------------------------------------------------------------

PACKAGES = ("ai", "db", "dicom_node", "train")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages (a package is its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _type_checking_only(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def project_imports(name: str, path: Path, modules: dict[str, Path], module_level: bool = True) -> set[str]:
    """The project modules that importing ``name`` imports: its module-level import statements (also inside
    top-level ``if``/``try``, never under ``if TYPE_CHECKING``), or with ``module_level=False`` every import
    statement, those inside functions included. Importing ``a.b.c`` also imports the packages ``a`` and ``a.b``;
    a module's own enclosing packages are left out (they are always imported before it, which is no cycle)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    enclosing = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    found: set[str] = set()

    def add(target: str) -> None:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            module = ".".join(parts[:i])
            if module in modules and module != name and module not in enclosing:
                found.add(module)

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")[:package.count(".") + 2 - node.level]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:  # "from a import b" imports the module a.b when there is one
                    add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            elif isinstance(node, ast.If):
                if not _type_checking_only(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])
            elif not module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                        ast.With, ast.For, ast.While)):
                visit(node.body)

    visit(ast.parse(path.read_text(), filename=str(path)).body)
    return found


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [m1, m2, ..., m1], or None when there is none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_module_level_imports_between_the_project_modules_have_no_cycles():
    modules = project_modules()
    graph = {name: project_imports(name, path, modules) for name, path in modules.items()}
    assert graph["ai.classifier"] >= {"ai.resnet", "ai.explain"}  # the network and its heat map, imported at the top
    assert not graph["ai.models"] & {"ai.classifier", "ai.segment"}, "ai.models loads the networks only when used"
    cycle = import_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_ai_has_no_import_cycle_even_through_imports_inside_functions():
    """A lazy import inside a function must not hide a cycle either (ai.classifier -> ai.models -> ai.segment ->
    ai.models was one): nothing that ai.models imports imports it back."""
    modules = {name: path for name, path in project_modules().items() if name.split(".")[0] == "ai"}
    graph = {name: project_imports(name, path, modules, module_level=False) for name, path in modules.items()}
    cycle = import_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": set()}) is None
