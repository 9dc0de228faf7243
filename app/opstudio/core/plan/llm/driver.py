"""``advise_llm``: scan, predict, search the limit by measuring, confirm; see the package doc."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.plan.budget import Budget, Timer, Verify
from opstudio.core.plan.llm.advice import LlmAdvice
from opstudio.core.plan.llm.confirm import (
    PromptVerifier,
    StepTimer,
    confirm,
    gain_at,
    start_from,
    try_limit,
)
from opstudio.core.plan.llm.frontier import FrontierRecorder
from opstudio.core.plan.llm.fusion import Fusion, fused_scan
from opstudio.core.plan.llm.limits import LimitSearch
from opstudio.core.plan.llm.predict import (
    LAYER_SAMPLES,
    TIE_SHARE,
    Held,
    Judge,
    first_limit,
    most_accurate_of_fastest,
    unit_options,
)
from opstudio.core.plan.llm.scan import Scan
from opstudio.core.plan.llm.variants import Variant, default_variants
from opstudio.core.plan.recipe import Recipe
from opstudio.core.progress import CancelCheck, Progress, clamped, stopper
from opstudio.core.tempdir import opstudio_tempdir

if TYPE_CHECKING:
    from opstudio.core.plan.scan_executor import RayScan


def advise_llm(model_path: str, settings: ProfileSettings, budget: Budget,
               variants: Sequence[Variant] | None = None, *, verify: Verify | None = None,
               timer: Timer | None = None, use_cache: bool = True,
               layer_samples: int = LAYER_SAMPLES, time_budget_s: float = 6.0,
               progress: Progress | None = None,
               cancelled: CancelCheck | None = None, cluster: str | None = None) -> LlmAdvice:
    """Scan by role and layer, plan within ``budget`` (top-1 or KL) for the decode step (or
    the prefill with ``settings.phase == "prefill"``), verify and time; see the package doc.
    ``verify``/``timer``: measure plans otherwise than on the prompt and step of ``settings``.
    ``cluster``: "auto" or "ray://HOST:PORT" judges the scan's variants on Ray's workers
    (``scan_executor``; fusion, which plans on a rewritten model, is then not tried); timing
    stays here."""
    from opstudio.core.plan.scan_executor import open_cluster

    started, say, stop = time.perf_counter(), clamped(progress), stopper(cancelled)
    # refused before any work when its workers cannot read the model
    ray_scan = open_cluster(cluster, str(model_path))
    variants = list(variants) if variants is not None else default_variants()
    with opstudio_tempdir(prefix="fused-") as folder:
        scan = Scan.prepare(model_path, settings, variants, use_cache=use_cache,
                            layer_samples=layer_samples)
        if (nothing := scan.nothing_applies(budget, started)) is not None:
            return nothing
        stop()
        scan, fusion = fused_scan(scan, settings, variants, budget, folder, time_budget_s, say,
                                  cancelled, use_cache=use_cache, layer_samples=layer_samples,
                                  skip=ray_scan is not None)
        return _plan(scan, fusion, budget, verify, timer, layer_samples, time_budget_s, say,
                     stop, cancelled, started, ray_scan)


def _plan(scan: Scan, fusion: Fusion | None, budget: Budget, verify: Verify | None,
          timer: Timer | None, layer_samples: int, time_budget_s: float, say: Progress,
          stop: Callable[[], None], cancelled: CancelCheck | None, started: float,
          cluster: RayScan | None = None) -> LlmAdvice:
    """The plan on ``scan``'s model (the fused one when ``fusion`` kept one), led by the
    fusion's step."""
    scan.time_whole(time_budget_s, say, cancelled, cluster)
    scan.judge_units(budget, layer_samples, say, cancelled, stop, cluster)
    options, notes = unit_options(scan.whole, scan.roles, scan.role_nodes, scan.weights,
                                  scan.targets, scan.usable, scan.vmap, scan.base_ms, scan.phase)
    guess, fit, note = first_limit(budget, scan.measured_points())
    scan.log += notes + ([note] if note else [])
    judge, frontier = Judge(budget, fit), FrontierRecorder()
    holding: list[Held] = []
    verify = verify or PromptVerifier(scan.path, scan.prompt, scan.cache, scan.settings.threads,
                                      scan.settings.timeout_s * 4, cancelled)
    timer = timer or StepTimer(scan.path, scan.timed, scan.split.calibration, scan.cache,
                               scan.settings.threads, time_budget_s,
                               max(scan.settings.timeout_s, 60.0) * 8, cancelled)
    start, start_plan, label = start_from(scan, options, judge, frontier)
    if start_plan is not None:
        holding.append(start_plan)
        guess = max(guess, 1.5 * start_plan.limit)
    if options and guess > 0:
        say(0.75, "searching the plan's error limit by measuring")
        search = LimitSearch(guess, max((o.err for opts in options.values() for o in opts),
                                        default=0.0), lo=start_plan.limit if start_plan else None)
        search.run(lambda limit: try_limit(limit, options, start, scan, verify, judge, frontier,
                                           holding), say, stop)
    confirmed = None
    if holding:
        best = most_accurate_of_fastest(holding, TIE_SHARE * scan.base_ms)
        if start_plan and len(holding) > 1 and best.limit == start_plan.limit:
            scan.log.append(f"the upgraded plans that hold are predicted to save within "
                            f"{TIE_SHARE:.1%} of the step of {label} everywhere (less than "
                            "timing tells apart): a tie, which goes to the more accurate")
        stop()
        say(0.92, f"timing the plan on the {scan.phase} step")
        confirmed = confirm(best, start_plan, label, timer, scan.phase, scan.log)
        frontier.timed(confirmed.best.limit, confirmed.speed)
    frontier.predicted(scan.base_ms, gain_at(options, start))
    frontier.whole(scan.whole, scan.vmap, judge.holds)
    say(1.0, "advice ready")
    recipe = _named_calibration(confirmed.recipe if confirmed else Recipe([]), scan.calibration)
    if fusion is not None:
        recipe = fusion.lead(recipe)
    return LlmAdvice(budget, scan.phase, scan.base_ms, scan.variants, scan.roles, scan.whole,
                     scan.layer_kl, scan.measured_layers, confirmed.chosen if confirmed else [],
                     recipe, confirmed.verified if confirmed else None,
                     confirmed.speed if confirmed else None, frontier.points, scan.refused,
                     scan.log, time.perf_counter() - started,
                     fusion=None if fusion is None else fusion.to_json())


def _named_calibration(recipe: Recipe, calibration: str) -> Recipe:
    """``recipe`` with its calibrated steps reading ``calibration`` (the prompt file) instead
    of the samples the scan handed them, so that the plan runs as it is, without ``--inputs``."""
    if calibration == "random" or not recipe.steps:
        return recipe
    data = recipe.to_json()
    for step in data.get("steps", []):
        params = step.get("params") or {}
        if params.get("calibration") == "random":
            params["calibration"] = calibration
    return Recipe.from_json(data)
