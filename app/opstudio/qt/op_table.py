"""The operator table: one row per node, sortable and filterable, selection synced by index.

Row ``i`` of the source model is node ``i`` of the graph (topological order), so the graph view
and the table exchange plain node indices. The model and its columns live in
``op_table_model`` (the layer tree reads them too); this module is the widget: filter box, flat
table or layer tree, selection and context menus.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from PySide6.QtCore import (
    QItemSelection,
    QItemSelectionModel,
    QModelIndex,
    QPersistentModelIndex,
    Qt,
    Signal,
)
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

from opstudio.core.model.graph import GraphInfo
from opstudio.core.model.layers import MODULE_LABELS, LayerGrouping, group_layers
from opstudio.qt import op_table_model as ot_model
from opstudio.qt.layer_tree import LAYER, MODULE, OP, LayerFilterProxy, LayerTreeModel
from opstudio.qt.op_table_model import (
    COL_AFTER,
    COL_BOUND,
    COL_FLOPS,
    COL_GFLOPS,
    COL_INTENSITY,
    COL_NAME,
    COL_OP,
    COL_P50,
    COL_PARAMS,
    COL_SHAPE,
    COL_SHARE,
    COL_SPEEDUP,
    COL_TECH,
    COLUMNS,
    NUMERIC,
    SORT_ROLE,
    OpTableModel,
)

# the model's names, importable from the widget's module as before
__all__ = ["COLUMNS", "COL_AFTER", "COL_BOUND", "COL_FLOPS", "COL_GFLOPS", "COL_INTENSITY",
           "COL_NAME", "COL_OP", "COL_P50", "COL_PARAMS", "COL_SHAPE", "COL_SHARE",
           "COL_SPEEDUP", "COL_TECH", "NUMERIC", "SORT_ROLE", "OpFilterProxy", "OpTable",
           "OpTableModel"]

_Index = QModelIndex | QPersistentModelIndex
# what the role picker offers: the projections, attention and norms one optimizes, not the
# shape arithmetic around them (a layer of a torch export holds 200 such roles)
_ROLE_OPS = {"MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "FusedMatMul", "Conv",
             "Attention", "MultiHeadAttention", "GroupQueryAttention", "GatherBlockQuantized"}


class OpFilterProxy(ot_model.NeedleFilter):
    """Filters on name, op type and technique only: formatting every number of 10k rows on each
    keystroke is what makes a filter box feel slow."""

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
        # the heaviest rows first (heaviest_column) until the user sorts by a column of choice
        self._user_sorted = False
        self.view.horizontalHeader().sectionClicked.connect(self._on_user_sort)
        self.model.timesChanged.connect(self.sort_heaviest_first)
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
        self._user_sorted = False
        self.sort_heaviest_first()
        grouping = group_layers(n.name for n in graph.nodes) if graph is not None else None
        self.grouping = grouping if grouping is not None and grouping.has_layers() else None
        self.tree_model.set_grouping(self.grouping)
        self._fill_roles()
        self.group_box.setEnabled(self.grouping is not None)
        if self.grouping is None:
            self.set_grouped(False)  # back to the flat table
        elif self.grouped():
            self.layersShown.emit(self.grouping)

    def sort_heaviest_first(self) -> None:
        """Sort the flat table by time once profiled, else by FLOPs (or weights), heaviest
        first and unknown last: not a column of Casts with empty cells in graph order. The
        layer tree keeps the run's order. A sort the user chose is kept."""
        if self._user_sorted:
            return
        col = self.model.heaviest_column()
        self.view.sortByColumn(col, Qt.SortOrder.DescendingOrder if col >= 0
                               else Qt.SortOrder.AscendingOrder)

    def _on_user_sort(self, _section: int) -> None:
        self._user_sorted = True

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
