"""The code's shape, held by tools: import-linter's contracts (pyproject.toml), no import cycle, no
private name imported across modules, ruff's lint and format settings, and the tests' own layout."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mlx_gemma4u"


def tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return path


def test_the_import_contracts_hold():
    run = subprocess.run([tool("lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]


def test_the_import_graph_has_no_cycle():
    graph = grimp.build_graph("mlx_gemma4u")
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == 1:
                return path[path.index(imported) :] + [imported] if imported in path else [module, imported]
            if imported not in state:
                cycle = visit(imported, path + [imported])
                if cycle:
                    return cycle
        state[module] = 2
        return None

    for module in sorted(graph.modules):
        if module not in state:
            cycle = visit(module, [module])
            assert cycle is None, " -> ".join(cycle)


def test_no_private_name_is_imported_from_another_module():
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx_gemma4u"):
                found += [
                    f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                ]
    assert found == []


def test_ruff_lint_and_format_pass():
    lint = subprocess.run([tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-3000:]
    form = subprocess.run([tool("ruff"), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert form.returncode == 0, form.stdout[-3000:]


def test_tests_are_grouped_by_kind_and_helpers_live_apart():
    """Every test module sits in a group folder, every other module in support/, and no helper is
    named like a test (pytest would collect it)."""
    tests = ROOT / "tests"
    groups = {p.name for p in tests.iterdir() if p.is_dir() and p.name not in ("support", "__pycache__")}
    assert groups == {"processing", "models", "weights", "generation", "training", "distributed", "apps", "project"}
    for path in tests.rglob("*.py"):
        folder = path.parent.relative_to(tests).as_posix()
        if path.name == "conftest.py":
            assert folder == ".", path
        elif path.name.startswith("test_"):
            assert folder in groups, f"{path} is a test outside the group folders"
        else:
            assert folder == "support", f"{path} is a helper outside tests/support"
