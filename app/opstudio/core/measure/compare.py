"""Before/after comparison of two models: latency per original node, accuracy, size.

Both models are profiled on the same inputs, generated once from the *before* model (or read
from the user's ``.npz``), in one child process, their runs taking turns round by round
(``profiler.profile_models``): run ``i`` of before and run ``i`` of after are moments apart, so
the median of their paired ratios (``timing.paired_ratio``, with its 95 % interval)
is nearly free of what else the machine was doing. Each total and node gets the one verdict of
``Ratio.verdict``: faster or slower beyond the noise, "≈ 1×" within it, or too few runs to tell,
whatever its median says. Rows are keyed by original node names: the profile of an optimized
model already reports kernels against the node they came from (provenance). When onnxruntime
fuses nodes differently in the two models (``mm0`` alone before, ``mm0`` + ``add0`` fused after),
the rows are merged into one group so that no time is compared against the wrong thing.

An AFTER made by another tool carries no provenance: onnxruntime's quantizers rename what they
replace (``…/up_proj/MatMul`` → ``…/up_proj/MatMul_Q4`` reading ``W_Q4``, ``fc2`` → ``fc2_quant``).
``map_nodes`` then finds each AFTER node's original from the weight it reads (the same
initializer, or one named from it: ``W_Q4``, ``W_scales`` → ``W``), else from its name stem
(``X_Q4``, ``X_quant``, ``X_Q4_shape_a`` → ``X``). An original with no counterpart in AFTER is
*removed* (it has no after time, which is not the same as 0 ms), a node only in AFTER *added*.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.isolation import call_isolated
from opstudio.core.measure import timing
from opstudio.core.measure.accuracy import AccuracyReport, evaluate
from opstudio.core.measure.profile import Profile
from opstudio.core.measure.profiler import profile_models
from opstudio.core.measure.request import compare_requests, estimate_requests
from opstudio.core.measure.settings import ProfileSettings, RunSettings
from opstudio.core.measure.timing import Ratio, paired_speedup, quiet_rounds
from opstudio.core.measure.workload import Workload, workload_for
from opstudio.core.model.model_io import load_model, stored_bytes
from opstudio.core.model.provenance import get_origin
from opstudio.core.progress import CancelCheck, Progress, part
from opstudio.core.tempdir import opstudio_tempdir

# What quantizers and exporters append to the name of a node they replace (``X_Q4``, ``X_quant``,
# helper nodes ``X_Q4_shape_a``) and of a weight they rewrite (``W_Q4``, ``W_scales``,
# ``W_zero_points``, ``W_DQ_Q4``). Cut at a marker, the name is the original's.
_NODE_MARKERS = re.compile(r"_(Q\d+|quant|quantized|MatMulNBits|MatMul|int[48]|fp16|bf16)(?=_|$)")
_WEIGHT_MARKERS = re.compile(
    r"_(Q\d+|DQ|quant|quantized|scales?|zero_points?|zp|int[48]|fp16|bf16)(?=_|$)")
# A tensor smaller than this is a constant (axes, shapes, epsilon) many unrelated nodes may
# share, not a weight that says which node it belongs to.
_MIN_WEIGHT_ELEMENTS = 16
# Nodes that compute a weight from constants (fp16 storage, a tied embedding's transpose):
# followed back to the initializers they read.
_CONST_DEPTH = 4

SAME, MAPPED, REMOVED, ADDED, FUSED = "same", "mapped", "removed", "added", "fused"



@dataclass
class NodeDelta:
    name: str
    op_type: str
    before_ms: float | None  # None: the node is not in BEFORE (added)
    after_ms: float | None  # None: no node of AFTER stands for it (removed)
    group: list[str] = field(default_factory=list)
    # same, mapped (renamed or replaced in AFTER), removed, added, fused (into a kernel of
    # AFTER standing for several nodes: the row is named after that kernel)
    status: str = SAME
    after_names: list[str] = field(default_factory=list)  # AFTER's nodes when renamed
    # before/after of the paired runs, with its interval (None: one side missing or not timed)
    ratio: Ratio | None = None
    # ms per timed run of each side (the row's members summed), for error bars
    before_series: list[float] = field(default_factory=list, repr=False)
    after_series: list[float] = field(default_factory=list, repr=False)

    @property
    def speedup(self) -> float | None:
        if self.after_ms is None or self.before_ms is None or self.after_ms <= 0:
            return None
        if self.ratio is not None:
            return self.ratio.median
        return self.before_ms / self.after_ms

    @property
    def significant(self) -> bool | None:
        """The interval excludes 1 (None: nothing to compare, or compared without runs)."""
        return None if self.ratio is None else self.ratio.significant

    def label(self) -> str:
        """The speedup as shown (``Ratio.label``), "" when there is none."""
        return speedup_label(self.speedup, self.ratio)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "op_type": self.op_type,
                "before_ms": _ms(self.before_ms), "after_ms": _ms(self.after_ms),
                "speedup": _round(self.speedup), "speedup_ci": _ci(self.ratio),
                "significant": self.significant, "verdict": _verdict(self.ratio),
                "group": self.group, "status": self.status,
                "after_names": list(self.after_names)}


def speedup_label(speedup: float | None, ratio: Ratio | None, digits: int = 2) -> str:
    """How a speedup is shown everywhere: the ratio's label (``Ratio.label``), the bare figure
    when it was not measured in pairs, "" when there is none."""
    if speedup is None:
        return ""
    return ratio.label(digits) if ratio is not None else f"{speedup:.{digits}f}×"


def interval_text(ratio: Ratio | None) -> str:
    """The 95 % interval in words, for tooltips and tables."""
    if ratio is None:
        return ""
    return (f"{ratio.words()}: 95 % interval {ratio.low:.2f}–{ratio.high:.2f}× over "
            f"{ratio.rounds} paired runs{_sessions(ratio)}")


def operators_changed(rows: Sequence[NodeDelta]) -> str:
    """How the timed operators' verdicts fall: "2 of 9 operators faster, 1 slower, the others
    ≈ 1×" (with "too few runs to tell" when the pairs cannot), and over how many profiled
    sessions of each model."""
    counts = {v: sum(1 for r in rows if r.ratio is not None and r.ratio.verdict == v)
              for v in (timing.FASTER, timing.SLOWER, timing.SAME, timing.UNDECIDED)}
    undecided = [r.ratio for r in rows if r.ratio is not None and r.ratio.verdict == timing.UNDECIDED]
    if undecided and len(undecided) == len(rows):
        return f"operators: {undecided[0].too_few()}"
    parts = [f"{counts[timing.FASTER]} of {len(rows)} operators faster beyond the noise",
             f"{counts[timing.SLOWER]} slower"]
    if counts[timing.UNDECIDED]:
        parts.append(f"{counts[timing.UNDECIDED]} too few runs to tell")
    parts.append(f"{counts[timing.SAME]} ≈ 1×")
    k = max((r.ratio.sessions for r in rows if r.ratio is not None), default=1)
    if k > 1:
        return ", ".join(parts) + f" (profiled on {k} sessions of each model)"
    return ", ".join(parts) + (" (profiled on one session of each model: what two sessions of "
                               "one model differ by is not in the operators' intervals)")


def _sessions(ratio: Ratio) -> str:
    return f" on {ratio.sessions} sessions of each model" if ratio.sessions > 1 else ""


def _verdict(ratio: Ratio | None) -> str | None:
    """The JSON ``verdict``: faster, slower, same, undecided (None: not timed in pairs)."""
    return None if ratio is None else ratio.verdict


@dataclass
class FusedUnit:
    """One kernel of AFTER standing for several nodes of BEFORE (``fuse``: an attention block
    becomes one GroupQueryAttention), with the helpers computing its inputs."""

    name: str  # the fused node's name
    op_type: str
    members: list[str]  # BEFORE's nodes it stands for


@dataclass
class NodeMap:
    """Which nodes of BEFORE each node of AFTER stands for, and how that was found."""
    origins: dict[str, list[str]] = field(default_factory=dict)  # AFTER node -> BEFORE nodes
    how: dict[str, str] = field(default_factory=dict)  # AFTER node -> same/provenance/weight/name
    removed: list[str] = field(default_factory=list)  # BEFORE nodes nothing stands for
    added: list[str] = field(default_factory=list)  # AFTER nodes standing for nothing
    # Profile rows are named by provenance (an optimized BEFORE reports "mm0" for the node
    # "mm0_lowrank_a"): the names rows of each side carry, per node
    before_rows: dict[str, list[str]] = field(default_factory=dict)
    after_rows: dict[str, list[str]] = field(default_factory=dict)
    units: list[FusedUnit] = field(default_factory=list)  # AFTER's kernels fusing BEFORE's nodes
    # BEFORE's nodes gone from AFTER whose outputs only fused nodes read (a mask, rotary tables,
    # a norm's constants): the fused kernels do their work, so they are not "removed"
    absorbed: list[str] = field(default_factory=list)

    def renamed(self) -> dict[str, list[str]]:
        """AFTER's row name -> BEFORE's row names, for the nodes found by weight or name (the
        profiler already reports provenance-carrying nodes against their originals)."""
        out: dict[str, list[str]] = {}
        for a, how in self.how.items():
            if how in ("weight", "name"):
                targets = [r for b in self.origins[a] for r in self.before_rows.get(b, [b])]
                for row in self.after_rows.get(a, [a]):
                    out[row] = list(dict.fromkeys([*out.get(row, []), *targets]))
        return out

    def claimed(self) -> set[str]:
        """BEFORE's nodes some node of AFTER stands for, and the row names they carry."""
        nodes = {b for names in self.origins.values() for b in names}
        return nodes | {r for b in nodes for r in self.before_rows.get(b, [])}


