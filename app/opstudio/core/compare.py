"""Before/after comparison of two models: latency per original node, accuracy, size.

Both models are profiled on the same inputs, generated once from the *before* model (or read
from the user's ``.npz``). Rows are keyed by original node names: the profile of an optimized
model already reports kernels against the node they came from (provenance). When onnxruntime
fuses nodes differently in the two models (``mm0`` alone before, ``mm0`` + ``add0`` fused after),
the rows are merged into one group so that no time is compared against the wrong thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.accuracy import AccuracyReport, evaluate
from opstudio.core.errors import OpstudioError
from opstudio.core.inputs import make_inputs
from opstudio.core.isolation import call_isolated
from opstudio.core.model_io import load_model
from opstudio.core.profiler import Profile, ProfileSettings, profile_model
from opstudio.core.tempdir import opstudio_tempdir

Progress = Callable[[float, str], None]
CancelCheck = Callable[[], bool]


@dataclass
class NodeDelta:
    name: str
    op_type: str
    before_ms: float
    after_ms: float
    group: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        if self.after_ms <= 0:
            return None
        return self.before_ms / self.after_ms

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "op_type": self.op_type,
                "before_ms": round(self.before_ms, 6), "after_ms": round(self.after_ms, 6),
                "speedup": _round(self.speedup), "group": self.group}


@dataclass
class Comparison:
    before: Profile
    after: Profile
    nodes: list[NodeDelta]
    accuracy: AccuracyReport
    size_bytes: dict[str, int]
    before_path: str = ""
    after_path: str = ""

    @property
    def speedup(self) -> float | None:
        b = self.before.total_ms.get("p50") or self.before.total_ms.get("mean")
        a = self.after.total_ms.get("p50") or self.after.total_ms.get("mean")
        if not a or not b:
            return None
        return b / a

    @property
    def plain_speedup(self) -> float | None:
        b = (self.before.plain_ms or {}).get("p50")
        a = (self.after.plain_ms or {}).get("p50")
        if not a or not b:
            return None
        return b / a

    def op_types(self) -> list[dict[str, Any]]:
        before = {r["op_type"]: r["mean_ms"] for r in self.before.op_types}
        after = {r["op_type"]: r["mean_ms"] for r in self.after.op_types}
        rows = [{"op_type": op, "before_ms": before.get(op, 0.0), "after_ms": after.get(op, 0.0)}
                for op in dict.fromkeys([*before, *after])]
        rows.sort(key=lambda r: -max(r["before_ms"], r["after_ms"]))
        return rows

    def node(self, name: str) -> NodeDelta | None:
        for row in self.nodes:
            if row.name == name or name in row.group:
                return row
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "before_model": self.before_path,
            "after_model": self.after_path,
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "speedup": _round(self.speedup),
            "plain_speedup": _round(self.plain_speedup),
            "nodes": [n.to_json() for n in self.nodes],
            "op_types": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
                         for r in self.op_types()],
            "accuracy": self.accuracy.to_json(),
            "size_bytes": dict(self.size_bytes),
        }


def match_nodes(before: Profile, after: Profile) -> list[NodeDelta]:
    """Rows of (original node or group, time before, time after), slowest-before first.

    Times are per-run medians: on a busy machine one interrupted run can triple a mean, while
    the median of the same runs stays within a few percent."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra

    for prof in (before, after):
        for stats in prof.nodes:
            members = [stats.name, *stats.group]
            for m in members:
                union(members[0], m)

    # Representative name and op type come from the before profile's slowest member.
    clusters: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for side, prof in (("before", before), ("after", after)):
        for stats in prof.nodes:
            root = find(stats.name)
            c = clusters.get(root)
            if c is None:
                c = clusters[root] = {"name": stats.name, "op_type": stats.op_type,
                                      "before": 0.0, "after": 0.0, "members": []}
                order.append(root)
            c[side] += stats.p50_ms
            for m in [stats.name, *stats.group]:
                if m not in c["members"]:
                    c["members"].append(m)
    rows = [NodeDelta(c["name"], c["op_type"], c["before"], c["after"],
                      group=c["members"] if len(c["members"]) > 1 else [])
            for c in (clusters[r] for r in order)]
    rows.sort(key=lambda r: (-r.before_ms, r.name))
    return rows


