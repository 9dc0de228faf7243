"""The planner's predictions, pure functions of the scan's measurements: each layer's share of
sensitivity, the options per (layer, role) unit, the predicted-KL limit a top-1 budget starts
from, whether a measurement holds the budget, and the plan for a limit."""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np

from opstudio.core.measure.accuracy import agreement_low
from opstudio.core.plan.budget import Budget
from opstudio.core.plan.llm.advice import Choice, RoleResult, WholeResult
from opstudio.core.plan.llm.judge import half
from opstudio.core.plan.llm.variants import Target, Variant, bytes_saved, mlp_partner

# layers measured alone to rank layer sensitivity (all of them when there are this few)
LAYER_SAMPLES = 8
# a variant whose whole-model time ratio is not below this is not worth any error
MIN_SPEEDUP = 0.98
# plans whose predicted savings differ by less than this share of the step's time are a tie
# (paired decode timings resolve about ±0.5–1 %): the more accurate one is chosen
TIE_SHARE = 0.005


@dataclass
class Option:
    """One technique on one (layer, role) unit: its predicted saving (ms) and error (KL)."""

    variant: str
    gain: float
    err: float
    nodes: list[str]
    covers: tuple[tuple[int, str], ...] = ()  # other units this option takes over


def plan_for_limit(options: Mapping[tuple[int, str], Sequence[Option]], limit: float,
                   start: Mapping[tuple[int, str], Option] | None = None
                   ) -> dict[tuple[int, str], Option]:
    """At most one option per unit, greatest total gain with total error ≤ ``limit``, greedily
    by gain per error (an option that covers other units replaces what they had).

    ``start``: an assignment to upgrade from (one technique everywhere that is known to hold
    the budget): the greedy then only moves units to options that save more. A pure greedy
    from nothing spends the error on the most efficient small steps and can end below what one
    technique everywhere gives."""
    current: dict[tuple[int, str], Option] = dict(start or {})
    locked: set[tuple[int, str]] = {u for o in current.values() for u in o.covers}
    total = sum(o.err for o in current.values())

    def held(unit: tuple[int, str], opt: Option) -> tuple[float, float]:
        units = [unit, *opt.covers]
        return (sum(current[u].gain for u in units if u in current),
                sum(current[u].err for u in units if u in current))

    def best(unit: tuple[int, str]) -> tuple[float, Option] | None:
        if unit in locked or (unit in current and current[unit].covers):
            return None
        top: tuple[float, Option] | None = None
        for opt in options.get(unit, ()):
            if any(u in locked or (u in current and current[u].covers) for u in opt.covers):
                continue
            g0, e0 = held(unit, opt)
            dg, de = opt.gain - g0, opt.err - e0
            if dg <= 0 or total + de > limit * (1 + 1e-9):
                continue
            slope = math.inf if de <= 0 else dg / de
            if top is None or slope > top[0] or (slope == top[0] and dg > top[1].gain - g0):
                top = (slope, opt)
        return top

    heap: list[tuple[float, int, tuple[int, str]]] = []
    order = {u: i for i, u in enumerate(sorted(options))}
    for unit in options:
        b = best(unit)
        if b is not None:
            heapq.heappush(heap, (-b[0], order[unit], unit))
    while heap:
        neg, _, unit = heapq.heappop(heap)
        b = best(unit)
        if b is None:
            continue
        if b[0] < -neg * (1 - 1e-9):
            heapq.heappush(heap, (-b[0], order[unit], unit))
            continue
        opt = b[1]
        _, e0 = held(unit, opt)
        total += opt.err - e0
        for u in opt.covers:
            current.pop(u, None)
            locked.add(u)
        current[unit] = opt
        again = best(unit)
        if again is not None:
            heapq.heappush(heap, (-again[0], order[unit], unit))
    return current


class Held(NamedTuple):
    """A plan that held the budget: its predicted-KL limit, recipe, choices and measured
    (top-1, KL)."""

    limit: float
    recipe: Any
    chosen: list[Choice]
    measured: tuple[float | None, float | None]


def most_accurate_of_fastest(holding: Sequence[Held], tie_ms: float) -> Held:
    """Of the plans that held the budget (limit, recipe, choices, (top-1, KL)), the most
    accurate among those whose predicted saving is within ``tie_ms`` of the greatest: savings
    closer than the timing can tell apart are a tie, and the margin a tie leaves to the budget
    is what carries the plan over to text it was not judged on."""
    def saving(h: Held) -> float:
        return sum(c.gain_ms for c in h[2])

    top = max(saving(h) for h in holding)
    ties = [h for h in holding if saving(h) >= top - tie_ms]
    return max(ties, key=lambda h: (-math.inf if h[3][0] is None else h[3][0],
                                    -(h[3][1] if h[3][1] is not None else math.inf),
                                    saving(h)))


