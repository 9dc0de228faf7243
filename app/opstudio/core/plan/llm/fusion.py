"""Fusion before the plan: ``fuse`` changes no math beyond float rounding, so the advisor
applies it wherever it measures faster, layer by layer, and plans the quantizers on the fused
model.

Fused attention is not always faster on a CPU (onnxruntime's issues report shapes where it is
slower), so the whole model fused is first profiled against the original in one interleaved
run, and each layer's attention, norms and MLP gate stay fused only where they are not
measurably slower (``fusion_units``). Three fusions of the units kept are then built, judged
on the prompt and timed against the original in one interleaved run: every unit with its
projections packed, every unit unpacked, and the norms and rotary embeddings alone. The
fastest of those that are measurably faster and keep the budget is kept."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opstudio.core.errors import OpstudioError
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.plan.budget import Budget
from opstudio.core.plan.llm.advice import fmt
from opstudio.core.plan.llm.fusion_units import kept_of, measure_units
from opstudio.core.plan.llm.measure import build_and_judge, measure_speed
from opstudio.core.plan.llm.predict import LAYER_SAMPLES, Judge, pays
from opstudio.core.plan.llm.scan import Scan
from opstudio.core.plan.llm.variants import Variant
from opstudio.core.plan.recipe import Recipe, Step
from opstudio.core.progress import CancelCheck, Progress

# the fusions tried: every unit with q|k|v and gate|up packed into one MatMul each, every unit
# unpacked, and norms and rotary embeddings alone. Packing renames the projections, which does
# not keep the plan from applying: the plan is scanned on the fused model's file, so its steps
# name the packed nodes (``.../qkv_proj/MatMul``), and ``Fusion.lead`` writes them as the
# originals they stand for (q, k and v), which a recipe checked against the original accepts
# and ``optimize`` resolves to the packed node the fuse step leading the recipe made. A packed
# projection takes one technique for q, k and v together, the only choice a scan of the fused
# model can see.
TRIES = ({"attention": True, "pack": True}, {"attention": True, "pack": False},
         {"attention": False, "pack": False})
FULL = "fuse"  # the fusion profiled unit by unit

@dataclass
class Fusion:
    """The fuse step kept (None: no fusion pays), the fused model the plan is made on, what
    each fusion measured (top-1, KL, time ratio to the original with its interval) and, per
    layer, which units were kept fused and why (``UnitChoice.to_json``)."""

    step: Step | None = None
    path: str | None = None
    tried: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    by_layer: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"step": None if self.step is None else self.step.to_json(), "tried": self.tried,
                **({} if self.by_layer is None else {"by_layer": self.by_layer})}

    def lead(self, recipe: Recipe) -> Recipe:
        """``recipe``, planned on the fused model, led by the fuse step and naming, for each
        node the fusion made (a packed ``qkv_proj/MatMul``, a GroupQueryAttention), the
        original nodes it stands for: a recipe is checked against the model it is applied to
        before any step runs, where only the originals are, and ``optimize`` then applies
        each step to the nodes standing for the originals it names."""
        if self.step is None or self.path is None:
            return recipe
        from opstudio.core.model.model_io import load_model
        from opstudio.core.model.provenance import get_origin

        fused = load_model(self.path, load_external_data=False)
        origins = {n.name: get_origin(n) for n in fused.graph.node}

        def original(name: str) -> list[str]:
            stands_for = origins.get(name, [name])
            return [name] if name in stands_for else stands_for

        steps = []
        for step in recipe.steps:
            if step.nodes is not None:
                named = [o for name in step.nodes for o in original(name)]
                step = dataclasses.replace(step, nodes=list(dict.fromkeys(named)))
            steps.append(step)
        return Recipe([self.step, *steps], recipe.version)


def build_fusions(model_path: str, prompt: Mapping[str, np.ndarray],
                  tries: Sequence[Mapping[str, Any]], folder: str, threads: int = 0,
                  progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Runs in a child: each fusion of every unit it finds, judged on the prompt and saved in
    ``folder`` (``build_and_judge``), with the nodes it took and its units."""
    from opstudio.core.model.model_io import load_model
    from opstudio.core.passes.fuse import fusable_units

    model = load_model(model_path)
    tasks: list[tuple[str, dict[str, Any]]] = []
    units: dict[str, list[list[str]]] = {}
    for params in tries:
        tid = _task(params)
        units[tid] = fusable_units(model, bool(params.get("attention", True)),
                                   pack=bool(params.get("pack", True)))
        if units[tid]:
            tasks.append((tid, _recipe(params, _nodes(units[tid]))))
    del model
    built = build_and_judge(model_path, prompt, tasks, folder, threads, progress)
    return {tid: {**res, "nodes": _nodes(units[tid]), "units": units[tid]}
            for tid, res in built.items()}


