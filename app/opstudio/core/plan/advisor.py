"""The automatic plan: the most latency for the least accuracy, per node, within a budget.

Given measured candidates (``sensitivity``), the greedy step ranks node × technique pairs by
latency gained per unit of error and takes them while the *predicted* error stays in budget.
Errors are predicted as a sum of noise-to-signal ratios (10^(-SNR/10)), which is how independent
errors combine; a cosine budget is turned into the same unit (1 - cos ≈ NSR / 2 for small
errors). The prediction is only a guide: the combined plan is then applied and measured end to
end, and while the measured error is over budget the pair with the least gain per error is
dropped and the plan measured again (back-off).

The result is an ordinary recipe the user can edit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opstudio.core.errors import Cancelled, OpstudioError
from opstudio.core.passes import ScanParams, get_pass, plan_rank
from opstudio.core.plan.budget import Budget, Timer, Verification, Verify
from opstudio.core.plan.llm import advise_llm, variants_for
from opstudio.core.plan.recipe import Recipe, Step
from opstudio.core.plan.sensitivity import Candidate
from opstudio.core.plan.timer import measured_timer
from opstudio.core.progress import part

# A candidate must save at least this share of its node's time, and this much absolutely,
# to be worth any error at all (below it the gain is within run-to-run noise).
MIN_GAIN_SHARE = 0.05
MIN_GAIN_MS = 0.002
# ... and at least this share of the whole run: below it a saving is within the run's noise.
MIN_RUN_SHARE = 0.01
# Savings of two variants of one technique on one node this close (relative) count as equal.
VARIANT_TOLERANCE = 0.25
# Error floor so that exact rewrites (noise 0) rank by gain rather than dividing by zero.
NOISE_FLOOR = 1e-12
# Technique order inside a recipe: structural rewrites first, then quantizers on what is left.


@dataclass
class PlanResult:
    budget: Budget
    chosen: list[Candidate]
    recipe: Recipe
    verified: Verification | None
    log: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # "node/technique" -> why

    @property
    def predicted_gain_ms(self) -> float:
        return sum(c.gain_ms for c in self.chosen)

    def to_json(self) -> dict[str, Any]:
        return {
            "budget": self.budget.to_json(),
            "recipe": self.recipe.to_json(),
            "chosen": [c.to_json() for c in self.chosen],
            "predicted_gain_ms": self.predicted_gain_ms,
            "verified": None if self.verified is None else {
                "cosine": self.verified.cosine,
                "snr_db": None if self.verified.snr_db is None or math.isinf(self.verified.snr_db)
                else self.verified.snr_db},
            "log": list(self.log),
            "rejected": dict(self.rejected),
        }


def score(c: Candidate) -> float:
    """Latency gained per unit of noise ratio."""
    return c.gain_ms / max(c.noise_ratio, NOISE_FLOOR)


def recipe_for(chosen: Sequence[Candidate]) -> Recipe:
    """One step per (technique, params), in an order where the rewrites do not collide."""
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for c in chosen:
        key = (c.technique, repr(sorted(c.params.items())))
        groups.setdefault(key, []).append(c)
    steps = []
    for (technique, _), members in sorted(groups.items(),
                                          key=lambda kv: (plan_rank(kv[0][0]), kv[0][1])):
        steps.append(Step(technique=technique, params=dict(members[0].params),
                          nodes=[c.node for c in members]))
    return Recipe(steps)


def greedy_plan(candidates: Sequence[Candidate], budget: Budget,
                verify: Verify | None = None, *,
                timer: Timer | None = None,
                max_backoff: int = 50, max_fill: int = 8, run_ms: float | None = None,
                progress: Callable[[float, str], None] | None = None,
                cancelled: Callable[[], bool] | None = None) -> PlanResult:
    """Choose at most one technique per node, greedily by gain per error (upgrading a node to a
    technique that saves clearly more while the budget allows), then back off until ``verify``
    (the measured end-to-end error of the plan) meets ``budget``, and, with ``timer``, keep only
    the steps that make the whole model measurably faster."""
    rejected: dict[str, str] = {}
    pool: list[Candidate] = []
    small: list[Candidate] = []  # saves something, but less than one node's noise
    for c in candidates:
        if not c.usable:
            rejected[c.key] = c.error or "not measured"
        elif c.gain_ms <= _noise_margin(c, run_ms):
            rejected[c.key] = (f"saves {c.gain_ms:.4f} ms of {c.before_ms:.4f} ms: "
                               "not faster enough to be worth any error")
            if c.gain_ms > 0 and budget.holds(c.cosine, c.snr_db):
                small.append(c)
        elif not budget.holds(c.cosine, c.snr_db):
            rejected[c.key] = "alone it already breaks the accuracy budget"
        else:
            pool.append(c)
    gain = _pooled_gains(pool)

    def rank(c: Candidate) -> float:
        return gain[c.key] / max(c.noise_ratio, NOISE_FLOOR)

    pool.sort(key=lambda c: (-rank(c), c.key))

    limit = budget.max_noise_ratio
    by_node: dict[str, Candidate] = {}
    noise = 0.0
    for c in pool:
        current = by_node.get(c.node)
        if current is None:
            if noise + c.noise_ratio > limit:
                rejected.setdefault(c.key, "would push the predicted error over budget")
                continue
            by_node[c.node] = c
            noise += c.noise_ratio
        elif (gain[c.key] > gain[current.key] + _noise_margin(c)
              and noise - current.noise_ratio + c.noise_ratio <= limit):
            # A nearly exact technique ranks first but may save little; a later, less exact
            # one that saves clearly more (not just by measurement noise) takes its place
            # while the budget allows.
            rejected[current.key] = f"{c.label} saves more on this node within the budget"
            by_node[c.node] = c
            noise += c.noise_ratio - current.noise_ratio
        else:
            rejected.setdefault(c.key, f"{current.label} is chosen for this node")
    chosen = sorted(by_node.values(), key=lambda c: (-rank(c), c.key))
    log = [f"greedy: {len(chosen)} of {len(pool)} candidates, predicted noise ratio "
           f"{noise:.3g} (budget {limit:.3g}), predicted gain {sum(c.gain_ms for c in chosen):.4f} ms"]

    verified: Verification | None = None
    if verify is not None:
        verified = _back_off(chosen, budget, verify, rejected, log, max_backoff, progress,
                             cancelled)
        if verified is not None and chosen:
            verified = _fill(chosen, pool, budget, verify, verified, rejected, log, max_fill,
                             cancelled)
        if timer is not None and small:
            verified = _sweep(chosen, small, budget, verify, timer, verified, rejected, log,
                              cancelled)
        if timer is not None and chosen and _keep_what_pays(chosen, timer, rejected, log,
                                                            progress, cancelled):
            # fewer rewrites rarely cost accuracy, but errors can cancel: measure again
            verified = _back_off(chosen, budget, verify, rejected, log, max_backoff, progress,
                                 cancelled)
        if timer is not None and chosen:
            verified = _settle_variants(chosen, pool, budget, verify, timer, verified, rejected,
                                        log, cancelled)
    return PlanResult(budget=budget, chosen=chosen, recipe=recipe_for(chosen),
                      verified=verified, log=log, rejected=rejected)


def _pooled_gains(pool: Sequence[Candidate]) -> dict[str, float]:
    """Gains to rank by: the variants of one technique on one node (INT8 per tensor and per
    channel) whose measured savings are close get their mean, so that accuracy, not the luck
    of two profiles taken at different moments, decides between them. Close is within the
    noise margin or a quarter of the larger saving: variants mostly run the same kernels, so
    such a difference says more about the machine than about them (and the plan is timed end
    to end afterwards anyway)."""
    gain = {c.key: c.gain_ms for c in pool}
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for c in pool:
        groups.setdefault((c.node, c.technique), []).append(c)
    for members in groups.values():
        gains = [c.gain_ms for c in members]
        close = max(_noise_margin(members[0]), VARIANT_TOLERANCE * max(gains))
        if len(members) > 1 and max(gains) - min(gains) <= close:
            mean = sum(gains) / len(gains)
            for c in members:
                gain[c.key] = mean
    return gain


def _noise_margin(c: Candidate, run_ms: float | None = None) -> float:
    """A saving smaller than this is within run-to-run noise."""
    return max(MIN_GAIN_MS, MIN_GAIN_SHARE * c.before_ms, MIN_RUN_SHARE * (run_ms or 0.0))


def _back_off(chosen: list[Candidate], budget: Budget,
              verify: Verify, rejected: dict[str, str],
              log: list[str], max_backoff: int,
              progress: Callable[[float, str], None] | None,
              cancelled: Callable[[], bool] | None) -> Verification | None:
    """Measure the plan; while it breaks the budget, drop its least efficient rewrite."""
    for attempt in range(max_backoff + 1):
        if cancelled is not None and cancelled():
            raise Cancelled()
        if not chosen:
            log.append("nothing left to apply within the budget")
            return None
        if progress is not None:
            progress(min(0.99, attempt / (max_backoff + 1)),
                     f"verifying a plan of {len(chosen)} rewrites")
        verified = verify(recipe_for(chosen))
        log.append(f"verify: {len(chosen)} rewrites → cosine {_fmt(verified.cosine)}, "
                   f"SNR {_fmt(verified.snr_db)} dB")
        if budget.holds(verified.cosine, verified.snr_db):
            return verified
        # Errors did not add up as predicted: drop the least efficient rewrite.
        worst = min(chosen, key=lambda c: (score(c), c.key))
        chosen.remove(worst)
        rejected[worst.key] = "dropped in back-off: the combined plan broke the budget"
        log.append(f"back-off: dropped {worst.key}")
    raise OpstudioError("could not find a plan within the accuracy budget "
                        f"after {max_backoff} back-off steps")


def _keep_what_pays(chosen: list[Candidate], timer: Timer,
                    rejected: dict[str, str], log: list[str],
                    progress: Callable[[float, str], None] | None,
                    cancelled: Callable[[], bool] | None) -> bool:
    """Time the plan with and without each of its steps, whole model against whole model, and
    drop the steps the model is not measurably faster with.

    Per-node savings come from profiles taken at different moments and a rewrite's costs can
    land outside its node (casts, lost fusions); a step is only worth its error if the whole
    model gains. Returns whether anything was dropped."""
    dropped = False
    steps = sorted(recipe_for(chosen).steps,
                   key=lambda st: sum(c.gain_ms for c in chosen if _in_step(c, st)))
    for i, step in enumerate(steps):
        if cancelled is not None and cancelled():
            raise Cancelled()
        members = [c for c in chosen if _in_step(c, step)]
        if not members:
            continue
        without = [c for c in chosen if not _in_step(c, step)]
        if progress is not None:
            progress(0.99, f"timing the plan with and without {step.technique} "
                           f"({i + 1}/{len(steps)})")
        ratio = timer(recipe_for(chosen), recipe_for(without))
        what = f"{step.technique} ×{len(members)}"
        log.append(f"timing: with/without {what} = {ratio.describe()}")
        if not ratio.faster:
            for c in members:
                chosen.remove(c)
                rejected[c.key] = ("dropped: timed end to end, the model was not measurably "
                                   f"faster with {what} ({ratio.median:.3f}× the time)")
            log.append(f"timing: dropped {what}")
            dropped = True
    return dropped


def _sweep(chosen: list[Candidate], small: Sequence[Candidate], budget: Budget,
           verify: Verify, timer: Timer,
           verified: Verification | None, rejected: dict[str, str], log: list[str],
           cancelled: Callable[[], bool] | None, max_tries: int = 3) -> Verification | None:
    """Many small nodes can add up to a saving that none of them shows alone above its noise
    (what whole-model quantization gets by quantizing everything). Try them together, the
    candidate that saves most on each node not yet in the plan, then the better half: kept
    only if the budget holds and the whole model is measurably faster with them."""
    taken = {c.node for c in chosen}
    group: list[Candidate] = []
    # per node the one that saves the most (an exact rewrite that saves next to nothing would
    # rank first by gain per error and add nothing), best gain per error first
    best: dict[str, Candidate] = {}
    for c in sorted(small, key=lambda c: (-c.gain_ms, c.key)):
        if c.node not in taken:
            best.setdefault(c.node, c)
    group = sorted(best.values(), key=lambda c: (-score(c), c.key))
    for _ in range(max_tries):
        if not group:
            break
        if cancelled is not None and cancelled():
            raise Cancelled()
        trial = verify(recipe_for([*chosen, *group]))
        what = f"{len(group)} small rewrite(s)"
        fits = budget.holds(trial.cosine, trial.snr_db)
        ratio = timer(recipe_for([*chosen, *group]), recipe_for(chosen)) if fits else None
        log.append(f"sweep: with {what} → cosine {_fmt(trial.cosine)}, SNR "
                   f"{_fmt(trial.snr_db)} dB" + (f", time {ratio.describe()}" if ratio else ""))
        if fits and ratio is not None and ratio.faster:
            chosen.extend(group)
            for c in group:
                rejected.pop(c.key, None)
            return trial
        group = group[: len(group) // 2]
    return verified


def _settle_variants(chosen: list[Candidate], pool: Sequence[Candidate], budget: Budget,
                     verify: Verify,
                     timer: Timer, verified: Verification | None,
                     rejected: dict[str, str], log: list[str],
                     cancelled: Callable[[], bool] | None) -> Verification | None:
    """Variants of one technique rank by pooled savings (``_pooled_gains``), so accuracy picks
    between them; but they need not run equally fast (over a whole MiniLM encoder per-tensor
    INT8 took 0.963× the time of per-channel, and 0.983× on a GPT-2 block). For each step, time
    the plan with its nodes on each other variant against the plan as it is, whole model
    against whole model, and switch when that is measurably faster and still within budget."""
    siblings: dict[tuple[str, str, str], Candidate] = {
        (c.node, c.technique, c.variant): c for c in pool}
    for step in recipe_for(chosen).steps:
        members = [c for c in chosen if _in_step(c, step)]
        if not members or not members[0].variant:
            continue
        others = sorted({c.variant for c in pool if c.technique == step.technique
                         and c.variant != members[0].variant})
        for variant in others:
            if cancelled is not None and cancelled():
                raise Cancelled()
            swap = {c.key: siblings[(c.node, c.technique, variant)] for c in members
                    if (c.node, c.technique, variant) in siblings}
            if not swap:
                continue
            trial_plan = [swap.get(c.key, c) for c in chosen]
            ratio = timer(recipe_for(trial_plan), recipe_for(chosen))
            what = f"{step.technique} ×{len(swap)} as ({variant})"
            log.append(f"variants: {what} / as chosen = {ratio.describe()}")
            if not ratio.faster:
                continue
            trial = verify(recipe_for(trial_plan))
            log.append(f"variants: {what} → cosine {_fmt(trial.cosine)}, SNR "
                       f"{_fmt(trial.snr_db)} dB")
            if not budget.holds(trial.cosine, trial.snr_db):
                continue
            for old, new in swap.items():
                rejected[old] = (f"{new.label} runs the whole model measurably faster "
                                 f"({ratio.median:.3f}× the time) within the budget")
                rejected.pop(new.key, None)
            chosen[:] = trial_plan
            verified = trial
            break
    return verified


def _in_step(c: Candidate, step: Step) -> bool:
    return (c.technique == step.technique and c.params == step.params
            and c.node in (step.nodes or ()))  # a selector step names no nodes


def _fill(chosen: list[Candidate], pool: Sequence[Candidate], budget: Budget,
          verify: Verify, verified: Verification,
          rejected: dict[str, str], log: list[str], max_fill: int,
          cancelled: Callable[[], bool] | None) -> Verification:
    """Errors often add up to less than predicted (they partly cancel, or one node dominates):
    measure whether the rewrites the prediction kept out fit after all. All of them are tried
    at once, then, if that breaks the budget, each half (better half first), and so on, so a
    few measurements settle many candidates."""
    taken = {c.node for c in chosen}
    waiting: list[Candidate] = []
    for c in pool:
        if c.node not in taken and "over budget" in rejected.get(c.key, ""):
            waiting.append(c)
            taken.add(c.node)  # the best-scoring candidate of each node only
    groups = [waiting] if waiting else []
    tries = 0
    while groups and tries < max_fill:
        if cancelled is not None and cancelled():
            raise Cancelled()
        group = groups.pop(0)
        tries += 1
        trial = verify(recipe_for([*chosen, *group]))
        names = ", ".join(c.key for c in group[:3])
        more = f" (+{len(group) - 3})" if len(group) > 3 else ""
        log.append(f"fill: with {names}{more} → cosine {_fmt(trial.cosine)}, "
                   f"SNR {_fmt(trial.snr_db)} dB")
        if budget.holds(trial.cosine, trial.snr_db):
            chosen.extend(group)
            for c in group:
                rejected.pop(c.key, None)
            verified = trial
        elif len(group) > 1:
            half = (len(group) + 1) // 2
            groups[:0] = [group[:half], group[half:]]
    return verified


def measured_verifier(model: Any, inputs: Mapping[str, Any],
                      timeout_s: float = 600.0,
                      cancelled: Callable[[], bool] | None = None
                      ) -> Verify:
    """A ``verify`` for ``greedy_plan``: apply the recipe and measure the outputs' error, in a
    child process (a rewrite that crashes onnxruntime must not take the caller down). The
    original model's outputs are computed once, on the first call, and reused."""
    from opstudio.core.isolation import call_isolated
    from opstudio.core.measure.accuracy import run_outputs

    reference: dict[str, Any] = {}

    def verify(recipe: Recipe) -> Verification:
        if not reference:
            reference.update(call_isolated(run_outputs, model, dict(inputs),
                                           timeout=timeout_s, cancelled=cancelled))
        cosine, snr = call_isolated(_verify_in_child, model, recipe.to_json(), dict(inputs),
                                    reference, timeout=timeout_s, cancelled=cancelled)
        return Verification(cosine, snr)

    return verify


