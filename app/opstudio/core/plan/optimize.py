"""Apply a recipe to a model, step by step.

Each step runs its pass on the result of the previous step. Which nodes a step takes:

- a selector (``op_types`` and/or ``name_pattern``): every node of the current model of one of
  those types whose name, or the original name it stands for, matches a pattern; so a step may
  select op types an earlier step made (``kv-cache`` on GroupQueryAttention after ``fuse``).
  Nodes the pass cannot take are skipped and reported with the reason; op types the model lacks
  are noted and skipped. A node that a *later* step names explicitly is left to that step (with a note): an
  explicit name says more about that node than a type does.
- ``nodes``: names always refer to the original model. A name still present in the current model
  is that node; a name an earlier step rewrote stands for the nodes that came from it (their
  provenance lists it), e.g. ``mm0`` after lowrank is ``mm0_lowrank_a`` and ``mm0_lowrank_b``.
  A named node the pass cannot take is an error; for a rewritten node it is an error only if
  none of the nodes that came from it can take the technique (the others are skipped).

After every step the model must be valid as onnxruntime sees it (``validity``), so a failure
names the step that caused it. A recipe that rewrites nothing at all is an error
(``NothingRewritten``) that says why each step changed nothing. Nothing is written unless every
step succeeds; ``optimize_file`` writes atomically.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import Cancelled, OpstudioError
from opstudio.core.measure.inputs import NeedsInputs
from opstudio.core.measure.memory import available_bytes, weight_bytes
from opstudio.core.model import provenance, validity
from opstudio.core.model.graph_utils import copy_model
from opstudio.core.model.model_io import (
    LAZY_INLINE_ABOVE,
    ensure_node_names,
    is_lazy,
    load_model,
    load_weights,
    model_size,
    same_file,
    save_model,
)
from opstudio.core.model.tensors import human_bytes
from opstudio.core.passes import (
    ContractBroken,
    PassContext,
    RewriterFailed,
    all_passes,
    get_pass,
)
from opstudio.core.plan import reasons
from opstudio.core.plan.recipe import Recipe, Step, known_as, named_later, no_match_reason, validate
from opstudio.core.progress import CancelCheck, Progress, clamped, part

# A model opened lazily with more weight bytes than this keeps them in their files through the
# steps whose pass streams them; a smaller one is read at once (and written inline, as before).
STREAM_ABOVE = LAZY_INLINE_ABOVE


@dataclass
class StepReport:
    index: int  # 1-based
    technique: str
    params: dict[str, Any]
    applied: list[str] = field(default_factory=list)  # nodes of the step's input model rewritten
    skipped: dict[str, str] = field(default_factory=dict)  # node -> reason
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "technique": self.technique, "params": self.params,
                "applied": list(self.applied), "skipped": dict(self.skipped),
                "details": {k: _json_safe(v) for k, v in self.details.items()},
                "notes": list(self.notes), "seconds": round(self.seconds, 4)}


@dataclass
class OptimizeResult:
    model: onnx.ModelProto
    steps: list[StepReport]

    def to_json(self) -> dict[str, Any]:
        return {"steps": [s.to_json() for s in self.steps]}


class NothingRewritten(OpstudioError):
    """No step of the recipe rewrote any node; ``steps`` holds each step's report."""

    def __init__(self, steps: Sequence[StepReport]) -> None:
        self.steps = list(steps)
        parts = []
        for s in self.steps:
            why = [n for n in s.notes if not n.endswith("the step changed nothing")]
            if s.skipped:
                why.append(f"{len(s.skipped)} node(s) cannot take it: "
                           + reasons.summarise(s.skipped.values()))
            parts.append(f"step {s.index} ({s.technique}): " + ("; ".join(why) or "no node"))
        super().__init__("the recipe rewrote no node, so there is nothing to write — "
                         + " / ".join(parts))


