"""The scan: what the planner learns about a model before it plans.

``prepare`` reads the model and the prompt and finds what each variant can take; ``time_whole``
times every variant on every node it takes against the original (and judges it on the prompt
as it is built); ``judge_units`` measures the faster ones by role (all layers at once) and the
first of those on every role of a few layers."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.measure.accuracy import SYNTHETIC
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.plan.budget import Budget
from opstudio.core.plan.llm.advice import Choice, LlmAdvice, RoleResult, WholeResult, fmt
from opstudio.core.plan.llm.judge import MIN_CONFIRM, HeldOut, half, held_out
from opstudio.core.plan.llm.measure import accuracy_in_parallel, speed_in_parallel
from opstudio.core.plan.llm.predict import (
    LAYER_SAMPLES,
    Option,
    layer_weights,
    needed_agreement,
    pays,
    sample_layers,
)
from opstudio.core.plan.llm.variants import (
    KV_OP,
    KV_PAST,
    Target,
    Variant,
    applicable,
    default_variants,
    find_targets,
    recipe_of,
)
from opstudio.core.plan.recipe import Recipe
from opstudio.core.progress import CancelCheck, Progress, part

if TYPE_CHECKING:
    from opstudio.core.plan.scan_executor import RayScan

# a variant at least this many times less accurate (KL) than a no slower one is not scanned
DOMINANCE = 10.0
CACHE_KIND = "llm"
# bumped when what a cached measurement holds changes (3: the judged positions, KL's standard
# error and the search and confirming halves, which the budget's confidence bound needs)
SCAN_FORMAT = 3
# child processes measuring accuracy side by side (each rewrite is mostly single-threaded Python)
ACCURACY_WORKERS = 2


@dataclass
class Scan:
    path: str
    settings: ProfileSettings
    phase: str
    prompt: dict[str, np.ndarray]
    timed: dict[str, np.ndarray]
    split: HeldOut
    calibration: str  # what the plan's calibrated steps name (the prompt file or "random")
    variants: list[Variant]
    targets: list[Target]
    usable: dict[str, list[Target]]
    refused: dict[str, dict[str, str]]
    cache: str | None
    log: list[str] = field(default_factory=list)
    speed: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_ms: float = 0.0
    roles: list[RoleResult] = field(default_factory=list)
    role_nodes: dict[tuple[str, str], list[Target]] = field(default_factory=dict)
    whole: list[WholeResult] = field(default_factory=list)
    layer_kl: dict[int, float] = field(default_factory=dict)
    measured_layers: list[int] = field(default_factory=list)
    layer_search: list[tuple[float | None, float | None]] = field(default_factory=list)

    @classmethod
    def prepare(cls, model_path: str, settings: ProfileSettings,
                variants: Sequence[Variant] | None = None, *, use_cache: bool = True,
                layer_samples: int = LAYER_SAMPLES, source: str | None = None) -> Scan:
        """The prompt (split into calibration and judged tokens), the step to time, the
        targets each variant can take and the cache the measurements go to. ``source``: the
        user's model when ``model_path`` is a rewrite of it (its tokenizer and
        genai_config.json sit beside the former). Fusion is not scanned (``fusion``)."""
        from opstudio.core.measure.text_prompt import with_text_prompt
        from opstudio.core.measure.workload import Workload
        from opstudio.core.model.model_io import load_model
        from opstudio.core.plan.sensitivity import cache_key, cache_path

        path, beside = str(model_path), str(source or model_path)
        phase = settings.phase or "decode"
        # without a prompt file, a text tokenized with the model's tokenizer when there is one
        given = settings.inputs_path
        settings, judged_on = with_text_prompt(settings, beside)
        model = load_model(path)
        if not _has_logits(model):
            raise OpstudioError("the model has no logits output (a float output named …logits… "
                                "or as wide as a vocabulary): budget it by cosine or SNR instead")
        workload = Workload(model, settings, beside)
        prompt = workload.at("prefill")
        # --past another than the prompt's length: the step is timed after a synthetic past
        length = _tokens(prompt)
        synthetic = (phase == "decode" and settings.past is not None and length is not None
                     and settings.past != length)
        timed = (prompt if phase == "prefill" else
                 _synthetic_decode(model, settings, beside) if synthetic else workload.at("decode"))
        # the scan calibrates on the first part of the prompt (handed to every pass as its
        # samples: "random" takes those first) and judges on the rest; the plan it hands out
        # names the prompt itself when the prompt file feeds the model
        split = held_out(prompt)
        log: list[str] = []
        if judged_on:
            log.append(f"prompt: {judged_on}" + (": not a measure of quality; give a tokenizer "
                                                 "or a prompt" if judged_on == SYNTHETIC else ""))
        log.append(f"accuracy: {split.describe}; units are ranked on the first half of the "
                   "judged tokens and plans held to the budget on the second (from "
                   f"{2 * MIN_CONFIRM} judged tokens on)")
        if synthetic:
            log.append(f"speed: the decode step is timed after a synthetic past of "
                       f"{settings.past} tokens (--past), not after the prompt")
        variants = [replace(v, params={**v.params, "calibration": "random"})
                    if "calibration" in v.params else v
                    for v in (variants if variants is not None else default_variants())
                    if v.technique != "fuse"]
        targets = find_targets(model)
        variants, timed = _kv_candidates(variants, targets, phase, timed, log)
        extra = [settings.inputs_path] if settings.inputs_path else []
        key = cache_key(Path(path), settings, {"variants": [v.to_json() for v in variants],
                                                "phase": phase, "layer_samples": layer_samples,
                                                "scan": SCAN_FORMAT},
                        0, extra)
        refused: dict[str, dict[str, str]] = {}
        usable: dict[str, list[Target]] = {}
        for v in variants:
            ok, why = applicable(model, targets, v)
            usable[v.id] = ok
            if why:
                refused[v.label] = why
        # the plan names the user's prompt file, not the text's (the optimizer and the app
        # calibrate on the text themselves when the tokenizer is at hand)
        return cls(path, settings, phase, prompt, timed, split, _calibration_source(model, given),
                   variants, targets, usable, refused,
                   str(cache_path(key, CACHE_KIND)) if use_cache else None, log)

    @property
    def layers(self) -> list[int]:
        return sorted({t.layer for t in self.targets if t.layer is not None})

    @property
    def vmap(self) -> dict[str, Variant]:
        return {v.id: v for v in self.variants}

    def nothing_applies(self, budget: Budget, started: float) -> LlmAdvice | None:
        """The advice when no variant can take any node (with what each said), else None."""
        if any(self.usable.values()):
            return None
        from opstudio.core.plan import reasons

        reasons_ = [f"{label}: {why}" for label, nodes in self.refused.items()
                    for why in nodes.values()]
        nothing = (reasons.summarise(reasons_, limit=4) if reasons_
                   else "the model has no MatMul or Gemm with a constant weight")
        return LlmAdvice(budget, self.phase, 0.0, self.variants, [], [], {}, [], [], Recipe([]),
                         None, None, [], self.refused, [f"nothing could be applied: {nothing}"],
                         time.perf_counter() - started, nothing_applies=nothing)

    def time_whole(self, time_budget_s: float, say: Progress,
                   cancelled: CancelCheck | None = None, cluster: RayScan | None = None) -> None:
        """Speed first: every variant on every node it takes, timed against the original (and
        judged on the prompt as it is built); a variant that does not make the step faster is
        not worth scanning by role."""
        speed_tasks = [(f"whole|{v.id}", recipe_of([(v, self.usable[v.id])]).to_json())
                       for v in self.variants if self.usable[v.id]]
        say(0.0, f"timing {len(speed_tasks)} whole-model variant(s) on the {self.phase} step")
        self.speed = speed_in_parallel(
            self.path, self.timed, self.prompt, speed_tasks, self.cache, self.settings.threads,
            time_budget_s, workers=ACCURACY_WORKERS,
            timeout=max(self.settings.timeout_s, 60.0) * 10, cancelled=cancelled,
            progress=part(say, 0.0, 0.25), cluster=cluster)
        self.base_ms = next((s["base_ms"] for s in self.speed.values() if "base_ms" in s), 0.0)

    def _pays(self, v: Variant) -> bool:
        return pays(self.speed.get(f"whole|{v.id}", {}))

    def dominated(self, v: Variant) -> Variant | None:
        """A variant that takes all of ``v``'s nodes, decodes at least as fast and is far
        more accurate on the whole model: the planner shares savings out by bytes, so ``v``
        would lose to it on every unit, and its role scan would be time spent for nothing."""
        mine = self.speed.get(f"whole|{v.id}", {})
        for u in self.variants:
            other = self.speed.get(f"whole|{u.id}", {})
            if u is v or not self._pays(u) or mine.get("kl") is None or other.get("kl") is None:
                continue
            if {t.node for t in self.usable[v.id]} <= {t.node for t in self.usable[u.id]} \
                    and other["ratio"] <= mine["ratio"] \
                    and other["kl"] * DOMINANCE <= mine["kl"]:
                return u
        return None

    def _unit_tasks(self, layer_samples: int) -> list[tuple[str, Mapping[str, Any]]]:
        """The faster variants on each role (all layers at once), and the first of those on
        every role of a few layers."""
        tasks: list[tuple[str, Mapping[str, Any]]] = []
        for v in self.variants:
            if not self._pays(v):
                continue
            better = self.dominated(v)
            if better is not None:
                self.log.append(f"{v.label}: no faster than {better.label} on the whole model "
                                "and far less accurate; not scanned by role")
                continue
            by_role: dict[str, list[Target]] = {}
            for t in self.usable[v.id]:
                by_role.setdefault(t.role, []).append(t)
            for role, ts in by_role.items():
                self.role_nodes[(v.id, role)] = ts
                tasks.append((f"role|{v.id}|{role}", recipe_of([(v, ts)]).to_json()))
        reference = next((v for v in self.variants if self.usable[v.id] and self._pays(v)),
                         None)
        if reference is not None:
            self.measured_layers = sample_layers(self.layers, layer_samples)
            for layer in self.measured_layers:
                ts = [t for t in self.usable[reference.id] if t.layer == layer]
                if ts:
                    tasks.append((f"layer|{layer}", recipe_of([(reference, ts)]).to_json()))
        return tasks

    def judge_units(self, budget: Budget, layer_samples: int, say: Progress,
                    cancelled: CancelCheck | None = None,
                    stop: Callable[[], None] | None = None,
                    cluster: RayScan | None = None) -> None:
        """Accuracy by role and by layer (every variant on every node was judged as it was
        timed); what ranks the units is measured on the search half of the judged tokens."""
        tasks = self._unit_tasks(layer_samples)
        if stop is not None:
            stop()
        say(0.25, f"measuring {len(tasks)} rewrites on the prompt")
        acc = accuracy_in_parallel(self.path, self.prompt, tasks, self.cache,
                                   self.settings.threads, workers=ACCURACY_WORKERS,
                                   timeout=max(self.settings.timeout_s, 60.0) * 10,
                                   cancelled=cancelled, progress=part(say, 0.25, 0.75),
                                   cluster=cluster)
        self.roles = [RoleResult(vid, role, [t.node for t in ts],
                                 half(acc.get(f"role|{vid}|{role}", {}), "search").get("top1"),
                                 half(acc.get(f"role|{vid}|{role}", {}), "search").get("kl"),
                                 acc.get(f"role|{vid}|{role}", {}).get("error"))
                      for (vid, role), ts in self.role_nodes.items()]
        for v in self.variants:
            if not self.usable[v.id]:
                continue
            s = self.speed.get(f"whole|{v.id}", {})
            self.whole.append(WholeResult(v.id, len(self.usable[v.id]), s.get("top1"),
                                          s.get("kl"), s.get("ratio"), s.get("low"),
                                          s.get("high"), s.get("error"),
                                          dict(half(s, "confirm")) if "top1" in s else None))
        self.layer_kl = {layer: half(acc[f"layer|{layer}"], "search")["kl"]
                         for layer in self.measured_layers
                         if half(acc.get(f"layer|{layer}", {}), "search").get("kl") is not None}
        self.layer_search = [(half(acc[f"layer|{x}"], "search").get("kl"),
                              half(acc[f"layer|{x}"], "search").get("top1"))
                             for x in self.layer_kl]
        for w in self.whole:
            self.log.append(f"whole model {w.variant}: top-1 {fmt(w.top1)}, KL {fmt(w.kl)}, "
                            f"{'' if w.speedup is None else f'{w.speedup:.2f}× '}"
                            f"{'' if w.error is None else w.error}")
        self._note_positions(budget)

    def _note_positions(self, budget: Budget) -> None:
        positions = next((w.confirm.get("positions") for w in self.whole
                          if w.confirm and w.confirm.get("positions")), None)
        if positions and budget.min_top1 is not None and budget.confidence > 0.5:
            need = needed_agreement(budget.min_top1, positions, budget.confidence)
            self.log.append(
                f"the budget must hold at {budget.confidence:.0%} confidence on the {positions} "
                "positions that confirm a plan: " + (
                    f"a plan needs top-1 ≥ {need:.3f} there" if need is not None else
                    f"no plan can show top-1 ≥ {budget.min_top1:g} on so few; give a longer "
                    "prompt (a few hundred tokens) or a lower confidence"))

    @property
    def weights(self) -> dict[int, float]:
        """Each layer's share of sensitivity."""
        return layer_weights(self.layer_kl, self.layers)

    def measured_points(self) -> list[tuple[float | None, float | None]]:
        """Every (KL, top-1) the scan measured: roles, whole models, layers."""
        return ([(r.kl, r.top1) for r in self.roles] + [(w.kl, w.top1) for w in self.whole]
                + self.layer_search)

    def realise(self, choice: Mapping[tuple[int, str], Option]) -> tuple[Recipe, list[Choice]]:
        """The recipe and the choices of an assignment of options to units."""
        vmap = self.vmap
        unit_target = {t.unit: t for t in self.targets}
        pairs = [(vmap[o.variant], [unit_target[u]]) for u, o in choice.items()]
        chosen = [Choice(u[0], u[1], o.variant, o.nodes, o.gain, o.err)
                  for u, o in sorted(choice.items())]
        return recipe_of(pairs), chosen