def _verify_in_child(model_path: str, recipe_json: Mapping[str, Any],
                     inputs: Mapping[str, Any],
                     reference: Mapping[str, Any]) -> tuple[float | None, float | None]:
    from opstudio.core.measure.accuracy import compare_outputs, run_outputs
    from opstudio.core.model.model_io import load_model
    from opstudio.core.plan.optimize import optimize
    from opstudio.core.plan.sensitivity import worst_output_error

    optimized = optimize(load_model(model_path), Recipe.from_json(recipe_json),
                         inputs=dict(inputs)).model
    return worst_output_error(compare_outputs(reference, run_outputs(optimized, inputs)))


def _fmt(x: float | None) -> str:
    if x is None:
        return "?"
    if math.isinf(x):
        return "inf"
    return f"{x:.6g}"


@dataclass
class Advice:
    """Everything ``advise`` measured: per-node sensitivity, the roofline and the plan."""

    sensitivity: Any  # sensitivity.Sensitivity
    plan: PlanResult
    machine: Any  # roofline.Machine
    roofline: dict[str, Any]  # node name -> roofline.RooflinePoint

    def explain(self, candidate: Candidate) -> str:
        return explain(candidate, self.roofline.get(candidate.node), self.machine)

    @property
    def nothing_applies(self) -> str | None:
        """Why no candidate could be applied at all (grouped reasons), or None when some
        could: an empty plan then means that nothing paid within the budget."""
        return None if self.plan.chosen else self.sensitivity.why_nothing_applies()

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"machine": asdict(self.machine), "sensitivity": self.sensitivity.to_json(),
                "roofline": [p.to_json() for p in self.roofline.values()],
                "plan": self.plan.to_json(),
                "why": {c.key: self.explain(c) for c in self.plan.chosen},
                "nothing_applies": self.nothing_applies}


