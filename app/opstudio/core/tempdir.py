"""opstudio's own temp folder.

Everything opstudio writes temporarily (models handed to a child process, onnxruntime's profile
JSON, the optimized graph it dumps, quantizer scratch files) goes under
``<system temp>/opstudio/`` in a private folder that is removed when the work ends, even on error.
Nothing is ever left in the current directory.

A process that is killed (or a daemon thread cut off at exit) cannot clean up after itself, so
folder names carry the owning process id and the first use in a process removes folders whose
owner is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_OWNED = re.compile(r"^[a-z]+-(\d+)-")
_swept: set[str] = set()
_swept_lock = threading.Lock()  # temp folders are made from worker threads too


def opstudio_temp_root() -> Path:
    """``<system temp>/opstudio``, created on first use (falls back to the system temp folder)."""
    root = Path(tempfile.gettempdir()) / "opstudio"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        if os.access(root, os.W_OK | os.X_OK):
            with _swept_lock:
                first = str(root) not in _swept
                _swept.add(str(root))
            if first:
                sweep_stale(root)
            return root
    except OSError:
        pass
    return Path(tempfile.gettempdir())


def sweep_stale(root: Path) -> int:
    """Remove folders under ``root`` whose owning process no longer exists; returns how many."""
    if sys.platform == "win32":
        return 0
    removed = 0
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            m = _OWNED.match(entry.name)
            if not m or not entry.is_dir() or _alive(int(m.group(1))):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


@contextlib.contextmanager
def opstudio_tempdir(prefix: str = "work-") -> Iterator[Path]:
    """A fresh private folder under :func:`opstudio_temp_root`, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=opstudio_temp_root()))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