@dataclass
class Comparison:
    before: Profile
    after: Profile
    nodes: list[NodeDelta]
    accuracy: AccuracyReport
    size_bytes: dict[str, int]
    before_path: str = ""
    after_path: str = ""
    # paired before/after ratios of the whole model, profiled (model_run) and plain
    total_ratio: Ratio | None = None
    plain_ratio: Ratio | None = None
    # before/after of a whole request (settings.request on a KV-cache decoder; core.request)
    request: Any = None
    # the step of a KV-cache decoder the profiles timed ("prefill of 128 tokens"; "" for
    # another model): the totals and per-operator rows are that step's
    step: str = ""
    # AFTER's fused kernels (map_nodes) and how many of BEFORE's nodes they stand for
    units: list[FusedUnit] = field(default_factory=list)
    fused_nodes: int = 0

    @property
    def speedup(self) -> float | None:
        if self.total_ratio is not None:
            return self.total_ratio.median
        b = self.before.total_ms.get("p50") or self.before.total_ms.get("mean")
        a = self.after.total_ms.get("p50") or self.after.total_ms.get("mean")
        if not a or not b:
            return None
        return b / a

    @property
    def plain_speedup(self) -> float | None:
        if self.plain_ratio is not None:
            return self.plain_ratio.median
        b = (self.before.plain_ms or {}).get("p50")
        a = (self.after.plain_ms or {}).get("p50")
        if not a or not b:
            return None
        return b / a

    @property
    def verdict(self) -> Ratio | None:
        """The whole model's ratio a user acts on: the plain runs' (what the model costs
        without the profiler), else the profiled ones'."""
        return self.plain_ratio if self.plain_ratio is not None else self.total_ratio

    @property
    def significant(self) -> bool | None:
        v = self.verdict
        return None if v is None else v.significant

    def verdict_text(self) -> str:
        """One line, ``Ratio.words`` with the interval: "1.85× faster, 95 % interval [1.79,
        1.92]", "1.15× slower (0.87×), …", "≈ 1× (no change beyond the noise), …", "too few
        runs to tell (5 pairs; 6 needed), …"."""
        v = self.verdict
        if v is None:
            return ""
        ci = f"95 % interval [{v.low:.2f}, {v.high:.2f}]"
        if v.verdict == timing.SLOWER:
            return f"{v.words()} ({v.median:.2f}×), {ci}"
        return f"{v.words()}, {ci}"

    def noise(self) -> str:
        """What the machine was like while the two were timed (the busier side speaks)."""
        sides = [p.noise for p in (self.before, self.after) if p.noise]
        busy = [n for n in sides if n.get("busy")]
        if busy:
            return max(busy, key=lambda n: sum(n.get("disturbed", {}).values()))["message"]
        return sides[0].get("message", "") if sides else ""

    def op_types(self) -> list[dict[str, Any]]:
        before = {r["op_type"]: r["mean_ms"] for r in self.before.op_types}
        after = {r["op_type"]: r["mean_ms"] for r in self.after.op_types}
        b_series, a_series = _series_by_op(self.before), _series_by_op(self.after)
        rounds = quiet_rounds(self.before.total_series_ms, self.after.total_series_ms)
        on = profiled_sessions(self.before, self.after)
        rows = []
        for op in dict.fromkeys([*before, *after]):
            ratio = paired_speedup(b_series.get(op, []), a_series.get(op, []), rounds, on)
            b, a = before.get(op, 0.0), after.get(op, 0.0)
            rows.append({"op_type": op, "before_ms": b, "after_ms": a,
                         "speedup": (ratio.median if ratio is not None
                                     else (b / a if a > 0 and b > 0 else None)),
                         "ratio": ratio})
        rows.sort(key=lambda r: -max(r["before_ms"], r["after_ms"]))
        return rows

    def changes(self) -> dict[str, int]:
        """How many rows were matched by weight or name, removed or added; how many nodes were
        fused into how many kernels."""
        counts = {MAPPED: 0, REMOVED: 0, ADDED: 0}
        for row in self.nodes:
            if row.status in counts:
                counts[row.status] += 1
        return {**counts, FUSED: self.fused_nodes, "kernels": len(self.units)}

    def changes_text(self) -> str:
        """The changes in one line ("" when none): "104 nodes fused into 7 kernels
        (GroupQueryAttention ×2, …)", then the renamed, removed and added rows."""
        n = self.changes()
        parts = []
        if n[FUSED]:
            kinds = Counter(u.op_type for u in self.units)
            parts.append(f"{n[FUSED]} nodes fused into {n['kernels']} kernels ("
                         + ", ".join(f"{op} ×{k}" for op, k in kinds.most_common()) + ")")
        if n[MAPPED] or not parts:
            parts.append(f"{n[MAPPED]} renamed or replaced (matched to the originals by "
                         "provenance, weight or name)")
        if n[REMOVED] or not n[FUSED]:
            parts.append(f"{n[REMOVED]} removed")
        if n[ADDED] or not n[FUSED]:
            parts.append(f"{n[ADDED]} added")
        return ", ".join(parts) if any(n.values()) else ""

    def node(self, name: str) -> NodeDelta | None:
        for row in self.nodes:
            if row.name == name or name in row.group:
                return row
        return None

    def to_json(self) -> dict[str, Any]:
        op_rows = []
        for r in self.op_types():
            ratio = r.pop("ratio")
            row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
            row["speedup_ci"] = _ci(ratio)
            row["significant"] = None if ratio is None else ratio.significant
            row["verdict"] = _verdict(ratio)
            op_rows.append(row)
        return {
            "before_model": self.before_path,
            "after_model": self.after_path,
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            # the whole model's verdict: the plain runs' ratio (else the profiled ones')
            "speedup_ci": _ci(self.verdict),
            "significant": self.significant,
            # faster | slower | same | undecided (too few runs to tell)
            "verdict": _verdict(self.verdict),
            "speedup": _round(self.speedup),
            "profiled_speedup_ci": _ci(self.total_ratio),
            "plain_speedup": _round(self.plain_speedup),
            "plain_speedup_ci": _ci(self.plain_ratio),
            "noise": self.noise(),
            "nodes": [n.to_json() for n in self.nodes],
            "node_changes": self.changes(),
            "op_types": op_rows,
            "accuracy": self.accuracy.to_json(),
            "size_bytes": dict(self.size_bytes),
            **({"request": self.request.to_json()} if self.request is not None else {}),
            **({"step": self.step} if self.step else {}),
        }


