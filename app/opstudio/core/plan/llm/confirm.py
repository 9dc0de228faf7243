"""Measuring plans: ``PromptVerifier`` (a plan's top-1 and KL on the prompt) and ``StepTimer``
(the decode step under one plan against another) are the ``verify`` and ``timer`` the advisor
takes (``plan.budget``); ``try_limit`` measures the plan at one predicted-KL limit; ``confirm``
times the chosen plan and keeps it only if it is measurably faster (and, when it upgraded a
plan of one technique everywhere, faster than that plan too)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from opstudio.core.errors import OpstudioError
from opstudio.core.measure.timing import Ratio
from opstudio.core.plan.budget import Timer, Verification, Verify
from opstudio.core.plan.llm.advice import Choice, FrontierPoint, fmt
from opstudio.core.plan.llm.frontier import FrontierRecorder
from opstudio.core.plan.llm.judge import half
from opstudio.core.plan.llm.measure import measure_accuracy, measure_speed
from opstudio.core.plan.llm.predict import (
    Held,
    Judge,
    Option,
    assignment_of,
    holding_everywhere,
    plan_for_limit,
)
from opstudio.core.plan.llm.scan import Scan
from opstudio.core.plan.recipe import Recipe
from opstudio.core.progress import CancelCheck

# the final plan-against-start timing runs this many times the scan's time per variant
FINAL_TIMING = 3


def _task(recipe: Recipe) -> str:
    return f"plan|{json.dumps(recipe.to_json(), sort_keys=True)}"


@dataclass
class PromptVerifier:
    """A plan applied and judged on the prompt in a child process (``measure_accuracy``),
    each recipe once."""

    path: str
    prompt: Mapping[str, np.ndarray]
    cache: str | None
    threads: int
    timeout_s: float
    cancelled: CancelCheck | None = None
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __call__(self, recipe: Recipe, /) -> Verification:
        from opstudio.core.isolation import call_isolated

        tid = _task(recipe)
        if tid not in self.seen:
            self.seen[tid] = call_isolated(
                measure_accuracy, self.path, self.prompt, [(tid, recipe.to_json())], self.cache,
                self.threads, timeout=self.timeout_s, cancelled=self.cancelled,
                task="verifying the plan").get(tid, {})
        return Verification(next_token=self.seen[tid])


@dataclass
class StepTimer:
    """The step under ``plan`` against ``against``, both timed against the original in one
    child in alternation (``measure_speed``); a plan against another is timed
    ``FINAL_TIMING`` times longer. What each recipe measured against the original is kept, so
    ``timer(plan, start)`` then ``timer(plan, Recipe([]))`` time once."""

    path: str
    timed: Mapping[str, np.ndarray]
    calibration: Mapping[str, np.ndarray]
    cache: str | None
    threads: int
    time_budget_s: float
    timeout_s: float
    cancelled: CancelCheck | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __call__(self, plan: Recipe, against: Recipe, /) -> Ratio:
        from opstudio.core.isolation import call_isolated

        tid, other = _task(plan), (_task(against) if against.steps else None)
        if tid not in self.results or (other is not None and other not in self.results):
            tasks = [(tid, plan.to_json())] + ([(other, against.to_json())] if other else [])
            self.results.update(call_isolated(
                measure_speed, self.path, self.timed, [self.calibration], tasks, self.cache,
                self.threads, self.time_budget_s * (FINAL_TIMING if other else 1), None,
                timeout=self.timeout_s, cancelled=self.cancelled, task="timing the plan"))
        res = self.results.get(tid, {})
        if other is None and res.get("ratio"):
            return Ratio(res["ratio"], res["low"], res["high"], res.get("rounds", 0))
        versus = res.get("versus", {}).get(other) if other else None
        if versus:
            return Ratio(versus[0], versus[1], versus[2], res.get("rounds", 0))
        raise OpstudioError(f"the plan could not be timed: {res.get('error', 'no result')}")


def ratio_or_none(timer: Timer, plan: Recipe, against: Recipe) -> Ratio | None:
    try:
        return timer(plan, against)
    except OpstudioError:
        return None


def start_from(scan: Scan, options: Mapping[tuple[int, str], list[Option]], judge: Judge,
               frontier: FrontierRecorder
               ) -> tuple[dict[tuple[int, str], Option], Held | None, str]:
    """The fastest technique that holds the budget on every node it takes is a plan already:
    the search upgrades units from there. Its assignment, its plan and its label (none: no
    technique holds everywhere)."""
    holders = holding_everywhere(scan.whole, judge)
    if not holders:
        return {}, None, ""
    w, label = holders[0], scan.vmap[holders[0].variant].label
    start = assignment_of(options, w.variant)
    recipe, chosen = scan.realise(start)
    plan = Held(sum(o.err for o in start.values()), recipe, chosen, (w.top1, w.kl))
    frontier.plan(f"{label} everywhere", w.top1, w.kl, plan.limit, True)
    scan.log.append(f"start: {label} on every node holds the budget (top-1 {fmt(w.top1)}, "
                    f"KL {fmt(w.kl)}, {w.speedup:.2f}×); plans upgrade units from there")
    return start, plan, label


def try_limit(limit: float, options: Mapping[tuple[int, str], list[Option]],
              start: Mapping[tuple[int, str], Option], scan: Scan, verify: Verify,
              judge: Judge, frontier: FrontierRecorder, holding: list[Held]) -> bool | None:
    """The plan for ``limit`` measured on the prompt: whether it holds the budget (None: the
    plan is empty). Logged, put on the frontier, and kept in ``holding`` if it holds."""
    recipe, chosen = scan.realise(plan_for_limit(options, limit, start))
    if not recipe.steps:
        return None
    res = verify(recipe).next_token or {}
    top1, kl = res.get("top1"), res.get("kl")
    ok = judge.holds(res)
    c = half(res, "confirm")
    gain = sum(ch.gain_ms for ch in chosen)
    from_kl = judge.predicted_top1(c)
    scan.log.append(
        f"plan at predicted KL ≤ {limit:.3g}: {len(chosen)} rewrites, predicted "
        f"saving {gain:.3f} ms → top-1 {fmt(top1)}, KL {fmt(kl)}; on the confirming "
        f"half top-1 {fmt(c.get('top1'))}, KL {fmt(c.get('kl'))}"
        f"{'' if from_kl is None else f' (top-1 from its KL: {from_kl:.3f})'}"
        f"{' (holds)' if ok else ''}")
    frontier.plan(f"plan KL≤{limit:.2g}", top1, kl, limit, ok)
    if ok:
        holding.append(Held(limit, recipe, chosen, (top1, kl)))
    return ok


@dataclass
class Confirmed:
    """The plan handed out: its recipe and choices, the measured (top-1, KL) when it holds,
    its timed speedup, and the ``Held`` it came from."""

    recipe: Recipe
    chosen: list[Choice]
    verified: dict[str, float | None] | None
    speed: FrontierPoint | None
    best: Held


def confirm(best: Held, start: Held | None, start_label: str, timer: Timer, phase: str,
            log: list[str]) -> Confirmed:
    """``best`` timed on the step. The upgrades' savings were shared out from whole-model
    ratios that move by a few per cent from run to run, which is all an upgrade may buy: an
    upgraded plan is kept only if it beats its ``start`` in their own paired rounds, timed
    longer; and no plan is kept that is not measurably faster than the original."""
    _, recipe, chosen, (top1, kl) = best
    verified: dict[str, float | None] | None = {"top1": top1, "kl": kl}
    upgraded = start is not None and best.limit != start.limit
    versus = ratio_or_none(timer, recipe, start.recipe) if upgraded and start else None
    res = ratio_or_none(timer, recipe, Recipe([]))
    other = ratio_or_none(timer, start.recipe, Recipe([])) if upgraded and start else None
    upgraded_pays = (versus.high < 1.0 if versus
                     else res is not None and (other.median if other else 1.0) >= res.median)
    if versus:
        log.append(f"the upgraded plan against {start_label} everywhere: "
                   f"{versus.median:.3f}× the time [{versus.low:.3f}, {versus.high:.3f}]")
    if res is not None and other is not None and start is not None and not upgraded_pays:
        # the upgrades did not pay in the whole model: one technique everywhere wins
        log.append(f"the upgraded plan is not measurably faster than {start_label} everywhere "
                   f"({res.median:.3f}× against {other.median:.3f}× the original's "
                   "time): keeping the latter")
        best, res = start, other
        _, recipe, chosen, (top1, kl) = best
        verified = {"top1": top1, "kl": kl}
    speed = None
    if res is not None:
        speed = FrontierPoint("the plan", top1, kl, 1.0 / res.median, 1.0 / res.high,
                              1.0 / res.low, kind="plan", limit=best.limit, holds=True)
        log.append(f"the plan: {len(chosen)} rewrites, {phase} step "
                   f"{res.median:.3f}× the time [{res.low:.3f}, {res.high:.3f}]")
        if res.high >= 1.0:
            log.append("the plan is not measurably faster: nothing pays within the budget")
            chosen, recipe, verified = [], Recipe([]), None
            speed.holds = False
    return Confirmed(recipe, chosen, verified, speed, best)


def gain_at(options: Mapping[tuple[int, str], list[Option]],
            start: Mapping[tuple[int, str], Option]) -> Callable[[float], float]:
    """The predicted saving (ms) of the plan at a limit."""
    return lambda limit: sum(o.gain for o in plan_for_limit(options, limit, start).values())
