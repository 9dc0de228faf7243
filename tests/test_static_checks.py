"""The static checks CI runs through the README's test command: mypy on the package and
import-linter's contracts (a pure core, no CLI under the Qt layer, no import cycles), both as
configured in pyproject.toml. A failure prints the tool's own report."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_tool(args: list[str], tool: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if "No module named" in proc.stderr and tool in proc.stderr:
        pytest.fail(f"{tool} is not installed: run python3 -m pip install -e \".[test]\"")
    return proc


@pytest.mark.slow
def test_mypy_is_clean():
    # files, Python version and the untyped third-party modules come from [tool.mypy]
    proc = run_tool(["-m", "mypy"], "mypy")
    if proc.returncode != 0:
        pytest.fail(f"mypy found errors:\n{proc.stdout}{proc.stderr}", pytrace=False)
    assert "Success" in proc.stdout


def test_import_contracts_are_kept():
    proc = run_tool(["-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", "--no-logo"], "importlinter")
    if proc.returncode != 0:
        pytest.fail(f"lint-imports found broken contracts:\n{proc.stdout}{proc.stderr}",
                    pytrace=False)
    kept = re.search(r"Contracts: (\d+) kept, 0 broken", proc.stdout)
    assert kept and int(kept.group(1)) >= 3, proc.stdout  # the contracts were read and checked


def test_only_ort_session_builds_session_options():
    # one session factory: every onnxruntime option a session gets is chosen in one place
    package = ROOT / "app" / "opstudio"
    builders = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                      if "SessionOptions(" in p.read_text(encoding="utf-8"))
    assert builders == ["core/ort_session.py"], builders
