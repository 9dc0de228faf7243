"""What an advisor plans within, and what it asks of a plan: the accuracy budget, and the
``verify`` and ``timer`` both advisors take (the cosine/SNR one in ``advisor``, the next-token one
in ``plan.llm``), so either can be handed measurements made elsewhere."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Protocol

from opstudio.core.errors import OpstudioError
from opstudio.core.measure.accuracy import agreement_low
from opstudio.core.measure.timing import Ratio
from opstudio.core.plan.recipe import Recipe

# One-sided confidence at which a next-token budget must hold on the judged positions.
CONFIDENCE = 0.9


@dataclass(frozen=True)
class Budget:
    """Exactly one accuracy budget: cosine or SNR on every output (any model), or next-token
    top-1 agreement or KL divergence on the logits (language models, see ``plan.llm``)."""

    min_cosine: float | None = None
    min_snr_db: float | None = None
    min_top1: float | None = None
    max_kl: float | None = None
    # next-token budgets: the plan must hold by a one-sided bound at this confidence on the
    # judged positions, not just on average: a plan picked because it lands right at the
    # budget on one text lands below it on the next text about half the time
    confidence: float = CONFIDENCE

    def __post_init__(self) -> None:
        given = [x for x in (self.min_cosine, self.min_snr_db, self.min_top1, self.max_kl)
                 if x is not None]
        if len(given) != 1:
            raise OpstudioError("give exactly one accuracy budget: a cosine, an SNR in dB, a "
                                "next-token top-1 agreement or a KL divergence")
        if self.min_cosine is not None and not 0.0 < self.min_cosine <= 1.0:
            raise OpstudioError(f"cosine budget {self.min_cosine} must be in (0, 1]")
        if self.min_top1 is not None and not 0.0 < self.min_top1 <= 1.0:
            raise OpstudioError(f"top-1 budget {self.min_top1} must be in (0, 1]")
        if self.max_kl is not None and not (self.max_kl > 0 and math.isfinite(self.max_kl)):
            raise OpstudioError(f"KL budget {self.max_kl} must be a positive number of nats")
        if not 0.5 <= self.confidence < 1.0:
            raise OpstudioError(f"confidence {self.confidence} must be in [0.5, 1): 0.5 judges "
                                "on the measured value alone")

    @property
    def next_token(self) -> bool:
        """Budgeted on a language model's next-token distribution (top-1 or KL)."""
        return self.min_top1 is not None or self.max_kl is not None

    @property
    def max_noise_ratio(self) -> float:
        if self.min_snr_db is not None:
            return 10 ** (-self.min_snr_db / 10)
        if self.min_cosine is None:
            raise OpstudioError("a next-token budget has no noise ratio")
        return 2.0 * (1.0 - float(self.min_cosine))

    def holds(self, cosine: float | None, snr_db: float | None) -> bool:
        if self.min_cosine is not None:
            return cosine is not None and cosine >= self.min_cosine
        if self.min_snr_db is None:
            raise OpstudioError("a next-token budget is judged by holds_next_token")
        return snr_db is not None and snr_db >= self.min_snr_db

    def holds_next_token(self, top1: float | None, kl: float | None,
                         positions: int | None = None, kl_se: float | None = None) -> bool:
        """Top-1 agreement measured on ``positions`` next tokens holds when its lower
        confidence bound does; mean KL when mean + z · its standard error does. Without the
        count (or the error), on the measured value."""
        if self.min_top1 is not None:
            return top1 is not None and \
                agreement_low(top1, positions, self.confidence) >= self.min_top1 - 1e-12
        if self.max_kl is not None:
            z = NormalDist().inv_cdf(self.confidence)
            return kl is not None and kl + z * (kl_se or 0.0) <= self.max_kl
        raise OpstudioError("a cosine or SNR budget is judged by holds")

    def describe(self) -> str:
        if self.min_cosine is not None:
            return f"cosine ≥ {self.min_cosine:g} on every output"
        if self.min_snr_db is not None:
            return f"SNR ≥ {self.min_snr_db:g} dB on every output"
        sure = (f" (at {self.confidence:.0%} confidence on the judged tokens)"
                if self.confidence > 0.5 else "")
        if self.min_top1 is not None:
            return f"next-token top-1 agreement ≥ {self.min_top1:g}{sure}"
        return f"next-token KL ≤ {self.max_kl:g} nats{sure}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"min_cosine": self.min_cosine, "min_snr_db": self.min_snr_db,
                               "min_top1": self.min_top1, "max_kl": self.max_kl}
        if self.next_token:
            out["confidence"] = self.confidence
        return out


@dataclass
class Verification:
    """A plan's measured error end to end: the worst output's cosine and SNR, or, under a
    next-token budget, ``judged``'s top-1 agreement and KL (with their search and confirming
    halves)."""

    cosine: float | None = None
    snr_db: float | None = None
    next_token: dict[str, Any] | None = None


class Verify(Protocol):
    """Applies a recipe to the model and measures its error."""

    def __call__(self, recipe: Recipe, /) -> Verification: ...


class Timer(Protocol):
    """The model under ``plan`` against the model under ``against`` (an empty recipe is the
    original), timed in alternation: time(plan) / time(against)."""

    def __call__(self, plan: Recipe, against: Recipe, /) -> Ratio: ...
