"""``opstudio.core`` must run headless: importing all of it loads no Qt binding."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import opstudio.core

QT_MODULES = ("PySide6", "pyqtgraph", "shiboken6", "PyQt5", "PyQt6")


def test_core_modules_import_no_qt():
    names = sorted(m.name for m in pkgutil.walk_packages(opstudio.core.__path__, "opstudio.core."))
    assert "opstudio.core.model.graph" in names and "opstudio.core.model.model_io" in names
    script = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {QT_MODULES!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [], f"opstudio.core pulled in Qt: {loaded}"
