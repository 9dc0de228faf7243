"""The operator table's model: one row per node, its columns and how each cell is shown.

Row ``i`` is node ``i`` of the graph (topological order), so the graph view, the flat table and
the layer tree (``layer_tree``, which reads every operator cell from here) exchange plain node
indices. A speedup is shown as its verdict: "≈ 1×" in a neutral colour when its 95 % interval
holds 1 (a Reshape of 3 µs timed 1.5× faster is noise, not a finding), the ratio in green or
red only when the paired runs say so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from PySide6.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QPersistentModelIndex,
    QSortFilterProxyModel,
    Qt,
    Signal,
)
from PySide6.QtGui import QColor

from opstudio.core.measure.compare import (
    ADDED,
    FUSED,
    REMOVED,
    SAME,
    interval_text,
    profiled_sessions,
    speedup_label,
)
from opstudio.core.measure.timing import Ratio, paired_speedup, quiet_rounds
from opstudio.core.model.graph import GraphInfo
from opstudio.core.model.provenance import standing_for
from opstudio.qt import theme

# measured columns first: they are what one sorts by and must be visible in a narrow dock
# times are medians over the timed runs, as in a comparison's before/after (robust to the odd
# slow run that drags a mean)
COLUMNS = ("name", "op type", "p50 ms", "share", "after ms", "speedup", "technique",
           "output shape", "FLOPs", "params", "FLOP/byte", "GFLOP/s", "bound")
(COL_NAME, COL_OP, COL_P50, COL_SHARE, COL_AFTER, COL_SPEEDUP, COL_TECH, COL_SHAPE, COL_FLOPS,
 COL_PARAMS, COL_INTENSITY, COL_GFLOPS, COL_BOUND) = range(len(COLUMNS))
NUMERIC = {COL_FLOPS, COL_PARAMS, COL_P50, COL_SHARE, COL_AFTER, COL_SPEEDUP, COL_INTENSITY,
           COL_GFLOPS}
ROOFLINE_COLUMNS = (COL_INTENSITY, COL_GFLOPS, COL_BOUND)
SORT_ROLE = Qt.ItemDataRole.UserRole + 1

_Index = QModelIndex | QPersistentModelIndex
_STATUS_TIPS = {REMOVED: "removed: no node of the optimized model stands for it",
                ADDED: "added: only in the optimized model",
                FUSED: "fused: done inside a fused kernel of the optimized model"}


class Delta(NamedTuple):
    """One comparison row as shown on each node standing for it. The first three fields are
    what callers index (``after[0]`` before ms, ``[1]`` after ms, ``[2]`` speedup)."""

    before_ms: float | None
    after_ms: float | None
    speedup: float | None
    ratio: Ratio | None = None
    status: str = SAME
    before_series: Sequence[float] = ()
    after_series: Sequence[float] = ()

    @property
    def significant(self) -> bool | None:
        return None if self.ratio is None else self.ratio.significant


def speedup_text(speedup: float | None, ratio: Ratio | None, status: str = SAME) -> str:
    """A speedup cell: "removed"/"added", else the ratio's label (``Ratio.label``: "≈ 1×"
    within the noise, "too few runs" when the pairs cannot tell)."""
    if status in (REMOVED, ADDED) or (status == FUSED and speedup is None):
        return status
    return speedup_label(speedup, ratio)


def speedup_colour(speedup: float | None, ratio: Ratio | None) -> QColor | None:
    """Green/red only for a difference beyond the noise; neutral within it; none (the view's
    text colour) for a speedup that was not timed in pairs, which has no verdict."""
    if speedup is None or ratio is None:
        return None
    if not ratio.significant:
        return theme.NOISE
    return theme.FASTER if speedup >= 1.0 else theme.SLOWER


def speedup_tip(speedup: float | None, ratio: Ratio | None, status: str = SAME) -> str | None:
    if status in _STATUS_TIPS and (status != FUSED or speedup is None):
        return _STATUS_TIPS[status]
    if ratio is not None:
        return interval_text(ratio)
    if speedup is not None:
        return "before / after of the median times: not timed in pairs, so no verdict"
    return None


class OpTableModel(QAbstractTableModel):
    timesChanged = Signal()  # a profile or a comparison came or went

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.graph: GraphInfo | None = None
        self.profile: dict[str, Any] = {}  # node name -> NodeStats
        self.techniques: dict[str, str] = {}  # node name -> technique(s) planned
        # name -> the comparison row holding the node: nodes that fuse differently before and
        # after are compared as one group, so the group's before time is shown beside its after
        # time; one Delta per row, so totals count a group's time once by its identity
        self.after: dict[str, Delta] = {}
        # the rounds the comparison's rows were paired over (its quiet ones), for group totals
        self.rounds: list[int] | None = None
        # the profiled session of each run of before and of after, when they rotated
        self.sessions: tuple[Sequence[int], Sequence[int]] | None = None
        self.roofline: dict[str, Any] = {}  # node name -> roofline.RooflinePoint
        # original node name -> nodes of this model standing for it (a file an optimization
        # wrote: its profile rows are named after the original nodes)
        self.derived: dict[str, list[str]] = {}

    def set_graph(self, graph: GraphInfo | None,
                  derived: dict[str, list[str]] | None = None) -> None:
        self.beginResetModel()
        self.graph = graph
        self.derived = dict(derived or {})
        self.profile, self.techniques, self.after, self.roofline = {}, {}, {}, {}
        self.rounds, self.sessions = None, None
        self.endResetModel()

    def shown_as(self, names: Iterable[str]) -> list[str]:
        """The nodes of this graph that rows naming ``names`` are shown on."""
        return standing_for(self.derived, names)

    def set_profile(self, profile: Any | None) -> None:
        self.profile = {}
        # a fused group is reported under its first member; show it on the others too
        if profile is not None:
            for s in profile.nodes:
                for name in self.shown_as([s.name]):
                    self.profile[name] = s
            for s in profile.nodes:
                for name in self.shown_as(getattr(s, "group", []) or []):
                    self.profile.setdefault(name, s)
        self._changed(COL_P50, COL_SHARE)
        self.timesChanged.emit()

    def set_roofline(self, points: Iterable[Any]) -> None:
        by_stats = {p.name: p for p in points}
        # a fused group is one point, shown on every member as its time is
        self.roofline = {name: by_stats[s.name] for name, s in self.profile.items()
                         if s.name in by_stats}
        self.roofline.update(by_stats)
        self._changed(COL_INTENSITY, COL_BOUND)

    def set_techniques(self, techniques: Mapping[str, str]) -> None:
        self.techniques = dict(techniques)
        self._changed(COL_TECH, COL_TECH)

    def set_comparison(self, comparison: Any | None) -> None:
        self.after, self.rounds, self.sessions = {}, None, None
        if comparison is not None:
            before, after = getattr(comparison, "before", None), getattr(comparison, "after", None)
            if before is not None and after is not None:
                # the rounds compare_models paired the rows over, and the sessions they ran on
                self.rounds = quiet_rounds(getattr(before, "total_series_ms", None) or [],
                                           getattr(after, "total_series_ms", None) or [])
                self.sessions = profiled_sessions(before, after)
            for row in comparison.nodes:
                delta = Delta(row.before_ms, row.after_ms, row.speedup,
                              getattr(row, "ratio", None), getattr(row, "status", SAME),
                              getattr(row, "before_series", None) or (),
                              getattr(row, "after_series", None) or ())
                for name in self.shown_as([row.name, *row.group]):
                    self.after[name] = delta
        self._changed(COL_P50, COL_SPEEDUP)
        self.timesChanged.emit()

    def heaviest_column(self) -> int:
        """The column a newcomer wants the rows sorted by, heaviest first: time once there is
        a profile, else FLOPs, else weights (-1, the graph's order, when none is known)."""
        if self.profile or self.after:
            return COL_P50
        nodes = self.graph.nodes if self.graph is not None else []
        if any(n.flops for n in nodes):
            return COL_FLOPS
        if any(n.param_bytes for n in nodes):
            return COL_PARAMS
        return -1

    def summed_ratio(self, deltas: Sequence[Delta]) -> Ratio | None:
        """before/after of these rows' times summed run by run, paired as their rows were;
        None when one of them was not timed in pairs (then only the medians can be summed). A
        side a row lacks (removed, added) counts as 0 ms in each run."""
        series = [s for d in deltas for s in (d.before_series, d.after_series) if s]
        if not series or len({len(s) for s in series}) != 1:
            return None
        for d in deltas:
            for ms, s in ((d.before_ms, d.before_series), (d.after_ms, d.after_series)):
                if ms and not s:
                    return None
        n = len(series[0])
        before, after = np.zeros(n), np.zeros(n)
        for d in deltas:
            if d.before_series:
                before += np.asarray(d.before_series, dtype=float)
            if d.after_series:
                after += np.asarray(d.after_series, dtype=float)
        return paired_speedup(before.tolist(), after.tolist(), self.rounds, self.sessions)

    def _changed(self, first: int, last: int) -> None:
        if self.rowCount():
            self.dataChanged.emit(self.index(0, first), self.index(self.rowCount() - 1, last))

    # --- Qt model -----------------------------------------------------------------------------
    def rowCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() or self.graph is None else len(self.graph.nodes)

    def columnCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation,
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section]
        return None

    def value(self, row: int, col: int) -> Any:
        """The raw value of a cell (numbers stay numbers; None when unknown)."""
        assert self.graph is not None
        n = self.graph.nodes[row]
        if col == COL_NAME:
            return n.name
        if col == COL_OP:
            return n.op_type
        if col == COL_SHAPE:
            return ", ".join(_shape(s) for s in n.output_shapes)
        if col == COL_FLOPS:
            return n.flops
        if col == COL_PARAMS:
            return n.param_bytes or None
        if col == COL_P50 and n.name in self.after:
            return self.after[n.name][0]
        if col in (COL_P50, COL_SHARE):
            s = self.profile.get(n.name)
            if s is None:
                return None
            return s.p50_ms if col == COL_P50 else s.share
        if col == COL_TECH:
            return self.techniques.get(n.name, "")
        if col in (COL_AFTER, COL_SPEEDUP):
            a = self.after.get(n.name)
            if a is None:
                return None
            return a[1] if col == COL_AFTER else a[2]
        if col in ROOFLINE_COLUMNS:
            p = self.roofline.get(n.name)
            if p is None:
                return None
            return {COL_INTENSITY: p.intensity, COL_GFLOPS: p.achieved_gflops,
                    COL_BOUND: p.describe_bound()}[col]
        return None

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or self.graph is None:
            return None
        row, col = index.row(), index.column()
        if role == SORT_ROLE:
            v = self.value(row, col)
            if col in NUMERIC:
                return float("-inf") if v is None else float(v)
            return v
        delta = self.after.get(self.graph.nodes[row].name) \
            if col in (COL_AFTER, COL_SPEEDUP) else None
        if role == Qt.ItemDataRole.DisplayRole:
            if col == COL_SPEEDUP and delta is not None:
                return speedup_text(delta.speedup, delta.ratio, delta.status)
            return format_value(col, self.value(row, col))
        if role == Qt.ItemDataRole.TextAlignmentRole and col in NUMERIC:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ForegroundRole and delta is not None:
            if col == COL_SPEEDUP:
                return speedup_colour(delta.speedup, delta.ratio)
            return theme.NOISE if delta.significant is False else None
        if role == Qt.ItemDataRole.ToolTipRole and delta is not None:
            return speedup_tip(delta.speedup, delta.ratio, delta.status)
        if role == Qt.ItemDataRole.ToolTipRole and col == COL_NAME:
            return self.graph.nodes[row].name
        if role == Qt.ItemDataRole.ToolTipRole and col in ROOFLINE_COLUMNS:
            p = self.roofline.get(self.graph.nodes[row].name)
            if p is not None:
                roof = "the INT8 roof" if p.precision == "int8" else "the fp32 roof"
                return (f"{p.achieved_gflops:.1f} of {p.attainable_gflops:.1f} GFLOP/s attainable "
                        f"at {p.intensity:.2f} FLOP/byte ({p.efficiency:.0%} of {roof}); "
                        f"{p.describe_bound()}-bound")
        return None