def needed_agreement(budget: float, positions: int, confidence: float) -> float | None:
    """The least measured top-1 agreement on ``positions`` whose lower bound holds ``budget``
    (None: not even agreement everywhere does)."""
    for agree in range(math.floor(budget * positions), positions + 1):
        if agreement_low(agree / positions, positions, confidence) >= budget - 1e-12:
            return agree / positions
    return None


def layer_weights(layer_kl: Mapping[int, float], layers: Sequence[int]) -> dict[int, float]:
    """Each layer's share of sensitivity, interpolated between measured layers; sums to 1."""
    if not layers:
        return {}
    known = sorted((k, max(v, 0.0)) for k, v in layer_kl.items() if v is not None)
    if not known:
        return {layer: 1.0 / len(layers) for layer in layers}
    xs = np.array([k for k, _ in known], float)
    ys = np.array([v for _, v in known], float)
    raw = {layer: float(np.interp(layer, xs, ys)) for layer in layers}
    floor = max(1e-12, 0.01 * max(raw.values()))
    raw = {k: max(v, floor) for k, v in raw.items()}
    s = sum(raw.values())
    return {k: v / s for k, v in raw.items()}


def sample_layers(layers: Sequence[int], count: int = LAYER_SAMPLES) -> list[int]:
    """First two, last two and evenly between: LLMs' first and last layers are the sensitive
    ones, the middle is smooth enough to interpolate."""
    layers = sorted(set(layers))
    if len(layers) <= count:
        return layers
    picks = {layers[0], layers[1], layers[-2], layers[-1]}
    for x in np.linspace(0, len(layers) - 1, count - 2):
        picks.add(layers[round(float(x))])
    return sorted(picks)


def top1_from_kl(kl: float, kl_se: float | None, fit: tuple[float, float],
                 confidence: float) -> float:
    """The top-1 agreement that ``fit`` (``fit_top1``'s ``a``, ``b``) gives the upper bound
    of a mean KL at ``confidence``."""
    z = NormalDist().inv_cdf(confidence)
    kl_high = max(kl + z * (kl_se or 0.0), 0.0)
    return 1.0 - min(1.0, fit[0] * kl_high ** fit[1])


