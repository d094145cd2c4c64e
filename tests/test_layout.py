"""The package layout's rules: import-linter's contracts (pyproject.toml), sizes, docstrings, tests that mirror it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "pipeline"
MAX_MODULE_LINES = 400
MAX_DEFINITION_LINES = 125  # "about 120": a class or function longer than this is two jobs


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_import_contracts_hold() -> None:
    """Layers, no circles, light worker processes and base layer: `lint-imports` as .ci/run runs it (in a
    process of its own: run in this one, import-linter's logging set-up disables the loggers of later tests)."""
    done = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_module_is_over_400_lines() -> None:
    lines = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in _modules()}
    long = {name: n for name, n in lines.items() if n > MAX_MODULE_LINES}
    assert not long, f"split these modules by job: {long}"


def test_no_class_or_function_is_over_about_120_lines() -> None:
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_DEFINITION_LINES:
                    long[f"{path.relative_to(REPO)}:{node.name}"] = lines
    assert not long, f"split these by job: {long}"


def test_every_module_names_its_job_in_a_one_line_docstring() -> None:
    missing = []
    for path in _modules():
        docstring = ast.get_docstring(ast.parse(path.read_text()), clean=False)
        if not docstring or "\n" in docstring.strip():
            missing.append(str(path.relative_to(REPO)))
    assert not missing, f"give these a one-line module docstring: {missing}"


def test_tests_mirror_the_packages() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    mirrored = {p.name for p in (REPO / "tests").iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert packages <= mirrored, f"add tests/<package>/ for {sorted(packages - mirrored)}"


def test_the_readme_layout_fits_in_15_lines() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    tree = [line for line in section.split("```", 2)[1].split("\n")[1:] if line.strip()]  # less the language tag
    assert 0 < len(tree) <= 15, tree
    for name in (p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        assert f"{name}/" in section, f"README's Layout does not show {name}/"
    assert os.path.isfile(REPO / "docs" / "architecture.md")
