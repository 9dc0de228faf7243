"""Which units of a fusion pay, layer by layer.

The original and the whole model fused are profiled in one interleaved run
(``profiler.profile_models``); ``compare.match_nodes`` puts each fused kernel's time on the
original nodes it replaced. The rows are then summed per layer and unit kind (a layer's
attention with its rotary embedding and packed q|k|v, its norms with their residual Adds, its
MLP gate with the packed gate|up), before against after over the same paired rounds, and a
layer's unit stays fused unless its interval says it got slower (``Ratio.verdict``): a unit
within the noise is kept, since one fused kernel in place of many also spares the launches the
per-kernel trace does not see. Nodes the fused kernels made redundant (a rotary embedding's
shapes, the mask) have no time after; their time before counts for the unit of their layer and
module. Kernels shared by every layer (seqlens, the cos/sin caches) belong to no unit: the
whole step, timed afterwards, answers for them."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from opstudio.core.measure.compare import NodeDelta
from opstudio.core.measure.timing import SLOWER, Ratio, paired_speedup
from opstudio.core.model.layers import ATTENTION, MLP, NORM, scope_of
from opstudio.core.progress import CancelCheck

# the kinds a unit is decided as, in the order the summary names them
KINDS = {ATTENTION: "attention", MLP: "MLP gate", NORM: "norms"}
OTHER = "other"
UnitKey = tuple[int | None, str]  # (layer, kind); layer None: outside the layers (final norm)


@dataclass
class UnitVerdict:
    """One layer's unit of one kind: the original nodes its fused units replace, what the
    profiled runs gave for it before and after (before/after, above 1 faster), kept or not."""

    layer: int | None
    kind: str
    nodes: frozenset[str]
    ratio: Ratio | None
    before_ms: float
    after_ms: float
    kept: bool

    @property
    def label(self) -> str:
        kind = KINDS.get(self.kind, self.kind)
        return f"final {kind}" if self.layer is None else f"layer {self.layer} {kind}"

    def why(self) -> str:
        """"1.08× slower [1.03, 1.12]" (after/before, the way a slowdown reads)."""
        r = self.ratio
        if r is None:
            return "no time after" if self.before_ms > 0 else "not timed"
        if r.verdict == SLOWER:
            return f"{1 / r.median:.2f}× slower [{1 / r.high:.2f}, {1 / r.low:.2f}]"
        return f"{r.words()} [{r.low:.2f}, {r.high:.2f}]"

    def to_json(self) -> dict[str, Any]:
        r = self.ratio
        return {"layer": self.layer, "unit": self.kind, "kept": self.kept,
                "nodes": len(self.nodes), "before_ms": round(self.before_ms, 6),
                "after_ms": round(self.after_ms, 6),
                "speedup": None if r is None else [round(r.median, 4), round(r.low, 4),
                                                   round(r.high, 4)]}


@dataclass
class UnitChoice:
    """Every unit's verdict; the kept ones' nodes make the fuse step."""

    verdicts: list[UnitVerdict]

    @property
    def dropped(self) -> list[UnitVerdict]:
        return [v for v in self.verdicts if not v.kept]

    def kept_nodes(self) -> list[str]:
        return sorted({n for v in self.verdicts if v.kept for n in v.nodes})

    def dropped_nodes(self) -> set[str]:
        return {n for v in self.dropped for n in v.nodes}

    def summary(self) -> str:
        """"attention fused in 30/30 layers; MLP gate in 30/30; norms in 30/30; layer 7
        attention left unfused: 1.08× slower [1.03, 1.12]"."""
        parts: list[str] = []
        for kind, words in KINDS.items():
            mine = [v for v in self.verdicts if v.kind == kind and v.layer is not None]
            if mine:
                kept = sum(v.kept for v in mine)
                parts.append(f"{words} fused in {kept}/{len(mine)} layers" if not parts
                             else f"{words} in {kept}/{len(mine)}")
        parts += [f"{v.label} left unfused: {v.why()}" for v in self.dropped]
        return "; ".join(parts) or "no unit"

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "units": [v.to_json() for v in self.verdicts]}


def unit_key(unit: Iterable[str]) -> UnitKey:
    """The layer and kind most of a unit's nodes say they are in (a residual Add before a
    norm is scoped in the layer before, the mask outside the layers)."""
    scopes = [scope_of(name) for name in unit]
    kinds = Counter(s.module for s in scopes if s.module in KINDS)
    kind = kinds.most_common(1)[0][0] if kinds else OTHER
    layers = Counter(s.layer for s in scopes if kind == OTHER or s.module == kind)
    return layers.most_common(1)[0][0], kind