def fit_top1(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``disagreement ≈ a · KL^b`` fitted on measured (KL, top-1) pairs, to turn a top-1 budget
    into a predicted-KL limit (only the first guess: the limit is then searched by measuring)."""
    xy = [(math.log(kl), math.log(1 - t)) for kl, t in points
          if kl is not None and t is not None and kl > 1e-9 and t < 1.0]
    if len(xy) < 2:
        return 1.0, 0.5  # disagreement ≈ √KL: the usual shape at small KL
    x = np.array([p[0] for p in xy])
    y = np.array([p[1] for p in xy])
    if np.ptp(x) < 1e-6:
        return float(math.exp(np.mean(y - 0.5 * x))), 0.5
    b, _ = np.polyfit(x, y, 1)
    b = float(min(max(b, 0.2), 1.5))
    return float(math.exp(np.mean(y - b * x))), b


def pays(w: WholeResult | Mapping[str, Any]) -> bool:
    """A whole-model variant measurably faster than the original (by ``MIN_SPEEDUP``)."""
    ratio, high = ((w.ratio, w.high) if isinstance(w, WholeResult)
                   else (w.get("ratio"), w.get("high")))
    return bool(ratio) and ratio is not None and high is not None \
        and ratio < MIN_SPEEDUP and high < 1.0


def unit_options(whole: Sequence[WholeResult], roles: Sequence[RoleResult],
                 role_nodes: Mapping[tuple[str, str], Sequence[Target]],
                 weights: Mapping[int, float], targets: Sequence[Target],
                 usable: Mapping[str, Sequence[Target]], variants: Mapping[str, Variant],
                 base_ms: float, phase: str
                 ) -> tuple[dict[tuple[int, str], list[Option]], list[str]]:
    """Options per (layer, role) unit: the role's error shared out by layer sensitivity, the
    variant's whole-model saving shared out by the weight bytes each node stops reading; and
    a note for each variant left out because it is not measurably faster."""
    options: dict[tuple[int, str], list[Option]] = {}
    notes: list[str] = []
    for w in whole:
        v = variants[w.variant]
        if w.ratio is None or w.high is None or w.ratio >= MIN_SPEEDUP or w.high >= 1.0:
            notes.append(f"{v.label}: not measurably faster on the {phase} step "
                         f"({'?' if w.ratio is None else f'{w.ratio:.3f}'}× the time); not planned")
            continue
        saving = base_ms * (1.0 - w.ratio)
        shares = {t.node: bytes_saved(v, t) for t in usable[v.id]}
        total_share = sum(shares.values()) or 1.0
        for r in roles:
            if r.variant != v.id or r.kl is None:
                continue
            for t in role_nodes[(v.id, r.role)]:
                lw = weights.get(t.layer, 1.0) if t.layer is not None else 1.0
                covers: tuple[tuple[int, str], ...] = ()
                if v.technique == "prune":
                    covers = tuple((t.unit[0], x.role) for x in targets
                                   if x.layer == t.layer and x.role != t.role
                                   and mlp_partner(x.role, t.role))
                options.setdefault(t.unit, []).append(Option(
                    v.id, saving * shares[t.node] / total_share, r.kl * lw, [t.node], covers))
    return options, notes


def first_limit(budget: Budget, measured: Sequence[tuple[float | None, float | None]]
                ) -> tuple[float, tuple[float, float], str | None]:
    """The predicted-KL limit the search starts from, the KL→top-1 fit it came from and a note
    of that fit: a KL budget is its own limit; a top-1 budget is turned into one by
    ``fit_top1`` over the scan's measured (KL, top-1) pairs."""
    if budget.max_kl is not None:
        return budget.max_kl, (1.0, 0.5), None
    a, b = fit_top1([(k, t) for k, t in measured if k is not None and t is not None])
    min_top1 = float(budget.min_top1 or 0.0)
    guess = ((1.0 - min_top1) / a) ** (1.0 / b) if min_top1 < 1 else 0.0
    return guess, (a, b), (f"top-1 against KL over the scan's measurements: disagreement ≈ "
                           f"{a:.3g} · KL^{b:.2f}")


@dataclass(frozen=True)
class Judge:
    """Whether a measurement holds ``budget``: on the confirming half, by the budget's
    confidence bound, and a top-1 budget also by the top-1 its KL predicts through ``fit``."""

    budget: Budget
    fit: tuple[float, float] = (1.0, 0.5)

    def predicted_top1(self, c: Mapping[str, Any]) -> float | None:
        """Top-1 as the KL→top-1 relation fitted on every measurement of the scan puts it at
        the upper bound of ``c``'s KL. Top-1 on a few hundred positions moves by ±2 % with
        the positions alone (two plans 0.02 apart in top-1 can be ordered the other way in
        KL), while KL is continuous and the fit pools dozens of measurements: a plan whose
        count of agreements came out lucky still shows its KL (on another prompt, plans
        passed at top-1 0.93–0.94 with KL 0.03 agreed on 0.89)."""
        budget = self.budget
        if budget.min_top1 is None or budget.confidence <= 0.5 or c.get("kl") is None:
            return None
        return top1_from_kl(c["kl"], c.get("kl_se"), self.fit, budget.confidence)

    def holds(self, res: Mapping[str, Any] | None) -> bool:
        c = half(res or {}, "confirm")
        predicted = self.predicted_top1(c)
        return self.budget.holds_next_token(c.get("top1"), c.get("kl"), c.get("positions"),
                                            c.get("kl_se")) \
            and (predicted is None or predicted >= (self.budget.min_top1 or 0.0))


def holding_everywhere(whole: Sequence[WholeResult], judge: Judge) -> list[WholeResult]:
    """The variants that are faster on every node they take and hold the budget there,
    fastest first: the fastest is a plan already, which the search upgrades unit by unit."""
    return sorted((w for w in whole if w.speedup is not None and w.high is not None
                   and w.high < 1.0 and w.ratio is not None and w.ratio < MIN_SPEEDUP
                   and judge.holds(w.confirm)),
                  key=lambda w: w.ratio or 1.0)


def assignment_of(options: Mapping[tuple[int, str], Sequence[Option]], variant: str
                  ) -> dict[tuple[int, str], Option]:
    """``variant``'s option on every unit it has one."""
    out: dict[tuple[int, str], Option] = {}
    for unit, opts in options.items():
        mine = next((o for o in opts if o.variant == variant), None)
        if mine is not None:
            out[unit] = mine
    return out
