"""Where figures measured on this machine are kept, and the key they are filed under.

The roofline's ceilings and the MatMulNBits accuracy-level timings are measured once per machine
and onnxruntime version; both files live in one per-user cache folder.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "opstudio"


def machine_key(threads: int) -> str:
    """This machine, thread count and onnxruntime version: a figure measured under another key
    says nothing about this one."""
    import onnxruntime as ort

    return f"{platform.node()}|{platform.machine()}|{os.cpu_count()}|{threads}|{ort.__version__}"
