"""The operator table: one row per node, sortable and filterable, selection synced by index.

Row ``i`` of the source model is node ``i`` of the graph (topological order), so the graph view
and the table exchange plain node indices.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from PySide6.QtCore import (
    QAbstractTableModel,
    QItemSelection,
    QItemSelectionModel,
    QModelIndex,
    QPersistentModelIndex,
    QSortFilterProxyModel,
    Qt,
    Signal,
)
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLineEdit,
    QMenu,
    QStackedWidget,
    QTableView,
    QTreeView,
    QVBoxLayout,
    QWidget,
)

from opstudio.core.graph import GraphInfo
from opstudio.core.layers import MODULE_LABELS, LayerGrouping, group_layers
from opstudio.core.provenance import standing_for

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
# what the role picker offers: the projections, attention and norms one optimizes, not the
# shape arithmetic around them (a layer of a torch export holds 200 such roles)
_ROLE_OPS = {"MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "FusedMatMul", "Conv",
             "Attention", "MultiHeadAttention", "GroupQueryAttention", "GatherBlockQuantized"}


class OpTableModel(QAbstractTableModel):
    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.graph: GraphInfo | None = None
        self.profile: dict[str, Any] = {}  # node name -> NodeStats
        self.techniques: dict[str, str] = {}  # node name -> technique(s) planned
        # name -> (before ms, after ms, speedup) of the comparison row holding the node: nodes
        # that fuse differently before and after are compared as one group, so the group's
        # before time is shown beside its after time
        self.after: dict[str, tuple[float, float, float | None]] = {}
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
        self.after = {}
        if comparison is not None:
            for row in comparison.nodes:
                # one tuple per row: layer totals count a group's time once by its identity
                times = (row.before_ms, row.after_ms, row.speedup)
                for name in self.shown_as([row.name, *row.group]):
                    self.after[name] = times
        self._changed(COL_P50, COL_SPEEDUP)

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
        if role == Qt.ItemDataRole.DisplayRole:
            return _format(col, self.value(row, col))
        if role == Qt.ItemDataRole.TextAlignmentRole and col in NUMERIC:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ForegroundRole and col == COL_SPEEDUP:
            v = self.value(row, col)
            if v is not None:
                return QColor("#1b7f3b") if v >= 1.0 else QColor("#b3261e")
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


class OpFilterProxy(QSortFilterProxyModel):
    """Filters on name, op type and technique only: formatting every number of 10k rows on each
    keystroke is what makes a filter box feel slow."""

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

    def filterAcceptsRow(self, row: int, parent: _Index) -> bool:
        if not self._needle:
            return True
        m = self.sourceModel()
        assert isinstance(m, OpTableModel)
        return any(self._needle in str(m.value(row, col)).lower()
                   for col in (COL_NAME, COL_OP, COL_TECH))


class OpTable(QWidget):
    """Filter box + table (or, grouped by layer, a tree); emits ``selectionChanged`` with node
    indices."""

    selectionChanged = Signal(list)
    nodeActivated = Signal(int)
    layersShown = Signal(object)  # the LayerGrouping while grouped by layer, else None

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        # imported here: the tree reads this module's columns and formats
        from opstudio.qt.layer_tree import LayerFilterProxy, LayerTreeModel

        self.model = OpTableModel(self)
        self.proxy = OpFilterProxy(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(SORT_ROLE)
        self.grouping: LayerGrouping | None = None
        self.tree_model = LayerTreeModel(self.model, self)
        self.tree_proxy = LayerFilterProxy(self)
        self.tree_proxy.setSourceModel(self.tree_model)
        self.tree_proxy.setSortRole(SORT_ROLE)
        self.filter = QLineEdit(self)
        self.filter.setPlaceholderText("Filter by name, op type, technique…")
        self.filter.setClearButtonEnabled(True)
        self.filter.textChanged.connect(self.proxy.set_needle)
        self.filter.textChanged.connect(self.tree_proxy.set_needle)
        self.group_box = QCheckBox("Group by layer", self)
        self.group_box.setToolTip("Operators by layer and module (attention, MLP, norms…), "
                                  "with per-layer and per-module totals")
        self.group_box.setEnabled(False)
        self.group_box.toggled.connect(self.set_grouped)
        self.role_combo = QComboBox(self)
        self.role_combo.setToolTip("Select one operator in every layer: the same projection "
                                   "of each block")
        self.role_combo.setMinimumContentsLength(14)
        self.role_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.role_combo.activated.connect(self._on_role_combo)
        self.role_combo.setEnabled(False)
        self.view = QTableView(self)
        self.view.setModel(self.proxy)
        self.view.verticalHeader().setVisible(False)
        self.view.verticalHeader().setDefaultSectionSize(22)
        self.tree = QTreeView(self)
        self.tree.setModel(self.tree_proxy)
        self.tree.setUniformRowHeights(True)
        self.tree.setIndentation(14)
        self.tree.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        for v in (self.view, self.tree):
            v.setSortingEnabled(True)
            v.sortByColumn(-1, Qt.SortOrder.AscendingOrder)  # topological order first
            v.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
            v.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
            v.setAlternatingRowColors(True)
            v.setWordWrap(False)
            header = v.horizontalHeader() if isinstance(v, QTableView) else v.header()
            header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
            header.setStretchLastSection(True)
            for col, width in ((COL_NAME, 150), (COL_OP, 96), (COL_P50, 78), (COL_SHARE, 60),
                               (COL_AFTER, 76), (COL_SPEEDUP, 74), (COL_TECH, 100),
                               (COL_SHAPE, 120), (COL_FLOPS, 70), (COL_PARAMS, 74),
                               (COL_INTENSITY, 74), (COL_GFLOPS, 70), (COL_BOUND, 70)):
                v.setColumnWidth(col, width)
            v.selectionModel().selectionChanged.connect(self._on_selection)
            v.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
            v.customContextMenuRequested.connect(
                lambda pos, v=v: self._show_menu(v, pos))
        self.tree.setColumnWidth(COL_NAME, 206)
        self.tree.setColumnWidth(COL_OP, 74)
        # the totals (time, share, FLOPs, weights) side by side, before the empty after/speedup
        # columns of a run that has no comparison yet
        header = self.tree.header()
        for k, col in enumerate((COL_FLOPS, COL_PARAMS)):
            header.moveSection(header.visualIndex(col), COL_SHARE + 1 + k)
        self.view.doubleClicked.connect(
            lambda ix: self.nodeActivated.emit(self.proxy.mapToSource(ix).row()))
        self.tree.doubleClicked.connect(self._on_tree_activated)
        self.stack = QStackedWidget(self)
        self.stack.addWidget(self.view)
        self.stack.addWidget(self.tree)
        bar = QHBoxLayout()
        bar.setContentsMargins(0, 0, 0, 0)
        bar.addWidget(self.filter, 1)
        bar.addWidget(self.group_box)
        bar.addWidget(self.role_combo)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(4)
        lay.addLayout(bar)
        lay.addWidget(self.stack)
        self._syncing = False

    def set_graph(self, graph: GraphInfo | None,
                  derived: dict[str, list[str]] | None = None) -> None:
        self.model.set_graph(graph, derived)
        grouping = group_layers(n.name for n in graph.nodes) if graph is not None else None
        self.grouping = grouping if grouping is not None and grouping.has_layers() else None
        self.tree_model.set_grouping(self.grouping)
        self._fill_roles()
        self.group_box.setEnabled(self.grouping is not None)
        if self.grouping is None:
            self.set_grouped(False)  # back to the flat table
        elif self.grouped():
            self.layersShown.emit(self.grouping)

    def share_once(self) -> np.ndarray:
        """Share of the run per node, a fused group's on its first node only (NaN: not
        measured), so that sums over nodes count each measured kernel once."""
        return self.tree_model.per_node(COL_SHARE)

    # --- grouping -----------------------------------------------------------------------------
    def grouped(self) -> bool:
        return self.stack.currentWidget() is self.tree

    def set_grouped(self, on: bool) -> None:
        """Show the operators grouped by layer (a tree) or flat (the table)."""
        on = bool(on) and self.grouping is not None
        if self.group_box.isChecked() != on:
            self.group_box.setChecked(on)  # comes back here through toggled
            return
        if on == self.grouped():
            return
        selected = self.selected()
        self.stack.setCurrentWidget(self.tree if on else self.view)
        self.set_selection(selected)
        self.layersShown.emit(self.grouping if on else None)

    def _fill_roles(self) -> None:
        self.role_combo.clear()
        self.role_combo.addItem("Select in every layer…", None)
        g, graph = self.grouping, self.model.graph
        if g is not None and graph is not None:
            for role in g.roles():
                idx = g.role_indices(role)
                if any(graph.nodes[i].op_type in _ROLE_OPS or graph.nodes[i].param_bytes
                       or "Normalization" in graph.nodes[i].op_type for i in idx):
                    self.role_combo.addItem(f"{role}  ×{len(idx)}", role)
        self.role_combo.setEnabled(self.role_combo.count() > 1)

    def _on_role_combo(self, index: int) -> None:
        role = self.role_combo.itemData(index)
        if role:
            self.select_role(role)
        self.role_combo.setCurrentIndex(0)

    def select_role(self, role: str) -> list[int]:
        """Select the node playing ``role`` (``mlp/up_proj/MatMul``) in every layer."""
        idx = self.grouping.role_indices(role) if self.grouping is not None else []
        self.select_nodes(idx)
        return idx

    def select_nodes(self, indices: Iterable[int]) -> None:
        """Select these nodes and tell the rest of the app, as a click would."""
        rows = sorted(set(indices))
        self.set_selection(rows)
        self.selectionChanged.emit(rows)

    def menu_for(self, view: QAbstractItemView, index: QModelIndex) -> QMenu | None:
        """The context menu of a row: select its role, module or layer in every layer."""
        g = self.grouping
        if g is None or not index.isValid():
            return None
        from opstudio.qt.layer_tree import LAYER, MODULE, OP

        menu = QMenu(self)
        node: int | None = None
        if view is self.tree:
            it = self.tree_model.item(self.tree_proxy.mapToSource(index))
            if it is None:
                return None
            if it.kind == OP:
                node = it.node
            elif it.kind == MODULE and it.key is not None:
                everywhere = g.module_everywhere(it.module)
                menu.addAction(f"Select the {MODULE_LABELS[it.module]} of every layer "
                               f"({len(everywhere)} ops)",
                               lambda: self.select_nodes(everywhere))
            elif it.kind == LAYER:
                nodes = it.nodes.tolist()
                menu.addAction(f"Select {it.label} ({len(nodes)} ops)",
                               lambda: self.select_nodes(nodes))
        else:
            node = self.proxy.mapToSource(index).row()
        if node is not None:
            role = g.role_of(node)
            if role is not None and len(g.role_indices(role)) > 1:
                n = len(g.role_indices(role))
                menu.addAction(f"Select every …/{role} ({n} layers)",
                               lambda: self.select_role(role))
            key = g.layer_of(node)
            if key is not None:
                nodes = g.layer_nodes(key)
                menu.addAction(f"Select {g.layer_label(key)} ({len(nodes)} ops)",
                               lambda: self.select_nodes(nodes))
        if not menu.actions():
            menu.deleteLater()
            return None
        return menu

    def _show_menu(self, view: QAbstractItemView, pos: Any) -> None:
        menu = self.menu_for(view, view.indexAt(pos))
        if menu is not None:
            menu.popup(view.viewport().mapToGlobal(pos))

    def _on_tree_activated(self, ix: QModelIndex) -> None:
        nodes = self.tree_model.nodes_under(self.tree_proxy.mapToSource(ix))
        if len(nodes) == 1:
            self.nodeActivated.emit(nodes[0])

    # --- selection ----------------------------------------------------------------------------
    def selected(self) -> list[int]:
        if self.grouped():
            nodes: set[int] = set()
            for ix in self.tree.selectionModel().selectedRows():
                nodes.update(self.tree_model.nodes_under(self.tree_proxy.mapToSource(ix)))
            return sorted(nodes)
        rows = {self.proxy.mapToSource(ix).row()
                for ix in self.view.selectionModel().selectedRows()}
        return sorted(rows)

    def set_selection(self, indices: Iterable[int], scroll: bool = True) -> None:
        """Select these node rows without emitting ``selectionChanged``."""
        rows = sorted(set(indices))
        if self.grouped():
            self._set_tree_selection(rows, scroll)
            return
        selection = QItemSelection()
        last_col = self.model.columnCount() - 1
        for start, end in _runs(rows):
            selection.select(self.model.index(start, 0), self.model.index(end, last_col))
        self._syncing = True
        try:
            sm = self.view.selectionModel()
            sm.select(self.proxy.mapSelectionFromSource(selection),
                      QItemSelectionModel.SelectionFlag.ClearAndSelect)
            if rows and scroll:
                ix = self.proxy.mapFromSource(self.model.index(rows[0], 0))
                if ix.isValid():
                    self.view.scrollTo(ix)
        finally:
            self._syncing = False

    def _set_tree_selection(self, rows: list[int], scroll: bool) -> None:
        tm, last_col = self.tree_model, self.tree_model.columnCount() - 1
        selection = QItemSelection()
        by_parent: dict[int, list[int]] = {}
        for node in rows:
            item = tm.node_item.get(node)
            if item is not None:
                by_parent.setdefault(tm.items[item].parent, []).append(tm.items[item].row)
        for parent, children in by_parent.items():
            p = tm.item_index(parent)
            for start, end in _runs(sorted(children)):
                selection.select(tm.index(start, 0, p), tm.index(end, last_col, p))
        self._syncing = True
        try:
            self.tree.selectionModel().select(
                self.tree_proxy.mapSelectionFromSource(selection),
                QItemSelectionModel.SelectionFlag.ClearAndSelect)
            first = tm.node_item.get(rows[0]) if rows else None
            if first is not None and scroll:
                ix = self.tree_proxy.mapFromSource(tm.item_index(first))
                if ix.isValid():
                    self.tree.scrollTo(ix)  # opens its layer and module
        finally:
            self._syncing = False

    def _on_selection(self, *_: Any) -> None:
        if not self._syncing:
            self.selectionChanged.emit(self.selected())


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and out[-1][1] == r - 1:
            out[-1] = (out[-1][0], r)
        else:
            out.append((r, r))
    return out


def _shape(shape: Any) -> str:
    if shape is None:
        return "?"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _format(col: int, v: Any) -> str:
    if v is None:
        return ""
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
