"""Nothing read from a file is ever unpickled or evaluated."""

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "app" / "opstudio"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def test_no_pickle_eval_or_exec_in_the_app():
    offenders = []
    for path in APP.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal")
                       for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports a pickle module")
        for node, _owner, name in _calls(tree):
            if name in ("eval", "exec") and not isinstance(node.func, ast.Attribute):
                offenders.append(f"{path.name}:{node.lineno} calls {name}()")
    assert offenders == []


def test_every_numpy_load_refuses_pickles():
    loads = []
    for path in APP.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, owner, name in _calls(tree):
            if owner == "np" and name == "load":
                loads.append(path.name)
                kwargs = {k.arg: k.value for k in node.keywords}
                assert "allow_pickle" in kwargs, f"{path.name}:{node.lineno}"
                assert isinstance(kwargs["allow_pickle"], ast.Constant)
                assert kwargs["allow_pickle"].value is False, f"{path.name}:{node.lineno}"
    assert loads  # the .npz readers exist and were checked