def optimize(model: onnx.ModelProto, recipe: Recipe, *,
             inputs: Mapping[str, np.ndarray] | None = None,
             calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
             progress: Progress | None = None,
             cancelled: CancelCheck | None = None,
             consume: bool = False) -> OptimizeResult:
    """Apply ``recipe`` to a copy of ``model``; ``model`` itself is not changed.

    ``calibration`` (or else ``inputs`` as a single sample) is what static INT8 calibrates on.
    With ``consume`` the caller hands ``model`` over (it may be changed) and no copy of the
    weights is made: what a big model needs to be optimized within about twice its size. A model
    opened lazily with more than ``STREAM_ABOVE`` bytes of weights keeps them in their files
    through the steps whose pass reads one weight at a time (``Pass.reads_lazy``); before any
    other step its weights are read into it (refused when they would not fit in the memory
    that is free, and said in the step's notes).
    """
    current = model if consume else copy_model(model)
    del model
    if is_lazy(current) and weight_bytes(current)[0] <= STREAM_ABOVE:
        load_weights(current)  # small: read at once, rewritten and written as before
    ensure_node_names(current)
    deferred = validate(recipe, current)
    later = named_later(recipe)
    original_types = {n.op_type for n in current.graph.node}
    samples: list[Mapping[str, np.ndarray]] = list(calibration or ([inputs] if inputs else []))
    reports: list[StepReport] = []
    total = len(recipe.steps)
    for index, step in enumerate(recipe.steps, start=1):
        if cancelled is not None and cancelled():
            raise Cancelled()
        where = step.describe(index)
        lo, span = (index - 1) / total, 1 / total

        sub = part(clamped(progress), lo, lo + span)

        sub(0.0, f"{where}: starting")
        started = time.perf_counter()
        pass_ = get_pass(step.technique)
        params = pass_.validate_params(step.params)
        read_in = None
        if not pass_.reads_lazy(params) and is_lazy(current):
            # this pass rewrites weights in memory: a model opened lazily gets them now
            read_in = _read_weights(current, where, step.technique, sub)
        if step.is_selector:
            if index in deferred and not any(step.selects(n.op_type, known_as(n))
                                             for n in current.graph.node):
                raise OpstudioError(f"{where}: selects no node: {no_match_reason(step, current)} "
                                    "(no earlier step made one)")
            targets, derived = _select(current, step, later[index - 1])
            notes = _selector_notes(current, step, recipe, later[index - 1], original_types)
        else:
            targets, derived = _resolve(current, step, index)
            notes = []
        if read_in:
            notes.append(read_in)
        applied: list[str] = []
        skipped: dict[str, str] = {}
        details: dict[str, dict[str, Any]] = {}
        size_before = model_size(current) if targets and _makes_weights(current) else None
        if targets:
            # the pass reports 0..1 of its own work: that is the first 90 % of the step
            pass_progress = part(sub, 0.0, 0.9)
            # ``current`` is always the optimizer's own (a copy, a handed-over model or an
            # earlier step's result): the pass may rewrite it in place. Its validity is
            # checked below, naming the step, not a second time inside the pass.
            ctx = PassContext(inputs=samples, progress=pass_progress,
                              cancelled=cancelled, owns_model=True, check_validity=False)
            try:
                result = pass_.apply(current, targets, params, ctx)
            except ContractBroken as exc:  # say which step met it; a defect stays one
                raise ContractBroken(f"{where}: {exc}", exc.technique) from exc
            except RewriterFailed as exc:  # say which step met it
                raise OpstudioError(f"{where}: {exc}") from exc
            except NeedsInputs as exc:  # calibration data, made when none was given
                raise OpstudioError(f"{where} runs the model on sample inputs, which cannot be "
                                    f"made: {exc}") from exc
            except (OpstudioError, Cancelled):
                raise
            except Exception as exc:
                raise OpstudioError(f"{where}: failed ({type(exc).__name__}: "
                                    f"{_first_line(exc)})") from exc
            _check_named(step, where, result.skipped, derived, current)
            # the step's input is dropped before the check loads its output in onnxruntime
            current = result.model
            applied, skipped, details = (list(result.applied),
                                         _standing_in(result.skipped, derived, result.applied),
                                         dict(result.details))
            notes.extend(result.notes)
            del result
            sub(0.9, f"{where}: checking the result")
            _check_model(current, where)
            if size_before is not None:
                notes.extend(_growth(size_before, model_size(current)))
        if not applied:
            notes.append("no node could take this technique; the step changed nothing" if targets
                         else "no node left to rewrite; the step changed nothing")
        reports.append(StepReport(index=index, technique=step.technique, params=params,
                                  applied=applied, skipped=skipped, details=details, notes=notes,
                                  seconds=time.perf_counter() - started))
        sub(1.0, f"{where}: done")
    if reports and not any(r.applied for r in reports):
        raise NothingRewritten(reports)
    return OptimizeResult(model=current, steps=reports)