def _shape(shape: Any) -> str:
    if shape is None:
        return "?"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


UNKNOWN = "–"  # FLOPs that need a dim not given, as inspect and its --by-layer print them


def format_value(col: int, v: Any) -> str:
    """A cell's raw value as text (a speedup as its bare figure: ``speedup_text`` gives its
    verdict)."""
    if v is None:
        return UNKNOWN if col == COL_FLOPS else ""  # no time is blank; unknown FLOPs say so
    if col == COL_FLOPS:
        return _human(v)
    if col == COL_PARAMS:
        return _bytes(v)
    if col in (COL_P50, COL_AFTER):
        return f"{v:.3f}"
    if col == COL_SHARE:
        return f"{v * 100:.1f}%"
    if col == COL_SPEEDUP:
        return f"{v:.2f}×"
    if col == COL_INTENSITY:
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    if col == COL_GFLOPS:
        return f"{v:.1f}"
    return str(v)


def _human(n: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for factor, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= factor:
            return f"{n / factor:.1f} {suffix}"
    return f"{int(n)} B"


class NeedleFilter(QSortFilterProxyModel):
    """A proxy filtering on one lower-cased search text; subclasses say what a row matches."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self._needle = ""

    def set_needle(self, text: str) -> None:
        if hasattr(self, "endFilterChange"):  # Qt >= 6.10; invalidateFilter is deprecated there
            self.beginFilterChange()
            self._needle = text.strip().lower()
            self.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:
            self._needle = text.strip().lower()
            self.invalidateFilter()