def compare_models(before: str | Path | onnx.ModelProto, after: str | Path | onnx.ModelProto,
                   settings: ProfileSettings | None = None, *,
                   inputs: dict[str, np.ndarray] | None = None,
                   progress: Progress | None = None,
                   cancelled: CancelCheck | None = None) -> Comparison:
    """Profile ``before`` and ``after`` on identical inputs and measure the accuracy change."""
    settings = settings or ProfileSettings()

    def report(lo: float, hi: float) -> Progress | None:
        if progress is None:
            return None
        return lambda f, msg: progress(lo + (hi - lo) * max(0.0, min(1.0, f)), msg)

    with opstudio_tempdir() as tmp:
        before_path = _as_file(before, Path(tmp) / "before.onnx")
        after_path = _as_file(after, Path(tmp) / "after.onnx")
        if inputs is None:
            if progress:
                progress(0.0, "preparing inputs")
            inputs = make_inputs(load_model(before_path, load_external_data=False),
                                 dims=settings.dims, shapes=settings.shapes,
                                 npz_path=settings.inputs_path, seed=settings.seed)
        prof_before = profile_model(before_path, settings, inputs=inputs,
                                    progress=report(0.0, 0.45), cancelled=cancelled)
        prof_after = profile_model(after_path, settings, inputs=inputs,
                                   progress=report(0.45, 0.9), cancelled=cancelled)
        if progress:
            progress(0.9, "comparing outputs")
        accuracy = call_isolated(evaluate, str(before_path), str(after_path), inputs,
                                 timeout=settings.timeout_s, cancelled=cancelled)
        sizes = {"before": _model_size(before_path), "after": _model_size(after_path)}
    if progress:
        progress(1.0, "done")
    return Comparison(
        before=prof_before, after=prof_after, nodes=match_nodes(prof_before, prof_after),
        accuracy=accuracy, size_bytes=sizes,
        before_path=str(before) if not isinstance(before, onnx.ModelProto) else "",
        after_path=str(after) if not isinstance(after, onnx.ModelProto) else "",
    )


def _as_file(model: str | Path | onnx.ModelProto, target: Path) -> Path:
    if isinstance(model, onnx.ModelProto):
        from opstudio.core.model_io import save_model

        save_model(model, target, overwrite=True)
        return target
    path = Path(model)
    if not path.is_file():
        raise OpstudioError(f"{path}: no such file")
    return path


def _model_size(path: Path) -> int:
    """The .onnx file plus any external-data files it references."""
    total = path.stat().st_size
    try:
        model = load_model(path, load_external_data=False, name_nodes=False)
    except OpstudioError:
        return total
    from opstudio.core.model_io import iter_all_tensors

    seen: set[str] = set()
    for t in iter_all_tensors(model):
        for entry in t.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                side = path.parent / entry.value
                if side.is_file():
                    total += side.stat().st_size
    return total


def _round(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(x, digits)


def optimize_and_compare(model: onnx.ModelProto, recipe: Any, settings: ProfileSettings, *,
                         progress: Progress | None = None,
                         cancelled: CancelCheck | None = None) -> tuple[Any, Comparison]:
    """Apply ``recipe`` to ``model``, then compare the two: what the GUI's "Optimize & compare"
    runs. The inputs are made once and serve as calibration data and as the comparison's
    inputs, so everything is measured on the same tensors."""
    from opstudio.core.optimize import optimize

    def part(lo: float, hi: float) -> Progress | None:
        if progress is None:
            return None
        return lambda f, m: progress(lo + (hi - lo) * max(0.0, min(1.0, f)), m)

    inputs = make_inputs(model, dims=settings.dims, shapes=settings.shapes,
                         npz_path=settings.inputs_path, seed=settings.seed)
    result = optimize(model, recipe, inputs=inputs, progress=part(0.0, 0.25),
                      cancelled=cancelled)
    comparison = compare_models(model, result.model, settings, inputs=inputs,
                                progress=part(0.25, 1.0), cancelled=cancelled)
    return result, comparison
