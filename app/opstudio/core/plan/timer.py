"""The advisors' timer: the model under one recipe against the model under another, timed in
alternation in a child process. It builds the variants with ``optimize``, so it lives with the
planning code, above the measuring it uses."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from opstudio.core.measure.timing import Ratio, interleaved_times, paired_ratio, session


def measured_timer(model: Any, inputs: Mapping[str, Any], threads: int = 0,
                   time_budget_s: float = 4.0, timeout_s: float = 600.0,
                   cancelled: Callable[[], bool] | None = None
                   ) -> Callable[[Any, Any], Ratio]:
    """A ``timer(recipe_a, recipe_b) -> Ratio`` (what ``advisor.greedy_plan`` takes): the model
    under recipe A against the model under recipe B (an empty recipe is the original), timed
    in alternation in a child process."""
    from opstudio.core.isolation import call_isolated

    def timer(a: Any, b: Any) -> Ratio:
        ta, tb = call_isolated(_time_in_child, model, a.to_json() if a.steps else None,
                               b.to_json() if b.steps else None, dict(inputs),
                               threads, time_budget_s, timeout=timeout_s, cancelled=cancelled,
                               task="timing the plan")
        return paired_ratio(ta, tb)

    return timer


def _time_in_child(model_path: str, a_json: Mapping[str, Any] | None,
                   b_json: Mapping[str, Any] | None,
                   inputs: Mapping[str, Any], threads: int,
                   time_budget_s: float) -> tuple[list[float], list[float]]:
    from opstudio.core.model.model_io import load_model
    from opstudio.core.plan.optimize import optimize
    from opstudio.core.plan.recipe import Recipe

    model = load_model(model_path)

    def build(recipe_json: Mapping[str, Any] | None) -> Any:
        if recipe_json is None:
            return model
        return optimize(model, Recipe.from_json(recipe_json), inputs=dict(inputs)).model

    sessions = {"a": session(build(a_json), threads), "b": session(build(b_json), threads)}
    times = interleaved_times(sessions, inputs, rounds=200, min_rounds=15,
                              time_budget_s=time_budget_s)
    return times["a"].tolist(), times["b"].tolist()
