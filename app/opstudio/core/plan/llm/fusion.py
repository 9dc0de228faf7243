"""Fusion before the plan: ``fuse`` changes no math beyond float rounding, so the advisor
applies it wherever it measures faster and plans the quantizers on the fused model.

Fused attention is not always faster on a CPU (onnxruntime's issues report shapes where it is
slower), so two fusions are built, every unit with attention and the norms and rotary
embeddings alone, judged on the prompt and timed against the original in one interleaved run.
The faster of those that are measurably faster and keep the budget is kept. Every layer of a
decoder has the same shapes, so the choice is made for the whole model at once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.plan.budget import Budget
from opstudio.core.plan.llm.advice import fmt
from opstudio.core.plan.llm.measure import build_and_judge, measure_speed
from opstudio.core.plan.llm.predict import LAYER_SAMPLES, Judge, pays
from opstudio.core.plan.llm.scan import Scan
from opstudio.core.plan.llm.variants import Variant
from opstudio.core.plan.recipe import Step
from opstudio.core.progress import CancelCheck, Progress

# the fusions tried: every unit (attention included), and norms and rotary embeddings alone;
# unpacked, so the projections keep the names the plan's quantizer steps select them by
TRIES = ({"attention": True, "pack": False}, {"attention": False, "pack": False})


@dataclass
class Fusion:
    """The fuse step kept (None: no fusion pays), the fused model the plan is made on, and
    what each fusion measured (top-1, KL, time ratio to the original with its interval)."""

    step: Step | None = None
    path: str | None = None
    tried: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"step": None if self.step is None else self.step.to_json(), "tried": self.tried}


def build_fusions(model_path: str, prompt: Mapping[str, np.ndarray],
                  tries: Sequence[Mapping[str, Any]], folder: str, threads: int = 0,
                  progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Runs in a child: each fusion of every unit it finds, judged on the prompt and saved in
    ``folder`` (``build_and_judge``), with the nodes it took."""
    from opstudio.core.model.model_io import load_model
    from opstudio.core.passes.fuse import fusable_nodes
    from opstudio.core.plan.recipe import Recipe

    model = load_model(model_path)
    tasks: list[tuple[str, dict[str, Any]]] = []
    nodes: dict[str, list[str]] = {}
    for params in tries:
        tid = _task(params)
        nodes[tid] = fusable_nodes(model, bool(params.get("attention", True)),
                                   pack=bool(params.get("pack", True)))
        if nodes[tid]:
            tasks.append((tid, Recipe([Step("fuse", dict(params), nodes[tid])]).to_json()))
    del model
    built = build_and_judge(model_path, prompt, tasks, folder, threads, progress)
    return {tid: {**res, "nodes": nodes[tid]} for tid, res in built.items()}


def fuse_first(model_path: str, prompt: Mapping[str, np.ndarray],
               timed: Mapping[str, np.ndarray], folder: Path, judge: Judge, threads: int,
               time_budget_s: float, timeout: float, say: Progress,
               cancelled: CancelCheck | None = None) -> Fusion:
    """The fusions built, judged and timed against the original; the fastest that pays and
    holds the budget is kept (``Fusion.path``: its model, for the scan to plan on)."""
    from opstudio.core.isolation import call_isolated

    say(0.0, "fusing norms, rotary embeddings and attention")
    built = call_isolated(build_fusions, model_path, dict(prompt), list(TRIES), str(folder),
                          threads, timeout=timeout, cancelled=cancelled, task="fusing")
    out = Fusion()
    if not built:
        out.log.append("fuse: no unit of this model is one the pass recognises")
        return out
    say(0.0, f"timing {len(built)} fusion(s) on the step")
    tasks: list[tuple[str, dict[str, Any]]] = [(tid, {}) for tid in built]
    speed = call_isolated(measure_speed, model_path, dict(timed), [], tasks, None, threads,
                          time_budget_s, None, built, timeout=timeout, cancelled=cancelled,
                          task="timing the fusions")
    best: tuple[float, str] | None = None
    for tid, res in speed.items():
        judged = res  # measure_speed carries what build_and_judge judged
        holds = pays(res) and judge.holds(judged)
        out.tried[tid] = {k: judged.get(k) for k in ("top1", "kl", "ratio", "low", "high",
                                                    "error")}
        out.log.append(f"{tid}: {len(built[tid]['nodes'])} nodes, top-1 {fmt(judged.get('top1'))}, "
                       f"KL {fmt(judged.get('kl'))}, step {fmt(res.get('ratio'))}× the time "
                       f"[{fmt(res.get('low'))}, {fmt(res.get('high'))}]"
                       + ("" if holds else ": not kept (not measurably faster, or not exact)"))
        if holds and (best is None or res["ratio"] < best[0]):
            best = (res["ratio"], tid)
    if best is not None:
        tid = best[1]
        params = next(p for p in TRIES if _task(p) == tid)
        out.step = Step("fuse", dict(params), list(built[tid]["nodes"]))
        out.path = built[tid]["path"]
        out.log.append(f"{tid} kept: the plan below is made on the fused model, and its "
                       "speedups are against it")
    return out


def _task(params: Mapping[str, Any]) -> str:
    return "fuse" + ("" if params.get("attention", True) else " (norms and rotary only)")


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
    log = scan.log + fusion.log
    if fusion.path is not None:
        scan = Scan.prepare(fusion.path, settings, variants, use_cache=use_cache,
                            layer_samples=layer_samples, source=scan.path)
    scan.log = log
    return scan, fusion
