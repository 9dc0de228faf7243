"""The operator table grouped by layer: layer → module → operators, with totals on group rows.

The tree reads every operator cell from the flat ``OpTableModel`` (one source of truth for
profiles, plans and comparisons) and adds sums on the layer and module rows. A fused group's
time is one kernel shown on each member, so sums count each measurement once, on the first
node showing it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PySide6.QtCore import (
    QAbstractItemModel,
    QModelIndex,
    QPersistentModelIndex,
    Qt,
)
from PySide6.QtGui import QFont

from opstudio.core.measure.timing import Ratio
from opstudio.core.model.layers import MODULE_LABELS, LayerGrouping, LayerKey
from opstudio.qt import op_table_model as ot
from opstudio.qt import theme

_Index = QModelIndex | QPersistentModelIndex
LAYER, MODULE, OP, OUTSIDE = range(4)
SUMMED = (ot.COL_P50, ot.COL_SHARE, ot.COL_AFTER, ot.COL_FLOPS, ot.COL_PARAMS)


class _Item:
    __slots__ = ("children", "key", "kind", "label", "module", "node", "nodes", "parent", "row")

    def __init__(self, kind: int, parent: int, row: int, label: str = "") -> None:
        self.kind, self.parent, self.row, self.label = kind, parent, row, label
        self.children: list[int] = []
        self.key: LayerKey | None = None
        self.module = ""
        self.node = -1
        self.nodes: np.ndarray = np.zeros(0, dtype=np.int64)


class LayerTreeModel(QAbstractItemModel):
    ROOT = -1

    def __init__(self, source: ot.OpTableModel, parent: Any = None) -> None:
        super().__init__(parent)
        self.source = source
        self.grouping: LayerGrouping | None = None
        self.items: list[_Item] = []
        self.top: list[int] = []
        self.node_item: dict[int, int] = {}
        self._sums: dict[int, dict[int, float | None]] = {}
        self._per_node: dict[int, np.ndarray] = {}
        self._ratios: dict[int, Ratio | None] = {}
        self._first_delta: dict[int, ot.Delta] | None = None
        source.modelReset.connect(self._rebuild)
        source.dataChanged.connect(self._values_changed)

    # --- structure ----------------------------------------------------------------------------
    def set_grouping(self, grouping: LayerGrouping | None) -> None:
        self.grouping = grouping
        self._rebuild()

    def _rebuild(self) -> None:
        self.beginResetModel()
        self.items, self.top, self.node_item = [], [], {}
        self._invalidate()
        g = self.grouping
        if g is not None and self.source.graph is not None \
                and len(g.scopes) == len(self.source.graph.nodes):
            for key in g.layers():
                self._group(LAYER, key, g.layer_label(key))
            if g.ungrouped():
                self._group(OUTSIDE, None, "not in a layer")
        self.endResetModel()

    def _add(self, item: _Item) -> int:
        self.items.append(item)
        i = len(self.items) - 1
        (self.top if item.parent == self.ROOT else self.items[item.parent].children).append(i)
        return i

    def _group(self, kind: int, key: LayerKey | None, label: str) -> None:
        g = self.grouping
        assert g is not None
        top = self._add(_Item(kind, self.ROOT, len(self.top), label))
        self.items[top].key = key
        nodes: list[int] = []
        for module in g.modules_of(key):
            members = g.module_nodes(key, module)
            parent = self.items[top]
            mid = self._add(_Item(MODULE, top, len(parent.children), MODULE_LABELS[module]))
            m = self.items[mid]
            m.key, m.module, m.nodes = key, module, np.array(members, dtype=np.int64)
            for node in members:
                op = self._add(_Item(OP, mid, len(m.children)))
                self.items[op].node = node
                self.node_item[node] = op
            nodes.extend(members)
        self.items[top].nodes = np.array(sorted(nodes), dtype=np.int64)

    def item(self, index: _Index) -> _Item | None:
        if not index.isValid():
            return None
        return self.items[index.internalId()]

    def item_index(self, item_id: int, column: int = 0) -> QModelIndex:
        return self.createIndex(self.items[item_id].row, column, item_id)

    def nodes_under(self, index: _Index) -> list[int]:
        it = self.item(index)
        if it is None:
            return []
        return [it.node] if it.kind == OP else it.nodes.tolist()

    # --- values -------------------------------------------------------------------------------
    def _invalidate(self) -> None:
        self._sums, self._per_node, self._ratios = {}, {}, {}
        self._first_delta = None

    def _values_changed(self, *_: Any) -> None:
        self._invalidate()
        if self.top:
            last = self.columnCount() - 1
            self.dataChanged.emit(self.index(0, 0), self.index(len(self.top) - 1, last))
            # children: one signal per group row (a few hundred at most)
            for i, it in enumerate(self.items):
                if it.kind != OP and it.children:
                    parent = self.item_index(i)
                    self.dataChanged.emit(self.index(0, 0, parent),
                                          self.index(len(it.children) - 1, last, parent))

    def per_node(self, col: int) -> np.ndarray:
        """The column's value per node, NaN when unknown; a time measured once but shown on
        several nodes (a fused group) counts on the first of them only."""
        arr = self._per_node.get(col)
        if arr is not None:
            return arr
        src = self.source
        assert src.graph is not None
        arr = np.full(len(src.graph.nodes), np.nan)
        seen: set[int] = set()
        for n in src.graph.nodes:
            if col in (ot.COL_P50, ot.COL_SHARE, ot.COL_AFTER):
                owner = self._measurement(n.name, col)
                if owner is None:
                    continue
                if id(owner) in seen:
                    arr[n.index] = 0.0
                    continue
                seen.add(id(owner))
            v = src.value(n.index, col)
            if v is not None:
                arr[n.index] = float(v)
        self._per_node[col] = arr
        return arr

    def _measurement(self, name: str, col: int) -> Any:
        """The object a time cell of ``name`` comes from (shared by a fused group's nodes)."""
        src = self.source
        if col == ot.COL_SHARE:
            return src.profile.get(name)
        if col == ot.COL_AFTER:
            return src.after.get(name)
        return src.after.get(name) or src.profile.get(name)

    def group_value(self, item_id: int, col: int) -> Any:
        it = self.items[item_id]
        if col == ot.COL_NAME:
            return it.label
        if col == ot.COL_OP:
            n = len(it.nodes)
            return f"{n} op" if n == 1 else f"{n} ops"
        if col == ot.COL_SPEEDUP:
            ratio = self.group_ratio(item_id)
            if ratio is not None:
                return ratio.median
            before, after = self.group_value(item_id, ot.COL_P50), \
                self.group_value(item_id, ot.COL_AFTER)
            return before / after if before is not None and after else None
        if col not in SUMMED:
            return None
        cache = self._sums.setdefault(item_id, {})
        if col not in cache:
            vals = self.per_node(col)[it.nodes]
            known = vals[~np.isnan(vals)]
            whole = col != ot.COL_FLOPS or known.size == vals.size \
                or not self._sums_need_every_node()
            cache[col] = float(known.sum()) if known.size and whole else None
        return cache[col]

    def _sums_need_every_node(self) -> bool:
        graph = self.source.graph
        return graph is not None and graph.sums_need_every_node()

    def _deltas_once(self) -> dict[int, ot.Delta]:
        """Node -> the comparison row first shown on it (a fused group's row is shown on each
        member and counts on the first, as in ``per_node``)."""
        if self._first_delta is None:
            src, seen, out = self.source, set(), {}
            assert src.graph is not None
            for n in src.graph.nodes:
                d = src.after.get(n.name)
                if d is not None and id(d) not in seen:
                    seen.add(id(d))
                    out[n.index] = d
            self._first_delta = out
        return self._first_delta

    def group_ratio(self, item_id: int) -> Ratio | None:
        """The group's speedup with its interval, from its rows' paired runs summed run by
        run; None when they were not all timed in pairs, or an operator measured before has no
        comparison row (its time would be in the before sum only)."""
        if item_id in self._ratios:
            return self._ratios[item_id]
        src, once = self.source, self._deltas_once()
        ratio = None
        if once and src.graph is not None:
            nodes = self.items[item_id].nodes.tolist()
            names = [src.graph.nodes[i].name for i in nodes]
            if not any(name in src.profile and name not in src.after for name in names):
                ratio = src.summed_ratio([once[i] for i in nodes if i in once])
        self._ratios[item_id] = ratio
        return ratio

    # --- Qt model -----------------------------------------------------------------------------
    def index(self, row: int, column: int, parent: _Index = QModelIndex()) -> QModelIndex:  # noqa: B008
        children = self.top if not parent.isValid() else self.items[parent.internalId()].children
        if 0 <= row < len(children) and 0 <= column < len(ot.COLUMNS):
            return self.createIndex(row, column, children[row])
        return QModelIndex()

    def parent(self, index: _Index = QModelIndex()) -> QModelIndex:  # type: ignore[override]  # noqa: B008
        if not index.isValid():
            return QModelIndex()
        p = self.items[index.internalId()].parent
        return QModelIndex() if p == self.ROOT else self.item_index(p)

    def rowCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008
        if not parent.isValid():
            return len(self.top)
        if parent.column() != 0:
            return 0
        return len(self.items[parent.internalId()].children)

    def columnCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008
        return len(ot.COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation,
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        return self.source.headerData(section, orientation, role)

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        it = self.item(index)
        if it is None:
            return None
        col = index.column()
        if it.kind == OP:
            if col == ot.COL_NAME and role == Qt.ItemDataRole.DisplayRole \
                    and self.grouping is not None:
                # under its layer the layer's prefix says nothing: show the path inside it
                scope = self.grouping.scopes[it.node]
                return scope.role if scope.layer is not None else scope.name
            return self.source.data(self.source.index(it.node, col), role)
        item_id = index.internalId()
        if role == ot.SORT_ROLE:
            if col == ot.COL_NAME:
                return f"{it.kind}:{it.row:08d}"  # layers sort in run order, not "10" < "2"
            v = self.group_value(item_id, col)
            if col in ot.NUMERIC:
                return float("-inf") if v is None else float(v)
            return v
        if role == Qt.ItemDataRole.DisplayRole:
            v = self.group_value(item_id, col)
            if col in (ot.COL_NAME, ot.COL_OP):
                return v
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return ot.format_value(col, None)
            if col == ot.COL_SPEEDUP:
                return ot.speedup_text(v, self.group_ratio(item_id))
            return ot.format_value(col, v)
        if role == Qt.ItemDataRole.ForegroundRole and col in (ot.COL_AFTER, ot.COL_SPEEDUP):
            ratio = self.group_ratio(item_id)
            if col == ot.COL_SPEEDUP:
                return ot.speedup_colour(self.group_value(item_id, col), ratio)
            return theme.NOISE if ratio is not None and not ratio.significant else None
        if role == Qt.ItemDataRole.ToolTipRole and col in (ot.COL_AFTER, ot.COL_SPEEDUP):
            v = self.group_value(item_id, ot.COL_SPEEDUP)
            if v is None:
                return None
            ratio = self.group_ratio(item_id)
            if ratio is not None:
                return f"{it.label}, its operators' times summed run by run: " \
                    f"{ot.speedup_tip(v, ratio)}"
            return f"{it.label}: before / after of the summed median times " \
                "(not timed in pairs, so no verdict)"
        if role == Qt.ItemDataRole.FontRole and it.kind != MODULE:
            f = QFont()
            f.setBold(True)
            return f
        if role == Qt.ItemDataRole.TextAlignmentRole and col in ot.NUMERIC:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ToolTipRole and col == ot.COL_NAME:
            return f"{it.label}: {len(it.nodes)} operators (selecting the row selects them all)"
        return None


class LayerFilterProxy(ot.NeedleFilter):
    """Keeps the operators whose name, op type or technique hold the text, and their groups."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.setRecursiveFilteringEnabled(True)

    def filterAcceptsRow(self, row: int, parent: _Index) -> bool:
        if not self._needle:
            return True
        m = self.sourceModel()
        assert isinstance(m, LayerTreeModel)
        it = m.item(m.index(row, 0, parent))
        if it is None or it.kind != OP:
            return False  # shown when one of its operators is
        src = m.source
        return any(self._needle in str(src.value(it.node, col)).lower()
                   for col in (ot.COL_NAME, ot.COL_OP, ot.COL_TECH))