def explain(c: Candidate, point: Any, machine: Any) -> str:
    """One sentence on why a technique suits (or does not suit) this node on this machine."""
    saved = f"saves {c.gain_ms:.3f} of {c.before_ms:.3f} ms"
    if point is None:
        return f"{c.technique} {saved} (no roofline figures: FLOPs or bytes unknown)"
    where = (f"{point.bound}-bound ({point.intensity:.1f} FLOP/byte vs ridge "
             f"{machine.ridge:.1f}; {point.achieved_gflops:.1f} of "
             f"{point.attainable_gflops:.1f} GFLOP/s attainable)")
    technique = get_pass(c.technique)
    bound, why = technique.helps_when, technique.because or f"{c.technique} rewrites it"
    if not bound:
        return f"{where}: {why}; measured, it {saved}"
    match = "as expected" if bound == point.bound else "though the node is not " + bound + "-bound"
    return f"{where}: {why}, {match}; measured, it {saved}"


def advise(model_path: str, settings: Any, budget: Budget,
           techniques: Mapping[str, ScanParams] | None = None, *, max_nodes: int = 40,
           use_cache: bool = True, progress: Callable[[float, str], None] | None = None,
           cancelled: Callable[[], bool] | None = None, cluster: str | None = None) -> Any:
    """Sensitivity scan, roofline and verified greedy plan for the model at ``model_path``.

    A next-token budget (top-1 or KL) plans a language model's decode (or prefill) step by
    layer and role instead (``plan.llm``); its scan's judging runs on a Ray ``cluster`` when
    one is named ("auto", "ray://HOST:PORT")."""
    if budget.next_token:
        variants = None if techniques is None else variants_for(
            techniques, settings.inputs_path or "random")
        return advise_llm(model_path, settings, budget, variants, use_cache=use_cache,
                          progress=progress, cancelled=cancelled, cluster=cluster)
    if cluster not in (None, "", "local"):
        raise OpstudioError("only the next-token advisor's scan runs on a cluster (a top-1 "
                            "or KL budget); the per-operator scan times every rewrite here")
    from opstudio.core.measure.inputs import make_inputs
    from opstudio.core.measure.roofline import analyze_roofline, dims_from_inputs, measure_machine
    from opstudio.core.model.graph import analyze
    from opstudio.core.model.model_io import load_model
    from opstudio.core.plan.sensitivity import analyze_sensitivity

    model = load_model(model_path, lazy=True)  # inputs and the analysis need no weight
    inputs = make_inputs(model, dims=settings.dims, shapes=settings.shapes,
                         npz_path=settings.inputs_path, seed=settings.seed,
                         phase=settings.phase, past=settings.past, model_path=model_path)
    sens = analyze_sensitivity(model_path, settings, techniques, max_nodes=max_nodes,
                               inputs=inputs, use_cache=use_cache,
                               progress=part(progress, 0.0, 0.75), cancelled=cancelled)
    if progress is not None:
        progress(0.75, "measuring this machine's roofline")
    machine = measure_machine(settings.threads)
    graph = analyze(model, dims_from_inputs(model, inputs))
    node_ms = {s.name: s.p50_ms for s in sens.baseline.nodes}
    points = {p.name: p for p in analyze_roofline(graph, node_ms, machine)}
    if any(p.achieved_gflops > 1.2 * machine.peak_gflops for p in points.values()):
        # a kernel beat the cached ceiling: it was measured on a busy machine; measure again
        machine = measure_machine(settings.threads, use_cache=True, refresh=True)
        points = {p.name: p for p in analyze_roofline(graph, node_ms, machine)}
    from opstudio.core.plan.sensitivity import run_time

    plan = greedy_plan(sens.candidates, budget,
                       measured_verifier(str(model_path), inputs, settings.timeout_s, cancelled),
                       timer=measured_timer(str(model_path), inputs, settings.threads,
                                            timeout_s=settings.timeout_s, cancelled=cancelled),
                       progress=part(progress, 0.8, 1.0), cancelled=cancelled,
                       run_ms=run_time(sens.baseline))
    if progress is not None:
        progress(1.0, "advice ready")
    return Advice(sensitivity=sens, plan=plan, machine=machine, roofline=points)
