"""The progress line every long command shows on stderr, fed by the core's progress callbacks.

On a terminal: one line redrawn in place (``\\r``), a bar, the percentage and the message cut to
the terminal's width, cleared when the work ends (also on an error, before its message). Into a
log or a pipe: a line now and then, so that a log of an hour-long optimize says where it was
without thousands of lines: nothing for the first seconds (a quick command stays silent), then
a line whenever the work moved on by a tenth, reached its end, or half a minute went by.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from opstudio.core.progress import Progress

BAR = 20  # characters of the bar on a terminal
QUIET_SECONDS = 2.0  # a log gets no line before the work has run this long
STEP = 0.1  # ... then one each time it moved on by this much
EVERY_SECONDS = 30.0  # ... or this long went by


class ProgressLine:
    """A ``progress(fraction, message)`` callback drawing on ``stream`` (may be called from
    any thread)."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        self._shown = 0  # characters drawn on the terminal's line
        self._last: tuple[float, float] | None = None  # (fraction, time) of the last log line

    def __call__(self, fraction: float, message: str) -> None:
        fraction = max(0.0, min(1.0, fraction))
        with self._lock:
            if self.tty:
                self._draw(fraction, message)
            else:
                self._log(fraction, message)

    def _draw(self, fraction: float, message: str) -> None:
        width = shutil.get_terminal_size((80, 24)).columns - 1
        filled = round(BAR * fraction)
        text = f"[{'#' * filled}{'.' * (BAR - filled)}] {fraction:4.0%}  {message}"[:width]
        self.stream.write("\r" + text.ljust(self._shown))
        self.stream.flush()
        self._shown = len(text)

    def _log(self, fraction: float, message: str) -> None:
        now = self.clock()
        if now - self._start < QUIET_SECONDS:
            return
        if self._last is not None:
            done, when = self._last
            finished = fraction >= 1.0 > done
            if fraction - done < STEP - 1e-9 and now - when < EVERY_SECONDS and not finished:
                return
        self._last = (fraction, now)
        self.stream.write(f"[{fraction:4.0%}] {message}\n")
        self.stream.flush()

    def clear(self) -> None:
        with self._lock:
            if self.tty and self._shown:
                self.stream.write("\r" + " " * self._shown + "\r")
                self.stream.flush()
                self._shown = 0


@contextlib.contextmanager
def progress_line(enabled: bool = True) -> Iterator[Progress | None]:
    """A progress callback for the ``with`` block (None when not ``enabled``: the command's
    output goes to stdout as JSON, say), its line cleared afterwards."""
    if not enabled:
        yield None
        return
    line = ProgressLine()
    try:
        yield line
    finally:
        line.clear()