def map_nodes(before: onnx.ModelProto, after: onnx.ModelProto) -> NodeMap:
    """Each top-level node of ``after`` to the nodes of ``before`` it stands for: the node of the
    same name, else its provenance, else the node reading the same weight (or the weight it was
    made from), else the node its name was made from. Models need no weights loaded."""
    b_names = [n.name for n in before.graph.node if n.name]
    b_set = set(b_names)
    out = NodeMap(before_rows={n.name: get_origin(n) for n in before.graph.node},
                  after_rows={n.name: get_origin(n) for n in after.graph.node})
    pending: list[onnx.NodeProto] = []
    for node in after.graph.node:
        origins = out.after_rows[node.name]
        if origins == [node.name] and node.name in b_set:
            out.origins[node.name], out.how[node.name] = [node.name], "same"
        elif [o for o in origins if o in b_set]:
            out.origins[node.name] = [o for o in origins if o in b_set]
            out.how[node.name] = "provenance"
        else:
            pending.append(node)
    # Only originals no node of AFTER kept by name or provenance can be stood for by a renamed
    # node: a tied embedding's Gather, still there, must not take the renamed lm_head.
    kept = out.claimed()
    readers: dict[str, list[str]] = {}
    for reader, weights in _weights_read(before).items():
        if reader not in kept:
            for w in weights:
                readers.setdefault(w, []).append(reader)
    after_weights = _weights_read(after)
    b_ops = {n.name: n.op_type for n in before.graph.node}
    for node in pending:
        found = _by_weight(node, after_weights.get(node.name, []), readers, b_ops)
        how = "weight"
        if not found:
            found = [s for s in _stems(node.name, _NODE_MARKERS) if s in b_set and s not in kept][:1]
            how = "name"
        if found:
            out.origins[node.name], out.how[node.name] = found, how
        else:
            out.origins[node.name], out.how[node.name] = [], ""
            out.added.append(node.name)
    out.units = _fused_units(after, out)
    claimed = out.claimed()
    out.absorbed = _absorbed(before, {m for u in out.units for m in u.members},
                             [n for n in b_names if n not in claimed])
    absorbed = set(out.absorbed)
    out.removed = [n for n in b_names if n not in claimed and n not in absorbed]
    return out


