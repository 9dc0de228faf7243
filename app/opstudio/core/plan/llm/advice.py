"""What the next-token advisor hands back: the scan's measurements, the frontier of agreement
against speedup, and the plan."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from opstudio.core.plan.budget import Budget
from opstudio.core.plan.llm.variants import Variant
from opstudio.core.plan.recipe import Recipe


@dataclass
class RoleResult:
    variant: str
    role: str
    nodes: list[str]
    top1: float | None = None
    kl: float | None = None
    error: str | None = None


@dataclass
class WholeResult:
    """A variant on every node it takes: accuracy, and decode time against the original."""

    variant: str
    nodes: int
    top1: float | None = None
    kl: float | None = None
    ratio: float | None = None  # time after / before, median of interleaved pairs
    low: float | None = None
    high: float | None = None
    error: str | None = None
    confirm: dict[str, Any] | None = None  # on the confirming half of the judged tokens

    @property
    def speedup(self) -> float | None:
        return None if not self.ratio else 1.0 / self.ratio


@dataclass
class FrontierPoint:
    label: str
    top1: float | None
    kl: float | None
    speedup: float | None
    low: float | None = None  # speedup interval
    high: float | None = None
    kind: str = "plan"  # "plan" or "whole"
    limit: float | None = None  # the predicted-KL limit of a plan
    holds: bool = False


@dataclass
class Choice:
    """What the plan does to one (layer, role) unit."""

    layer: int
    role: str
    variant: str
    nodes: list[str]
    gain_ms: float
    kl: float


@dataclass
class LlmAdvice:
    budget: Budget
    phase: str
    base_ms: float
    variants: list[Variant]
    roles: list[RoleResult]
    whole: list[WholeResult]
    layer_kl: dict[int, float]
    layer_measured: list[int]
    chosen: list[Choice]
    recipe: Recipe
    verified: dict[str, float | None] | None
    speedup: FrontierPoint | None
    frontier: list[FrontierPoint]
    refused: dict[str, dict[str, str]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    seconds: float = 0.0
    nothing_applies: str | None = None
    # the fusion applied before the plan (its step leads the recipe), and what each one tried
    # measured; None when fusion was not tried
    fusion: dict[str, Any] | None = None

    def variant(self, vid: str) -> Variant:
        return next(v for v in self.variants if v.id == vid)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "llm", "budget": self.budget.to_json(), "phase": self.phase,
            "base_ms": self.base_ms, "variants": [v.to_json() for v in self.variants],
            "roles": [asdict(r) for r in self.roles], "whole": [asdict(w) for w in self.whole],
            "layer_kl": {str(k): v for k, v in self.layer_kl.items()},
            "layer_measured": list(self.layer_measured),
            "chosen": [asdict(c) for c in self.chosen],
            "recipe": self.recipe.to_json(), "verified": self.verified,
            "speedup": None if self.speedup is None else asdict(self.speedup),
            "frontier": [asdict(p) for p in self.frontier],
            "refused": self.refused, "log": list(self.log), "seconds": self.seconds,
            "nothing_applies": self.nothing_applies,
            **({} if self.fusion is None else {"fusion": self.fusion})}


# --- targets -------------------------------------------------------------------------------


def fmt(x: float | None) -> str:
    """A measured figure in a log line ("?" when it could not be measured)."""
    return "?" if x is None else f"{x:.4g}"