def optimize_file(in_path: str | os.PathLike[str], recipe: Recipe,
                  out_path: str | os.PathLike[str], *, overwrite: bool = False,
                  inputs: Mapping[str, np.ndarray] | None = None,
                  calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
                  progress: Progress | None = None,
                  cancelled: CancelCheck | None = None) -> OptimizeResult:
    """Optimize the model at ``in_path`` and write it to ``out_path`` (never over the input)."""
    src, dst = Path(in_path), Path(out_path)
    if same_file(src, dst) or (not dst.exists() and src.resolve() == dst.resolve()):
        raise OpstudioError(f"{dst}: is the input model; choose another output file")
    if dst.exists() and not overwrite:
        raise OpstudioError(f"{dst}: already exists (choose another name or allow overwriting)")
    result = optimize(load_model(src, lazy=True), recipe, inputs=inputs, calibration=calibration,
                      progress=progress, cancelled=cancelled, consume=True)
    if cancelled is not None and cancelled():
        raise Cancelled()
    save_model(result.model, dst, overwrite=overwrite)
    return result


def _read_weights(model: onnx.ModelProto, where: str, technique: str,
                  say: Progress) -> str:
    """Read a big lazily opened model's weights in for a step whose pass rewrites them in
    memory; refused in words when they would not fit. Returns the step's note."""
    need = weight_bytes(model)[0]
    free = available_bytes()
    streaming = ", ".join(p.technique for p in all_passes()
                          if p.reads_lazy(p.validate_params({})))
    why = (f"{technique} with these parameters rewrites the model in memory and cannot read "
           "its weights one at a time")
    if free is not None and need > free:
        raise OpstudioError(f"{where}: {why}; it would read all {human_bytes(need)} of weights "
                            f"into memory, and only {human_bytes(free)} is free. These "
                            f"techniques rewrite one weight at a time: {streaming}")
    say(0.0, f"{where}: reading all {human_bytes(need)} of weights into memory")
    load_weights(model)
    return f"read all {human_bytes(need)} of weights into memory: {why}"


def _select(model: onnx.ModelProto, step: Step,
            later: Mapping[str, int]) -> tuple[list[str], dict[str, list[str]]]:
    """Nodes of the current model a selector step takes: those it selects, less those a later
    step names (by their own or their original name)."""
    return [n.name for n in model.graph.node
            if step.selects(n.op_type, known_as(n)) and not _named_later(n, later)], {}


def _named_later(node: onnx.NodeProto, later: Mapping[str, int]) -> int | None:
    steps = [later[name] for name in known_as(node) if name in later]
    return min(steps) if steps else None