def choose_units(rows: Sequence[NodeDelta], units: Iterable[Iterable[str]],
                 rounds: Sequence[int] | None = None,
                 sessions: tuple[Sequence[int], Sequence[int]] | None = None) -> UnitChoice:
    """Each layer's unit kept unless measurably slower, from ``match_nodes``' rows of the
    original against the whole model fused, paired over ``rounds`` (default all), the interval
    over the profiled ``sessions`` each run came from (``compare.profiled_sessions``)."""
    nodes: dict[UnitKey, set[str]] = defaultdict(set)
    key_of: dict[str, UnitKey] = {}
    for unit in units:
        key = unit_key(unit)
        nodes[key].update(unit)
        key_of.update(dict.fromkeys(unit, key))
    series: dict[UnitKey, list[np.ndarray]] = {k: [] for k in nodes}
    for row in rows:
        counts_for = _row_key(row, key_of, nodes)
        if counts_for is None or not row.before_series:
            continue
        before = np.asarray(row.before_series, dtype=float)
        after = np.asarray(row.after_series or np.zeros_like(before), dtype=float)
        if after.shape != before.shape:
            continue
        series[counts_for].append(np.stack([before, after]))
    verdicts = []
    for key in sorted(nodes, key=lambda k: (k[0] is None, k[0] or 0, list(KINDS).index(k[1])
                                            if k[1] in KINDS else len(KINDS))):
        ratio, before_ms, after_ms = _totals(series[key], rounds, sessions)
        kept = ratio is None or ratio.verdict != SLOWER
        verdicts.append(UnitVerdict(key[0], key[1], frozenset(nodes[key]), ratio, before_ms,
                                    after_ms, kept))
    return UnitChoice(verdicts)


def _row_key(row: NodeDelta, key_of: Mapping[str, UnitKey],
             nodes: Mapping[UnitKey, set[str]]) -> UnitKey | None:
    """The unit a row's time counts for: that of a member the fusion replaced, else, for an
    original no node stands for any more, the unit of its layer and module."""
    for member in row.group or [row.name]:
        if member in key_of:
            return key_of[member]
    if row.after_ms is None and row.before_ms is not None:
        scope = scope_of(row.name)
        key = (scope.layer, scope.module)
        if scope.layer is not None and key in nodes:
            return key
    return None


def _totals(stacked: Sequence[np.ndarray], rounds: Sequence[int] | None,
            sessions: tuple[Sequence[int], Sequence[int]] | None
            ) -> tuple[Ratio | None, float, float]:
    """before/after of the summed series over the paired rounds, and each side's median ms."""
    sizes = Counter(s.shape[1] for s in stacked)
    if not sizes:
        return None, 0.0, 0.0
    runs = sizes.most_common(1)[0][0]  # a row timed in fewer runs cannot be paired
    before, after = np.sum([s for s in stacked if s.shape[1] == runs], axis=0)
    keep = [i for i in (range(before.size) if rounds is None else rounds) if i < before.size]
    ratio = paired_speedup(before.tolist(), after.tolist(), keep, sessions)
    return ratio, float(np.median(before[keep])), float(np.median(after[keep]))


def kept_of(units: Iterable[Iterable[str]], dropped: set[str]) -> list[str]:
    """The nodes of ``units`` (another fusion's, e.g. unpacked) that share none with
    ``dropped``: the same choice for a fusion whose units are cut otherwise."""
    return sorted({n for unit in units if dropped.isdisjoint(unit) for n in unit})


def measure_units(model_path: str, fused_path: str, timed: Mapping[str, np.ndarray],
                  units: Iterable[Iterable[str]], threads: int, time_budget_s: float,
                  timeout: float, cancelled: CancelCheck | None = None) -> UnitChoice:
    """The original and ``fused_path`` profiled in turns on the step ``timed`` feeds (60
    rounds, fewer if twice ``time_budget_s`` runs out first), and ``choose_units`` on what each
    original node took before and after."""
    from opstudio.core.measure.compare import map_nodes, match_nodes, profiled_sessions
    from opstudio.core.measure.profiler import profile_models
    from opstudio.core.measure.settings import ProfileSettings
    from opstudio.core.measure.timing import quiet_rounds
    from opstudio.core.measure.workload import Workload
    from opstudio.core.model.model_io import load_model

    run = ProfileSettings(runs=60, warmup=3, threads=threads, measure_plain=False,
                          time_budget_s=max(2 * time_budget_s, 0.5), timeout_s=timeout)
    workload = Workload.of(model_path, run, feeds=timed)
    before, after = profile_models([model_path, fused_path], run, workload, cancelled=cancelled)
    rounds = quiet_rounds(before.total_series_ms, after.total_series_ms)
    mapping = map_nodes(workload.model, load_model(fused_path, load_external_data=False))
    return choose_units(match_nodes(before, after, mapping, rounds), units, rounds,
                        profiled_sessions(before, after))