def _fused_units(after: onnx.ModelProto, mapping: NodeMap) -> list[FusedUnit]:
    """AFTER's nodes standing for several of BEFORE's by provenance, one unit per set of
    originals: a GroupQueryAttention and the helpers computing its sequence lengths carry the
    same set, and the contrib-domain node among them is the kernel that names it."""
    by_set: dict[tuple[str, ...], list[onnx.NodeProto]] = {}
    for node in after.graph.node:
        origins = mapping.origins.get(node.name, [])
        if mapping.how.get(node.name) == "provenance" and len(origins) > 1:
            by_set.setdefault(tuple(sorted(origins)), []).append(node)
    units = []
    for nodes in by_set.values():
        kernel = next((n for n in nodes if n.domain not in ("", "ai.onnx")), nodes[-1])
        units.append(FusedUnit(kernel.name, kernel.op_type, list(mapping.origins[kernel.name])))
    return units


def _absorbed(before: onnx.ModelProto, fused: set[str], gone: list[str]) -> list[str]:
    """Those of ``gone`` whose outputs only fused nodes (or other such nodes) read, and that no
    graph output is: what a fused kernel computes inside itself."""
    if not fused or not gone:
        return []
    readers: dict[str, list[str]] = {}
    for node in before.graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node.name)
    outputs = {o.name for o in before.graph.output}
    nodes = {n.name: n for n in before.graph.node}
    inside = set(fused)
    candidates = set(gone)
    changed = True
    while changed:
        changed = False
        for name in candidates - inside:
            outs = [o for o in nodes[name].output if o]
            users = [r for o in outs for r in readers.get(o, [])]
            if users and not outputs.intersection(outs) and all(u in inside for u in users):
                inside.add(name)
                changed = True
    return [n for n in gone if n in inside]