def _selector_notes(model: onnx.ModelProto, step: Step, recipe: Recipe,
                    later: Mapping[str, int], original_types: set[str]) -> list[str]:
    notes: list[str] = []
    present = {n.op_type for n in model.graph.node}
    for op_type in step.op_types or []:
        if op_type not in present:
            notes.append(f"the model has no '{op_type}' nodes (skipped)"
                         if op_type not in original_types else
                         f"no '{op_type}' nodes are left (earlier steps rewrote them)")
    left: dict[int, list[str]] = {}
    for n in model.graph.node:
        owner = _named_later(n, later) if step.selects(n.op_type, known_as(n)) else None
        if owner is not None:
            left.setdefault(owner, []).append(n.name)
    for owner, names in sorted(left.items()):
        shown = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
        notes.append(f"left {shown} to step {owner} ({recipe.steps[owner - 1].technique}), "
                     f"which names {'it' if len(names) == 1 else 'them'}")
    return notes


def _resolve(model: onnx.ModelProto, step: Step, index: int) -> tuple[list[str], dict[str, list[str]]]:
    """Node names of the current model a ``nodes`` step applies to, and for each named original
    node that an earlier step rewrote, the nodes standing for it."""
    where = step.describe(index)
    present = {n.name for n in model.graph.node}
    targets: list[str] = []
    derived: dict[str, list[str]] = {}
    for name in step.nodes or []:
        if name in present:
            if name not in targets:
                targets.append(name)
            continue
        members = [n.name for n in model.graph.node if name in provenance.get_origin(n)]
        if not members:
            raise OpstudioError(f"{where}: node '{name}' is no longer in the model "
                                "(an earlier step removed it)")
        derived[name] = members
        targets.extend(m for m in members if m not in targets)
    return targets, derived


def _standing_in(skipped: Mapping[str, str], derived: Mapping[str, list[str]],
                 applied: Sequence[str]) -> dict[str, str]:
    """``skipped`` without the nodes that stand for a named original beside one that took the
    technique (a packed gate|up's Split beside its MatMul): that original was rewritten."""
    done = set(applied)
    covered = {m for members in derived.values() if done.intersection(members) for m in members}
    return {name: why for name, why in skipped.items() if name not in covered}


def _check_named(step: Step, where: str, skipped: Mapping[str, str],
                 derived: Mapping[str, list[str]], model: onnx.ModelProto) -> None:
    if step.nodes is None:
        return
    op_types = {n.name: n.op_type for n in model.graph.node}
    for name in step.nodes:
        if name in derived:
            members = derived[name]
            if all(m in skipped for m in members):
                reasons = "; ".join(f"{m} ({op_types.get(m, '?')}): {skipped[m]}"
                                    for m in members[:3])
                raise OpstudioError(f"{where}: none of the nodes made from '{name}' by earlier "
                                    f"steps can take {step.technique}: {reasons}")
        elif name in skipped:
            raise OpstudioError(f"{where}: node '{name}' ({op_types.get(name, '?')}) cannot take "
                                f"{step.technique}: {skipped[name]}")


# ops old exports compute weights with at run time (ConstantOfShape fills, Expand/Tile of a
# scalar); a step that reads such a weight stores the values it computed
_WEIGHT_MAKERS = {"ConstantOfShape", "Expand", "Tile"}


def _makes_weights(model: onnx.ModelProto) -> bool:
    return any(n.op_type in _WEIGHT_MAKERS and n.domain in ("", "ai.onnx")
               for n in model.graph.node)


def _growth(size_before: int, size_after: int) -> list[str]:
    """The step's note when the file grew a lot because weights the model computed at run
    time are stored initializers now, so that a user is not surprised by its size."""
    if size_after < 4 * size_before or size_after - size_before < 2**20:
        return []
    return ["weights the model computed at run time from small constants (ConstantOfShape "
            "and the like) are stored in the file now: it grows from "
            f"{human_bytes(size_before)} to {human_bytes(size_after)}"]


def _check_model(model: onnx.ModelProto, where: str) -> None:
    try:
        validity.check_model(model)
    except validity.InvalidModel as exc:
        raise OpstudioError(f"{where}: the result is {exc}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
