"""The design card's import rule: dicom_node and train may use ai and db; ai and db use neither of the others."""

from __future__ import annotations

import ast

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