def _synthetic_decode(model: onnx.ModelProto, settings: ProfileSettings, beside: str
                      ) -> dict[str, np.ndarray]:
    """The decode step after a synthetic past of ``--past`` tokens (the prompt is still what is
    judged)."""
    from opstudio.core.measure.workload import Workload

    return Workload(model, replace(settings, inputs_path=None), beside).at("decode")


def _tokens(prompt: Mapping[str, np.ndarray]) -> int | None:
    ids = prompt.get("input_ids")
    return None if ids is None else int(np.shape(ids)[-1])


def _kv_candidates(variants: list[Variant], targets: Sequence[Target], phase: str,
                   timed: dict[str, np.ndarray], log: list[str]
                   ) -> tuple[list[Variant], dict[str, np.ndarray]]:
    """``kv-cache`` is a candidate on a decode step whose past is long (``KV_PAST``) and a
    model with GroupQueryAttention. The step is then timed on a past of zeros as long as the
    prompt's: a quantized cache is fed the same past in its own type (``fit_cache_feed``),
    and attention over zeros reads and computes as much as over the prompt's keys."""
    if not any(v.technique == "kv-cache" for v in variants):
        return variants, timed
    past = max((np.shape(v)[-2] for k, v in timed.items()
                if "past" in k.lower() and np.ndim(v) >= 4), default=0)
    if phase != "decode" or past < KV_PAST or not any(t.op == KV_OP for t in targets):
        why = (f"the {phase} step's past is {past}" if phase != "decode" or past < KV_PAST
               else "the model has no GroupQueryAttention")
        log.append(f"KV cache: a candidate on a decode step with a past of {KV_PAST} tokens or "
                   f"more and GroupQueryAttention (fused, or exported so); here {why}: "
                   "not tried")
        return [v for v in variants if v.technique != "kv-cache"], timed
    log.append(f"KV cache: the step is timed on a zero-valued past of {past} tokens, which a "
               "quantized cache takes in its own type")
    return variants, {k: (np.zeros_like(v) if "past" in k.lower() and np.ndim(v) >= 4 else v)
                      for k, v in timed.items()}


def _has_logits(model: onnx.ModelProto) -> bool:
    """An output that ``accuracy`` will take for logits, judged from its declared shape."""
    from opstudio.core.measure.accuracy import output_kind

    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if out.type.tensor_type.elem_type not in (onnx.TensorProto.FLOAT,
                                                   onnx.TensorProto.FLOAT16):
            continue
        last = dims[-1].dim_value if dims else 0
        shape = (1,) * max(len(dims) - 1, 1) + (last or 2,)
        if output_kind(out.name, np.empty(shape, np.float32)) == "logits":
            return True
    return False


def _calibration_source(model: onnx.ModelProto, npz: str | None) -> str:
    """The prompt file when it feeds every model input (the recipe then names its own data);
    else "random", which calibrates on the samples the optimizer is given (the prompt here)."""
    if not npz:
        return "random"
    from opstudio.core.passes import model_inputs

    try:
        with np.load(npz, allow_pickle=False) as data:
            names = set(data.files)
    except (OSError, ValueError):
        return "random"
    return npz if all(i.name in names for i in model_inputs(model)) else "random"

