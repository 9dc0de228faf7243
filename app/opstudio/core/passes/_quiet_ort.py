"""Keeping onnxruntime's quantization tools off the user's screen, and nothing else.

Those tools talk to the user directly: advice through the root logger (``logging.warning`` in
``quantize.py``, ``qdq_quantizer.py``…), progress through named ``onnxruntime.*`` loggers and
bare ``print`` calls (the calibrators), and ``matmul_nbits_quantizer`` even calls
``logging.basicConfig(level=INFO)`` when it is imported. The app runs them on worker threads, so
silencing must not change what the rest of the process logs or prints meanwhile:

- records that onnxruntime's own files log on the root logger, below ERROR, are dropped by a
  filter on the root logger; the ``onnxruntime`` logger (parent of the named ones) is raised to
  ERROR. The root logger's level and other records are left alone.
- ``logging.warning`` configures an unconfigured root logger on first use (and so would that
  import): while a quiet block runs, an unconfigured root holds one handler that hands every
  record to ``logging.lastResort``, exactly what Python does with no handler at all.
- ``sys.stdout`` is wrapped by a gate that drops what the quiet threads write and passes
  everything else through; the original stream is put back when the last quiet block ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO, cast

_ORT_FILES = f"{os.sep}onnxruntime{os.sep}"
_lock = threading.Lock()
_depth: dict[int, int] = {}  # thread id -> how many quiet blocks it is inside


def _quiet_thread() -> bool:
    return threading.get_ident() in _depth


class _DropOrtRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or _ORT_FILES not in record.pathname


class _ToLastResort(logging.Handler):
    """What an unconfigured root logger does: records at or above WARNING go to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        last = logging.lastResort
        if last is not None and record.levelno >= last.level:
            last.handle(record)


class _StdoutGate:
    """``sys.stdout`` for everyone, except that quiet threads write into nothing."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return len(text) if _quiet_thread() else self.stream.write(text)

    def writelines(self, lines: Iterable[str]) -> None:
        if not _quiet_thread():
            self.stream.writelines(lines)

    def flush(self) -> None:
        if not _quiet_thread():
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno…: the real stream's
        return getattr(self.stream, name)


@dataclass
class _Installed:
    handler: logging.Handler | None
    ort_level: int
    stdout: TextIO
    gate: TextIO


_FILTER = _DropOrtRecords()
_installed: _Installed | None = None


def _install() -> _Installed:
    root, ort = logging.getLogger(), logging.getLogger("onnxruntime")
    handler = None
    if not root.handlers:
        handler = _ToLastResort()
        root.addHandler(handler)
    root.addFilter(_FILTER)
    ort_level = ort.level
    ort.setLevel(logging.ERROR)
    stdout = sys.stdout
    # not a TextIO subclass (its abstract methods would all need stubs); it forwards the rest
    gate = cast(TextIO, _StdoutGate(stdout))
    sys.stdout = gate
    return _Installed(handler, ort_level, stdout, gate)


def _uninstall(state: _Installed) -> None:
    root = logging.getLogger()
    root.removeFilter(_FILTER)
    if state.handler is not None:
        root.removeHandler(state.handler)
    logging.getLogger("onnxruntime").setLevel(state.ort_level)
    if sys.stdout is state.gate:  # someone who replaced it since keeps theirs
        sys.stdout = state.stdout


@contextlib.contextmanager
def quiet_onnxruntime_logs() -> Iterator[None]:
    """While the block runs, onnxruntime's Python logging is silent (errors excepted) and what
    this thread prints is dropped; other threads log and print as before. Blocks nest and may
    run on several threads at once."""
    global _installed
    me = threading.get_ident()
    with _lock:
        if _installed is None:
            _installed = _install()
        _depth[me] = _depth.get(me, 0) + 1
    try:
        yield
    finally:
        with _lock:
            _depth[me] -= 1
            if not _depth[me]:
                del _depth[me]
            if not _depth and _installed is not None:
                _uninstall(_installed)
                _installed = None