def _by_weight(node: onnx.NodeProto, weights: list[str], readers: Mapping[str, list[str]],
               ops: Mapping[str, str]) -> list[str]:
    """The one original reading ``weights`` (or the tensors they were made from). When several
    do (a tied embedding: its Gather and the lm_head), the one ``node``'s name was made from,
    else the one in the same name scope, else the one whose op it extends (``Gather`` →
    ``GatherBlockQuantized``, ``MatMul`` → ``MatMulNBits``); else none, rather than a guess."""
    scope = node.name.rsplit("/", 1)[0] if "/" in node.name else None
    for w in weights:
        for key in [w, *_stems(w, _WEIGHT_MARKERS)]:
            found = list(dict.fromkeys(readers.get(key, [])))
            if not found:
                continue
            if len(found) == 1:
                return found
            for pick in ([s for s in _stems(node.name, _NODE_MARKERS) if s in found],
                         [f for f in found if scope and f.rsplit("/", 1)[0] == scope],
                         [f for f in found if f in ops and ops[f] in node.op_type]):
                if len(pick) == 1:
                    return pick
            return []
    return []


def _stems(name: str, markers: re.Pattern[str]) -> list[str]:
    """``name`` cut at each marker, the longest first: ``X_Q4_shape_a`` → [``X``]."""
    return [name[:m.start()] for m in reversed(list(markers.finditer(name))) if m.start() > 0]


