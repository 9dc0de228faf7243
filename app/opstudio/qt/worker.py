"""The one way the app runs long work off the UI thread.

A ``Worker`` wraps a core function that takes ``progress`` and ``cancelled`` keyword callbacks
(see docs/design.md) and runs it in a ``QThreadPool``. Its ``signals`` object lives in the UI
thread, so connected slots run there: ``started``, ``progress(fraction, message)``,
``result(object)`` or ``error(str)`` (or ``cancelled()``), then always ``finished``. An error
also comes as ``failed(WorkerFailure)``: the same one-line message plus the traceback (with the
chain of causes, e.g. onnxruntime's own error), which the app shows under "Details".
``cancel()`` only sets a flag; the core function polls it and raises ``Cancelled`` within a
fraction of a second.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal

from opstudio.core.errors import Cancelled, ContractBroken, OpstudioError


@dataclass(frozen=True)
class WorkerFailure:
    message: str  # one line, in words a user understands
    details: str  # the traceback, causes included


class WorkerSignals(QObject):
    started = Signal()
    progress = Signal(float, str)
    result = Signal(object)
    error = Signal(str)
    failed = Signal(object)  # WorkerFailure
    cancelled = Signal()
    finished = Signal()


class Worker(QRunnable):
    """Runs ``fn(*args, progress=..., cancelled=..., **kwargs)`` on the global thread pool."""

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str = "", **kwargs: Any) -> None:
        super().__init__()
        self.setAutoDelete(False)  # the owner keeps a reference and may ask about it later
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.name = name or getattr(fn, "__name__", "work")
        self.signals = WorkerSignals()
        self._cancel = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    def is_cancelled(self) -> bool:
        return self._cancel.is_set()

    def is_done(self) -> bool:
        return self._done.is_set()

    def start(self, pool: QThreadPool | None = None) -> Worker:
        (pool or QThreadPool.globalInstance()).start(self)
        return self

    def run(self) -> None:  # called in a pool thread
        try:
            self._emit("started")
            value = self.fn(*self.args, progress=self._progress, cancelled=self.is_cancelled,
                            **self.kwargs)
            if self.is_cancelled():
                self._emit("cancelled")
            else:
                self._emit("result", value)
        except Cancelled:
            self._emit("cancelled")
        except OpstudioError as exc:
            self._fail(_one_line(str(exc)), exc)
        except ContractBroken as exc:  # a defect of a pass: the traceback goes with the report
            traceback.print_exc()
            self._fail(f"{self.name}: internal error: {exc.report_line()}", exc)
        except MemoryError as exc:
            self._fail(f"{self.name}: out of memory", exc)
        except Exception as exc:  # a bug must not take the app down: report it in words
            traceback.print_exc()
            self._fail(f"{self.name}: unexpected {type(exc).__name__}: {_one_line(str(exc))}", exc)
        finally:
            self._done.set()
            self._emit("finished")

    def _fail(self, message: str, exc: BaseException) -> None:
        details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if isinstance(exc, ContractBroken):  # the part that ran in a child process, if any
            details += getattr(exc, "child_traceback", "")
        self._emit("failed", WorkerFailure(message, details))
        self._emit("error", message)

    def _emit(self, signal: str, *args: Any) -> None:
        # the app may quit while this runs and delete the signals object: no one to tell then
        with contextlib.suppress(RuntimeError):
            getattr(self.signals, signal).emit(*args)

    def _progress(self, fraction: float, message: str = "") -> None:
        self._emit("progress", float(max(0.0, min(1.0, fraction))), str(message))


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "failed"
