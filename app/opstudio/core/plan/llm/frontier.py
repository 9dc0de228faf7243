"""The frontier of next-token agreement against speedup: every measured plan and every
whole-model variant, each with its speedup (timed, or predicted from the planned savings)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opstudio.core.plan.llm.advice import FrontierPoint, WholeResult
from opstudio.core.plan.llm.variants import Variant


@dataclass
class FrontierRecorder:
    points: list[FrontierPoint] = field(default_factory=list)

    def plan(self, label: str, top1: float | None, kl: float | None, limit: float,
             holds: bool) -> None:
        """A plan measured on the prompt (its speed comes later)."""
        self.points.append(FrontierPoint(label, top1, kl, None, kind="plan", limit=limit,
                                         holds=holds))

    def timed(self, limit: float, speed: FrontierPoint | None) -> None:
        """The chosen plan's timed speedup on every point of its limit (none: left to
        ``predicted``)."""
        for p in self.points:
            if p.limit == limit:
                p.speedup, p.low, p.high = ((speed.speedup, speed.low, speed.high)
                                            if speed else (None, None, None))

    def predicted(self, base_ms: float, gain_at: Callable[[float], float]) -> None:
        """Every other plan's speedup from its predicted saving (``gain_at(limit)``, ms):
        timing each would double the search."""
        for p in self.points:
            if p.speedup is None and p.limit is not None and base_ms > 0:
                p.speedup = base_ms / max(base_ms - gain_at(p.limit), 1e-9)

    def whole(self, whole: Sequence[WholeResult], variants: Mapping[str, Variant],
              holds: Callable[[Any], bool]) -> None:
        """The whole-model variants, as timed in the scan."""
        for w in whole:
            if w.speedup is not None:
                self.points.append(FrontierPoint(variants[w.variant].label, w.top1, w.kl,
                                                 w.speedup, 1.0 / w.high if w.high else None,
                                                 1.0 / w.low if w.low else None, kind="whole",
                                                 holds=holds(w.confirm)))
