"""Atomic writes for everything opstudio saves (reports, recipes, traces, models)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from opstudio.core.errors import OpstudioError


def _read_umask() -> int:
    # the only way to read it is to set it: done once, at import, before any worker thread
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename.

    A reader never sees a half-written file, and a failure leaves no partial file behind.
    """
    p = Path(path)
    if p.is_dir():
        raise OpstudioError(f"{p}: is a directory")
    if p.exists() and not overwrite:
        raise OpstudioError(f"{p}: already exists (choose another name or allow overwriting)")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise OpstudioError(f"{p}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=folder)
    try:
        # mkstemp makes the file 0600; give it what a plain open() would (0644 under umask 022)
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def write_text_atomic(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), overwrite=overwrite)
