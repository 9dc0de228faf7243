"""The search for the plan's predicted-KL limit, by measuring (in the manner of a search
strategy that suggests the next point and is told how it went): double while plans hold, quarter
while they don't, then bisect geometrically between the largest that held and the smallest that
did not."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from opstudio.core.progress import Progress

# predicted-KL limits tried around the first guess, and the bisection steps between
MAX_VERIFY = 7
# the bisection stops when the limits that held and failed are closer than this ratio
CLOSE = 1.3


@dataclass
class LimitSearch:
    """``guess``: the first limit; ``max_err``: the largest error of any one option (a limit
    above it admits every option, so a plan that changes nothing there ends the search);
    ``lo``: a limit known to hold (the starting plan's), if any."""

    guess: float
    max_err: float
    lo: float | None = None
    hi: float | None = None
    steps: int = MAX_VERIFY
    tried: list[tuple[float, bool]] = field(default_factory=list)
    _next: float | None = None
    _done: bool = False

    def __post_init__(self) -> None:
        self._next = self.guess

    def suggest(self) -> float | None:
        """The next limit to measure a plan at, or None when the search is over."""
        if self._done or len(self.tried) >= self.steps or self._next is None:
            return None
        return self._next

    def record(self, limit: float, held: bool | None) -> None:
        """How the plan at ``limit`` did: held, failed, or None (an empty plan: nothing to
        measure, which counts as holding)."""
        self.tried.append((limit, True if held is None else held))
        if held is None or held:
            self.lo = limit
            if held is None and self.hi is None and self.max_err <= limit:
                self._done = True
                return
        else:
            self.hi = limit
        if self.hi is None:
            self._next = limit * 2
        elif self.lo is None:
            self._next = limit / 4
        elif self.hi / self.lo < CLOSE:
            self._done = True
        else:
            self._next = math.sqrt(self.lo * self.hi)

    def run(self, measure: Callable[[float], bool | None], say: Progress,
            stop: Callable[[], None]) -> None:
        """Measures plans at the suggested limits until the search is over (progress from
        0.75 to 0.9 of the advice)."""
        while (limit := self.suggest()) is not None:
            stop()
            say(0.75 + 0.15 * len(self.tried) / self.steps, f"verifying a plan at KL ≤ {limit:.3g}")
            self.record(limit, measure(limit))
