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


def test_only_the_runtime_module_builds_session_options():
    # one session factory: every onnxruntime option a session gets is chosen in one place
    package = ROOT / "app" / "opstudio"
    builders = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                      if "SessionOptions(" in p.read_text(encoding="utf-8"))
    assert builders == ["core/model/runtime.py"], builders


def _private_imports(path: Path, package: Path) -> list[str]:
    """``from X import _name`` and imports of a private module, unless ``path`` lives in the
    package that owns the private module (``passes/`` importing its own ``_helpers``)."""
    import ast

    here = ".".join(("opstudio", *path.relative_to(package).parent.parts))
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
            names = [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            modules, names = [a.name for a in node.names], []
        else:
            continue
        for module in modules:
            parts = module.split(".")
            private = next((i for i, p in enumerate(parts) if p.startswith("_")), None)
            if parts[0] == "opstudio" and private is not None and \
                    ".".join(parts[:private]) != here:
                found.append(f"{path.relative_to(package)}:{node.lineno} imports {module}")
        for module, name in names:
            if not module.startswith("opstudio") or not name.startswith("_") or \
                    name.startswith("__"):
                continue
            own_helper = module == here and (package.parent / module.replace(".", "/")
                                             / f"{name}.py").exists()
            if not own_helper:
                found.append(f"{path.relative_to(package)}:{node.lineno} imports {name} "
                             f"from {module}")
    return found


def test_no_private_names_are_imported_across_modules():
    # a name with a leading underscore belongs to its module; another module that needs it
    # asks for a public name (or, for passes/ helpers, the one re-exported by passes/__init__)
    package = ROOT / "app" / "opstudio"
    found = [hit for p in sorted(package.rglob("*.py")) for hit in _private_imports(p, package)]
    assert not found, "\n".join(found)


def test_the_private_import_check_sees_a_private_import(tmp_path):
    package = tmp_path / "opstudio"
    (package / "core" / "passes").mkdir(parents=True)
    (package / "core" / "passes" / "_helper.py").write_text("")
    outside = package / "core" / "user.py"
    outside.write_text("from opstudio.core.measure.profiler import _rounds\n"
                       "from opstudio.core.passes._helper import x\n"
                       "from opstudio.core.passes import _helper\n"
                       "from onnxscript.rewriter._basics import MatchStatus\n")
    inside = package / "core" / "passes" / "lowrank.py"
    inside.write_text("from opstudio.core.passes import _helper\n"
                      "from opstudio.core.passes._helper import x\n")
    assert _private_imports(outside, package) == [
        "core/user.py:1 imports _rounds from opstudio.core.measure.profiler",
        "core/user.py:2 imports opstudio.core.passes._helper",
        "core/user.py:3 imports _helper from opstudio.core.passes"]
    assert _private_imports(inside, package) == []


MAX_FUNCTION_LINES = 150
MAX_CORE_MODULE_LINES = 800


def _oversized(package: Path) -> list[str]:
    """Functions over MAX_FUNCTION_LINES anywhere in ``package`` and modules of its core over
    MAX_CORE_MODULE_LINES (a line count from ``def`` to its last line, decorators aside)."""
    import ast

    found = []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if name.startswith("core/") and lines > MAX_CORE_MODULE_LINES:
            found.append(f"{name} has {lines} lines (at most {MAX_CORE_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name}() has {length} lines "
                                 f"(at most {MAX_FUNCTION_LINES})")
    return found


def test_no_function_or_core_module_is_too_long_to_read():
    found = _oversized(ROOT / "app" / "opstudio")
    assert not found, "\n".join(found)


def test_the_size_check_sees_a_long_function_and_a_long_core_module(tmp_path):
    package = tmp_path / "opstudio"
    (package / "core").mkdir(parents=True)
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (package / "qt_view.py").write_text(f"def long():\n{body}")
    (package / "core" / "big.py").write_text("x = 1\n" * (MAX_CORE_MODULE_LINES + 1))
    (package / "big_outside_core.py").write_text("x = 1\n" * (MAX_CORE_MODULE_LINES + 1))
    assert _oversized(package) == [
        f"core/big.py has {MAX_CORE_MODULE_LINES + 1} lines (at most {MAX_CORE_MODULE_LINES})",
        f"qt_view.py:1 long() has {MAX_FUNCTION_LINES + 1} lines (at most {MAX_FUNCTION_LINES})"]