def _weights_read(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Node name -> the weight initializers it reads, directly or through nodes computing from
    constants only (Cast of fp16 storage, Transpose, DequantizeLinear). Those nodes themselves
    are left out: they are how a weight is stored, not what reads it."""
    sizes = {}
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        sizes[t.name] = n
    producer = {o: node for node in model.graph.node for o in node.output if o}
    memo: dict[str, list[str] | None] = {}

    def sources(tensor: str, depth: int) -> list[str] | None:
        """Initializers ``tensor`` is computed from, or None if it depends on a run's data."""
        if tensor in sizes:
            return [tensor]
        if tensor in memo:
            return memo[tensor]
        node = producer.get(tensor)
        found: list[str] | None = None
        if node is not None and depth < _CONST_DEPTH and node.op_type != "Shape":
            found = []
            for i in node.input:
                if not i:
                    continue
                src = sources(i, depth + 1)
                if src is None:
                    found = None
                    break
                found.extend(src)
        memo[tensor] = found
        return found

    out: dict[str, list[str]] = {}
    for node in model.graph.node:
        inputs = [sources(i, 0) if i else [] for i in node.input]
        if node.input and all(src is not None for src in inputs):
            continue  # computes a constant
        weights = [w for src in inputs if src for w in src
                   if sizes.get(w, 0) >= _MIN_WEIGHT_ELEMENTS]
        if weights:
            out[node.name] = list(dict.fromkeys(weights))
    return out


def match_nodes(before: Profile, after: Profile, mapping: NodeMap | None = None,
                rounds: Sequence[int] | None = None) -> list[NodeDelta]:
    """Rows of (original node or group, time before, time after), slowest-before first.

    Times are per-run medians: on a busy machine one interrupted run can triple a mean, while
    the median of the same runs stays within a few percent. With ``mapping`` (``map_nodes`` of
    the two models) AFTER's renamed nodes are put on their originals' rows, and removed/added
    are decided by the models; without, a node missing from one profile is removed/added.
    A row's ``ratio`` pairs the two profiles' runs of the same round, over ``rounds`` (default:
    those in which neither whole run was disturbed), its interval over the profiled sessions
    the runs came from (``profiled_sessions``)."""
    if rounds is None:
        rounds = quiet_rounds(before.total_series_ms, after.total_series_ms)
    on = profiled_sessions(before, after)
    renamed = mapping.renamed() if mapping is not None else {}
    claimed = mapping.claimed() if mapping is not None else set()
    b_known = {m for s in before.nodes for m in (s.name, *s.group)}

    def translate(name: str) -> list[str]:
        return renamed.get(name) or [name]

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
            members = _members(stats, translate if prof is after else None)
            for m in members:
                union(members[0], m)

    # Representative name and op type come from the before profile's slowest member.
    clusters: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for side, prof in (("before", before), ("after", after)):
        for stats in prof.nodes:
            members = _members(stats, translate if side == "after" else None)
            root = find(members[0])
            c = clusters.get(root)
            if c is None:
                c = clusters[root] = {"name": members[0], "op_type": stats.op_type,
                                      "before": 0.0, "after": 0.0, "members": [],
                                      "sides": set(), "renamed": [],
                                      "before_series": None, "after_series": None}
                order.append(root)
            c[side] += stats.p50_ms
            series = np.asarray(getattr(stats, "series_ms", None) or [], dtype=float)
            key = f"{side}_series"
            c[key] = series if c[key] is None or c[key].size != series.size else c[key] + series
            c["sides"].add(side)
            if side == "after":
                c["renamed"] += [m for m in (stats.name, *stats.group) if m in renamed]
            for m in members:
                if m not in c["members"]:
                    c["members"].append(m)
    unit_of = {m: u for u in (mapping.units if mapping is not None else []) for m in u.members}
    absorbed = set(mapping.absorbed) if mapping is not None else set()
    rows = []
    for c in (clusters[r] for r in order):
        before_ms: float | None = c["before"]
        after_ms: float | None = c["after"]
        status = MAPPED if c["renamed"] else SAME
        units = Counter(unit_of[m].name for m in c["members"] if m in unit_of)
        if units:  # named after its kernel, not after whichever member came first
            unit = next(u for u in unit_of.values() if u.name == units.most_common(1)[0][0])
            c["name"], c["op_type"], status = unit.name, unit.op_type, FUSED
        if "after" not in c["sides"]:
            # in AFTER but not run (onnxruntime folded it) costs 0 ms; not in AFTER at all, nothing
            gone = mapping is None or not any(m in claimed for m in c["members"])
            if gone:
                after_ms = None
                status = FUSED if all(m in absorbed for m in c["members"]) else REMOVED
        elif "before" not in c["sides"]:
            new = (not any(m in b_known for m in c["members"]) if mapping is None
                   else not any(m in claimed for m in c["members"]))
            if new:
                before_ms, status = None, ADDED
        b_series = [] if c["before_series"] is None else c["before_series"].tolist()
        a_series = [] if c["after_series"] is None else c["after_series"].tolist()
        ratio = None
        if before_ms is not None and after_ms is not None and after_ms > 0:
            ratio = paired_speedup(b_series, a_series, rounds, on)
        rows.append(NodeDelta(c["name"], c["op_type"], before_ms, after_ms,
                              group=(c["members"] if len(c["members"]) > 1
                                     or c["name"] not in c["members"] else []),
                              status=status, after_names=list(dict.fromkeys(c["renamed"])),
                              ratio=ratio, before_series=b_series, after_series=a_series))
    rows.sort(key=lambda r: (-(r.before_ms if r.before_ms is not None else -1.0), r.name))
    return rows


def profiled_sessions(before: Profile, after: Profile
                      ) -> tuple[Sequence[int], Sequence[int]] | None:
    """The profiled session each run of ``before`` and of ``after`` came from, when both were
    profiled on several (``profiler``); None otherwise."""
    if before.profiled_sessions and after.profiled_sessions:
        return before.profiled_sessions, after.profiled_sessions
    return None


def _members(stats: Any, translate: Callable[[str], list[str]] | None) -> list[str]:
    names = [stats.name, *stats.group]
    if translate is None:
        return names
    return list(dict.fromkeys(t for n in names for t in translate(n)))


def compare_models(before: str | Path | onnx.ModelProto, after: str | Path | onnx.ModelProto,
                   run: RunSettings | None = None, workload: Workload | None = None, *,
                   progress: Progress | None = None,
                   cancelled: CancelCheck | None = None) -> Comparison:
    """Profile ``before`` and ``after`` on the main feed of ``workload`` (by default the feed
    spec ``run`` carries, resolved on ``before``), their runs taking turns in one child
    process, and measure the accuracy change on what the workload's judging says: a text
    prompt when a tokenizer is at hand (``text_prompt.judging``), else the timing feed."""
    run = run or ProfileSettings()

    with opstudio_tempdir() as tmp:
        before_path = _as_file(before, Path(tmp) / "before.onnx")
        after_path = _as_file(after, Path(tmp) / "after.onnx")
        if workload is None:
            if progress:
                progress(0.0, "preparing inputs")
            workload = workload_for([before], run, None)
        inputs = workload.main()
        judge = workload.judging()
        request = workload.spec.request and workload.has_kv_cache
        prof_before, prof_after = profile_models([before_path, after_path], run, workload,
                                                 progress=part(progress, 0.0, 0.6 if request else 0.9),
                                                 cancelled=cancelled)
        requests = None
        if request:
            requests = compare_requests(*estimate_requests(
                [before_path, after_path], run, workload, progress=part(progress, 0.6, 0.9),
                cancelled=cancelled))
        if progress:
            progress(0.9, "comparing outputs")
        judged = inputs if judge.feed is None else judge.feed
        accuracy = call_isolated(evaluate, str(before_path), str(after_path), judged,
                                 timeout=run.timeout_s, cancelled=cancelled)
        accuracy.judged_on = judge.judged_on
        # each file's graph read once (the workload holds the first's when read from its file)
        before_graph = workload.model if workload.path == str(before_path) else \
            load_model(before_path, load_external_data=False)
        after_graph = load_model(after_path, load_external_data=False)
        sizes = {"before": stored_bytes(before_path, before_graph),
                 "after": stored_bytes(after_path, after_graph)}
        mapping = map_nodes(before_graph, after_graph)
    if progress:
        progress(1.0, "done")
    profiled_rounds = quiet_rounds(prof_before.total_series_ms, prof_after.total_series_ms)
    plain_rounds = quiet_rounds(prof_before.plain_series_ms, prof_after.plain_series_ms)
    return Comparison(
        before=prof_before, after=prof_after,
        nodes=match_nodes(prof_before, prof_after, mapping, profiled_rounds),
        accuracy=accuracy, size_bytes=sizes,
        before_path=str(before) if not isinstance(before, onnx.ModelProto) else "",
        after_path=str(after) if not isinstance(after, onnx.ModelProto) else "",
        total_ratio=paired_speedup(prof_before.total_series_ms, prof_after.total_series_ms,
                                   profiled_rounds, profiled_sessions(prof_before, prof_after)),
        plain_ratio=paired_speedup(prof_before.plain_series_ms, prof_after.plain_series_ms,
                                   plain_rounds,
                                   (prof_before.plain_sessions, prof_after.plain_sessions)),
        request=requests, step=prof_before.step, units=mapping.units,
        fused_nodes=len({m for u in mapping.units for m in u.members} | set(mapping.absorbed)),
    )


def _series_by_op(profile: Profile) -> dict[str, list[float]]:
    """ms per run of each op type (its nodes summed), from the nodes' paired series."""
    out: dict[str, np.ndarray] = {}
    for n in profile.nodes:
        series = np.asarray(n.series_ms or [], dtype=float)
        if series.size == 0:
            continue
        prev = out.get(n.op_type)
        out[n.op_type] = series if prev is None or prev.size != series.size else prev + series
    return {k: v.tolist() for k, v in out.items()}


def _ci(ratio: Ratio | None) -> list[float] | None:
    return None if ratio is None else [round(ratio.low, 4), round(ratio.high, 4)]


def _as_file(model: str | Path | onnx.ModelProto, target: Path) -> Path:
    if isinstance(model, onnx.ModelProto):
        from opstudio.core.model.model_io import save_model

        save_model(model, target, overwrite=True)
        return target
    path = Path(model)
    if not path.is_file():
        raise OpstudioError(f"{path}: no such file")
    return path


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def _round(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(x, digits)


@dataclass
class NotCompared:
    """Optimize & compare on a model whose inputs cannot be made (a dim with no value): the
    optimized model is kept; neither its speed nor its accuracy was measured, for ``reason``."""

    reason: str
