"""The callbacks every long core function takes: progress (fraction, message) and cancel."""

from __future__ import annotations

from collections.abc import Callable
from typing import overload

from opstudio.core.errors import Cancelled

Progress = Callable[[float, str], None]
CancelCheck = Callable[[], bool]


def clamped(progress: Progress | None) -> Progress:
    """``progress`` with fractions held to 0..1; a no-op when there is none."""
    def say(fraction: float, message: str) -> None:
        if progress is not None:
            progress(max(0.0, min(1.0, fraction)), message)

    return say


def stopper(cancelled: CancelCheck | None) -> Callable[[], None]:
    """A call that raises ``Cancelled`` once the user asked to stop."""
    def stop() -> None:
        if cancelled is not None and cancelled():
            raise Cancelled()

    return stop


@overload
def part(say: Progress, lo: float, hi: float, label: str = "") -> Progress: ...


@overload
def part(say: Progress | None, lo: float, hi: float, label: str = "") -> Progress | None: ...


def part(say: Progress | None, lo: float, hi: float, label: str = "") -> Progress | None:
    """A sub-task's progress, reported as the share ``lo`` .. ``hi`` of the whole, its messages
    after ``label: `` when one is given; None when there is no progress to report to (a callee
    may skip work nobody watches)."""
    if say is None:
        return None
    reported = say

    def sub(fraction: float, message: str) -> None:
        reported(lo + (hi - lo) * max(0.0, min(1.0, fraction)),
                 f"{label}: {message}" if label else message)

    return sub