def fuse_first(model_path: str, prompt: Mapping[str, np.ndarray],
               timed: Mapping[str, np.ndarray], folder: Path, judge: Judge, threads: int,
               time_budget_s: float, timeout: float, say: Progress,
               cancelled: CancelCheck | None = None) -> Fusion:
    """The fusions built, cut to the units that pay layer by layer (``keep_paying_units``),
    judged and timed against the original; the fastest that pays and holds the budget is
    kept (``Fusion.path``: its model, for the scan to plan on)."""
    from opstudio.core.isolation import call_isolated

    say(0.0, "fusing norms, rotary embeddings and attention")
    built = call_isolated(build_fusions, model_path, dict(prompt), list(TRIES), str(folder),
                          threads, timeout=timeout, cancelled=cancelled, task="fusing")
    out = Fusion()
    if not built:
        out.log.append("fuse: no unit of this model is one the pass recognises")
        return out
    built = keep_paying_units(model_path, prompt, timed, built, folder, threads, time_budget_s,
                              timeout, out, say, cancelled)
    say(0.0, f"timing {len(built)} fusion(s) on the step")
    tasks: list[tuple[str, dict[str, Any]]] = [(tid, {}) for tid in built]
    speed = call_isolated(measure_speed, model_path, dict(timed), [], tasks, None, threads,
                          time_budget_s, None, built, timeout=timeout, cancelled=cancelled,
                          task="timing the fusions")
    best: tuple[float, str] | None = None
    for tid, res in speed.items():
        judged = res  # measure_speed carries what build_and_judge judged
        holds = pays(res) and judge.holds(judged)
        out.tried[tid] = {**{k: judged.get(k) for k in ("top1", "kl", "ratio", "low", "high",
                                                          "error")},
                          "nodes": len(built[tid]["nodes"])}
        out.log.append(f"{tid}: {len(built[tid]['nodes'])} nodes, top-1 {fmt(judged.get('top1'))}, "
                       f"KL {fmt(judged.get('kl'))}, step {fmt(res.get('ratio'))}× the time "
                       f"[{fmt(res.get('low'))}, {fmt(res.get('high'))}]"
                       + ("" if holds else ": not kept (not measurably faster, or not exact)"))
        if holds and (best is None or res["ratio"] < best[0]):
            best = (res["ratio"], tid)
    if best is not None:
        tid = best[1]
        out.step = Step("fuse", dict(_params(tid)), list(built[tid]["nodes"]))
        out.path = built[tid]["path"]
        out.log.append(f"{tid} kept: the plan below is made on the fused model, and its "
                       "speedups are against it")
    return out


def keep_paying_units(model_path: str, prompt: Mapping[str, np.ndarray],
                      timed: Mapping[str, np.ndarray], built: dict[str, dict[str, Any]],
                      folder: Path, threads: int, time_budget_s: float, timeout: float,
                      out: Fusion, say: Progress, cancelled: CancelCheck | None = None
                      ) -> dict[str, dict[str, Any]]:
    """``built`` with each fusion cut to the units not measurably slower layer by layer
    (``fusion_units``: the full fusion profiled against the original), those cut built and
    judged again; what was kept or left, and why, in ``out``."""
    from opstudio.core.isolation import call_isolated

    full = built.get(FULL)
    if full is None or "path" not in full:
        return built
    say(0.0, "profiling the fused units layer by layer")
    try:
        choice = measure_units(model_path, full["path"], timed, full["units"], threads,
                               time_budget_s, timeout, cancelled)
    except OpstudioError as exc:
        out.log.append(f"fuse by layer: not profiled ({exc}); every unit is kept")
        return built
    out.by_layer = choice.to_json()
    out.log.append(f"fuse by layer: {choice.summary()}")
    dropped = choice.dropped_nodes()
    if not dropped:
        return built
    cut = {tid: kept_of(res["units"], dropped) for tid, res in built.items() if "units" in res}
    tasks = [(tid, _recipe(_params(tid), nodes)) for tid, nodes in cut.items()
             if nodes and nodes != built[tid]["nodes"]]
    kept = {tid: res for tid, res in built.items() if cut.get(tid, True)}
    if tasks:
        say(0.0, f"fusing the units that pay in {len(tasks)} fusion(s)")
        again = folder / "by-layer"
        again.mkdir(exist_ok=True)
        rebuilt = call_isolated(build_and_judge, model_path, dict(prompt), tasks, str(again),
                                threads, timeout=timeout, cancelled=cancelled,
                                task="fusing the units that pay")
        for tid, res in rebuilt.items():
            kept[tid] = {**res, "nodes": cut[tid], "units": built[tid]["units"]}
    return kept


def _task(params: Mapping[str, Any]) -> str:
    if not params.get("attention", True):
        return "fuse (norms and rotary only)"
    return "fuse" + ("" if params.get("pack", True) else " (unpacked)")


def _params(tid: str) -> Mapping[str, Any]:
    return next(p for p in TRIES if _task(p) == tid)


def _nodes(units: Sequence[Sequence[str]]) -> list[str]:
    return sorted({n for unit in units for n in unit})


def _recipe(params: Mapping[str, Any], nodes: Sequence[str]) -> dict[str, Any]:
    return Recipe([Step("fuse", dict(params), list(nodes))]).to_json()


def fused_scan(scan: Scan, settings: ProfileSettings, variants: Sequence[Variant],
               budget: Budget, folder: Path, time_budget_s: float, say: Progress,
               cancelled: CancelCheck | None = None, *, use_cache: bool = True,
               layer_samples: int = LAYER_SAMPLES, skip: bool = False
               ) -> tuple[Scan, Fusion | None]:
    """With ``fuse`` among the variants: the fusion that pays, and the scan prepared again
    on the fused model (``scan`` itself when none pays or fuse was not asked for; ``skip``:
    not tried, which the log says)."""
    if not any(v.technique == "fuse" for v in variants):
        return scan, None
    if skip:
        scan.log.append("fuse: not tried when the scan runs on a cluster (its workers read "
                        "the model as it is)")
        return scan, None
    fusion = fuse_first(scan.path, scan.prompt, scan.timed, folder, Judge(budget),
                        scan.settings.threads, time_budget_s,
                        max(scan.settings.timeout_s, 60.0) * 10, say, cancelled)
    if fusion.path is not None:
        # what the scan on the fused model says replaces what the original's said (a KV cache
        # candidate needs the GroupQueryAttention that fusion made)
        scan = Scan.prepare(fusion.path, settings, variants, use_cache=use_cache,
                            layer_samples=layer_samples, source=scan.path)
    scan.log = scan.log + fusion.log
    return scan, fusion
