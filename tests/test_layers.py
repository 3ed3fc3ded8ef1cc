"""The layers import one way: engine <- export <- service <- cli / web, and no module cycles.

Read from the source (every import statement, also those inside functions), so a new import that
breaks a rule fails here before it can matter.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {folder: f"fastret.{folder}" for folder in ("engine", "export", "service", "cli", "web")}
FORBIDDEN = {
    "engine": ("fastret.export", "fastret.service", "fastret.cli", "fastret.web"),
    "export": ("fastret.service", "fastret.cli", "fastret.web"),
    "service": ("fastret.cli", "fastret.web"),
}


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in the file names (`from a import b` names a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def source_modules() -> dict[str, Path]:
    """fastret module name -> file, for every module of the layered packages."""
    return {
        f"{package}.{path.stem}": path
        for folder, package in PACKAGES.items()
        for path in sorted((REPO / folder).glob("*.py"))
        if path.stem != "__init__"
    }


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imported_modules(path) & modules.keys() for name, path in modules.items()}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer):
    offending = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in sorted((REPO / layer).glob("*.py"))
        for name in imported_modules(path)
        if name.startswith(FORBIDDEN[layer])
    }
    assert not offending, sorted(offending)


def test_no_module_imports_itself_back_through_others():
    graph = import_graph()
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        for target in sorted(graph[module]):
            if target == trail[0]:
                cycles.append(" -> ".join([*trail, target]))
            elif target not in trail and target > trail[0]:  # each cycle once, from its smallest module
                visit(target, [*trail, target])

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, cycles


def test_the_rules_see_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from fastret.export.onnx_export import read_metadata\n    import fastret.cli.main\n")
    found = imported_modules(sample)
    assert {"fastret.export.onnx_export", "fastret.export.onnx_export.read_metadata", "fastret.cli.main"} <= found
