"""The layers of docs/design.md hold: import-linter's contract (pyproject.toml) passes on uvic/ and fails on a copy
with one upward import; uvic's own modules are imported at module level, except where a comment gives the reason."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` run as a user would, in `root` (its pyproject.toml, its uvic/)."""
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": str(LINT_IMPORTS.parent)})


def test_the_layers_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 1 kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "uvic", tmp_path / "uvic", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    model = tmp_path / "uvic" / "model.py"
    model.write_text(model.read_text() + "\n\ndef late():\n    from .trainer import Trainer\n\n    return Trainer\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1
    assert "uvic.model is not allowed to import uvic.trainer" in result.stdout


def function_level_imports(path: Path):
    """(line, text) of each import of a uvic module inside a function of `path`."""
    lines = path.read_text().splitlines()
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("uvic")):
                found.append((node.lineno, lines[node.lineno - 1].strip()))
    return found


def test_uvic_modules_are_imported_at_module_level_unless_a_comment_says_why():
    unexplained = [f"{path.relative_to(ROOT)}:{line}: {text}" for path in sorted((ROOT / "uvic").rglob("*.py"))
                   for line, text in function_level_imports(path) if "(" not in text.partition("#")[2]]
    assert not unexplained, "function-level imports without a reason comment:\n" + "\n".join(unexplained)
