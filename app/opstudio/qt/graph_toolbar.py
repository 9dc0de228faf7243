"""The bar above the graph: find, select by op type, select the slowest, zoom."""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from opstudio.core.model.graph import GraphInfo
from opstudio.qt.graph_view import GraphView


class GraphToolbar(QWidget):
    searchRequested = Signal(str)
    opTypeChosen = Signal(str)
    slowestRequested = Signal(int)

    def __init__(self, view: GraphView, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("graphBar")
        h = QHBoxLayout(self)
        h.setContentsMargins(8, 6, 8, 6)
        self.search = QLineEdit()
        self.search.setPlaceholderText("Find node name or op type (Enter)")
        self.search.setClearButtonEnabled(True)
        self.search.setMinimumWidth(250)
        self.search.setMaximumWidth(320)
        self.search.returnPressed.connect(lambda: self.searchRequested.emit(self.search.text()))
        self.op_combo = QComboBox()
        self.op_combo.setMinimumWidth(170)
        self.op_combo.activated.connect(self._on_op_combo)
        self.slowest_n = QSpinBox()
        self.slowest_n.setRange(1, 1000)
        self.slowest_n.setValue(5)
        self.slowest_n.setPrefix("slowest ")
        self.slowest_button = QPushButton("Select")
        self.slowest_button.clicked.connect(
            lambda: self.slowestRequested.emit(self.slowest_n.value()))
        fit = QPushButton("Fit")
        fit.clicked.connect(view.fit_all)
        zin = QPushButton("+")
        zin.setFixedWidth(30)
        zin.clicked.connect(lambda: view.zoom(1.25))
        zout = QPushButton("−")
        zout.setFixedWidth(30)
        zout.clicked.connect(lambda: view.zoom(0.8))
        self.graph_info = QLabel()
        self.graph_info.setObjectName("hint")
        for w in (self.search, self.op_combo, self.slowest_n, self.slowest_button):
            h.addWidget(w)
        h.addStretch(1)
        h.addWidget(self.graph_info)
        for w in (zout, zin, fit):
            h.addWidget(w)

    def set_graph(self, graph: GraphInfo) -> None:
        ops = graph.op_type_counts()
        self.op_combo.clear()
        self.op_combo.addItem("Select op type…", None)
        for op, count in ops.items():
            self.op_combo.addItem(f"{op}  ({count})", op)
        self.graph_info.setText(f"{len(graph.nodes)} operators · {len(ops)} op types")

    def focus_search(self) -> None:
        self.search.setFocus()
        self.search.selectAll()

    def _on_op_combo(self, index: int) -> None:
        op = self.op_combo.itemData(index)
        if op:
            self.opTypeChosen.emit(op)
        self.op_combo.setCurrentIndex(0)
