"""The advisor: per-node sensitivity as a table and a scatter plot, and the automatic plan.

The panel only displays an ``opstudio.core.advisor.Advice`` and asks for work through signals:
``analyzeRequested(budget, techniques)`` starts a run (the main window owns the worker),
``nodeClicked(name)`` selects a node (a table row or a scatter point), ``planAccepted(recipe)``
hands the proposed plan to the plan editor, where it can be edited and undone like any edit.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from opstudio.core.advisor import Advice, Budget
from opstudio.core.passes import TECHNIQUES, get_pass
from opstudio.core.sensitivity import DEFAULT_TECHNIQUES


def technique_colour(technique: str) -> str:
    return get_pass(technique).colour if technique in TECHNIQUES else "#2a3240"

# what a user compares first comes first: which technique, what it saves, what it costs
COLUMNS = ("operator", "technique", "saved ms", "SNR dB", "cosine", "in plan", "op type",
           "bound", "before ms", "after ms", "note")
COL_TECHNIQUE, COL_SNR, COL_COSINE, COL_BEFORE, COL_NOTE = 1, 3, 4, 8, 10


def noise_db(snr_db: float | None) -> float | None:
    """Error on a dB scale where right means worse: −SNR, capped for identical outputs."""
    if snr_db is None:
        return None
    return -min(snr_db, 120.0) if not math.isinf(snr_db) else -120.0


class _SortItem(QTableWidgetItem):
    """Sorts by the number behind the text (UserRole) where there is one, so "10.5" comes
    after "9.2" and empty cells (not measured) sort below every number."""

    def __lt__(self, other: QTableWidgetItem) -> bool:
        a = self.data(Qt.ItemDataRole.UserRole)
        b = other.data(Qt.ItemDataRole.UserRole)
        if isinstance(a, float) or isinstance(b, float):
            a = a if isinstance(a, float) else -math.inf
            b = b if isinstance(b, float) else -math.inf
            return a < b
        # (QTableWidgetItem.__lt__ would call back into this override)
        return self.text().lower() < other.text().lower()


class AdvisorPanel(QWidget):
    analyzeRequested = Signal(object, object)  # Budget, {technique: params}
    nodeClicked = Signal(str)
    planAccepted = Signal(object)  # Recipe

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.advice: Advice | None = None
        self.points: list[dict[str, Any]] = []  # what the scatter shows (tests read it)

        self.kind = QComboBox()
        self.kind.addItems(["cosine ≥", "SNR (dB) ≥"])
        self.value = QDoubleSpinBox()
        self.value.setDecimals(4)
        self.kind.currentIndexChanged.connect(self._on_kind)
        self._on_kind(0)
        self.checks: dict[str, QCheckBox] = {}
        techniques = QHBoxLayout()
        techniques.setSpacing(10)
        for name in DEFAULT_TECHNIQUES:
            box = QCheckBox(name)
            box.setChecked(True)
            self.checks[name] = box
            techniques.addWidget(box)
        techniques.addStretch(1)
        self.analyze_button = QPushButton("Analyze sensitivity")
        self.analyze_button.setToolTip(
            "Try each technique on each of the slowest weighted operators alone, measure the "
            "latency saved and the output error, then build a plan within the budget")
        self.analyze_button.clicked.connect(self._on_analyze)
        self.accept_button = QPushButton("Use this plan")
        self.accept_button.setEnabled(False)
        self.accept_button.clicked.connect(self._on_accept)

        # two short rows rather than one long one: the panel shares its dock area with the
        # results, and its minimum width would otherwise squeeze the operator table
        top = QHBoxLayout()
        top.addWidget(QLabel("Accuracy budget:"))
        top.addWidget(self.kind)
        top.addWidget(self.value)
        top.addStretch(1)
        top.addWidget(self.analyze_button)
        top.addWidget(self.accept_button)
        techniques.insertWidget(0, QLabel("Try:"))

        self.summary = QLabel("Run the advisor to measure, per operator, what each technique "
                              "saves and what it costs in accuracy.")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setSortingEnabled(True)
        self.table.cellClicked.connect(self._on_row)

        self.plot = pg.PlotWidget()
        pi = self.plot.getPlotItem()
        pi.setTitle("Saved vs error", color="#2a3240", size="11pt")
        pi.setLabel("bottom", "−SNR (dB), right is worse")
        pi.setLabel("left", "saved (ms)")
        for axis in ("left", "bottom"):
            pi.getAxis(axis).enableAutoSIPrefix(False)
        pi.showGrid(x=True, y=True, alpha=0.2)
        pi.setMenuEnabled(False)
        pi.hideButtons()
        self.legend = pi.addLegend(offset=(-10, 10))
        self.scatter = pg.ScatterPlotItem(hoverable=True, tip=self._tip)
        pi.addItem(self.scatter)
        self.scatter.sigClicked.connect(self._on_point)
        self.budget_line = pg.InfiniteLine(angle=90, movable=False,
                                           pen=pg.mkPen("#b42318", style=Qt.PenStyle.DashLine))
        pi.addItem(self.budget_line)
        pi.addItem(pg.InfiniteLine(angle=0, movable=False, pen=pg.mkPen("#b8c0cc")))

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.table)
        split.addWidget(self.plot)
        split.setSizes([500, 500])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addLayout(top)
        layout.addLayout(techniques)
        layout.addWidget(self.summary)
        layout.addWidget(split, 1)

    # --- inputs ------------------------------------------------------------------------------
    def budget(self) -> Budget:
        if self.kind.currentIndex() == 0:
            return Budget(min_cosine=self.value.value())
        return Budget(min_snr_db=self.value.value())

    def techniques(self) -> dict[str, Any]:
        return {t: copy.deepcopy(DEFAULT_TECHNIQUES[t]) for t, box in self.checks.items()
                if box.isChecked()}

    def set_running(self, running: bool) -> None:
        self.analyze_button.setEnabled(not running)

    def _on_kind(self, index: int) -> None:
        if index == 0:
            self.value.setDecimals(4)
            self.value.setRange(0.5, 1.0)
            self.value.setSingleStep(0.0005)
            self.value.setValue(0.999)
        else:
            self.value.setDecimals(1)
            self.value.setRange(0.0, 120.0)
            self.value.setSingleStep(1.0)
            self.value.setValue(30.0)

    def _on_analyze(self) -> None:
        if not self.techniques():
            self.summary.setText("Choose at least one technique to try.")
            return
        self.analyzeRequested.emit(self.budget(), self.techniques())

    def _on_accept(self) -> None:
        if self.advice is not None and self.advice.plan.recipe.steps:
            self.planAccepted.emit(self.advice.plan.recipe)

    # --- display -----------------------------------------------------------------------------
    def set_advice(self, advice: Advice) -> None:
        self.advice = advice
        plan = advice.plan
        chosen = {c.key for c in plan.chosen}
        self.table.setSortingEnabled(False)
        cands = sorted(advice.sensitivity.candidates,
                       key=lambda c: (-c.before_ms, c.key))
        self.table.setRowCount(len(cands))
        for row, c in enumerate(cands):
            point = advice.roofline.get(c.node)
            note = c.error or plan.rejected.get(c.key, "")
            if c.key in chosen:
                note = advice.explain(c)
            values = (c.node, c.label,
                      c.gain_ms if c.after_ms is not None else None, c.snr_db, c.cosine,
                      "✓" if c.key in chosen else "", c.op_type,
                      point.bound if point else "", c.before_ms, c.after_ms, note)
            for col, v in enumerate(values):
                item = _SortItem()
                if isinstance(v, float):
                    text = "inf" if math.isinf(v) else (f"{v:.6f}" if col == COL_COSINE else
                                                        f"{v:.1f}" if col == COL_SNR else f"{v:.4f}")
                    item.setData(Qt.ItemDataRole.DisplayRole, text)
                    item.setData(Qt.ItemDataRole.UserRole, v)
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                else:
                    item.setText("" if v is None else str(v))
                if col == COL_NOTE and note:
                    item.setToolTip(note)
                if col == COL_TECHNIQUE:
                    item.setForeground(QColor(technique_colour(c.technique)))
                self.table.setItem(row, col, item)
        self.table.setSortingEnabled(True)
        self.table.resizeColumnsToContents()
        self._plot(advice, chosen)
        verified = plan.verified
        total = advice.sensitivity.baseline.total_ms.get("p50") or 0.0
        text = (f"Plan within {plan.budget.describe()}: {len(plan.chosen)} rewrite(s), predicted "
                f"saving {plan.predicted_gain_ms:.3f} ms of {total:.3f} ms per run")
        if advice.nothing_applies is not None:
            text = f"Nothing could be applied: {advice.nothing_applies}"
        if verified is not None:
            snr = "inf" if verified.snr_db is None or math.isinf(verified.snr_db) \
                else f"{verified.snr_db:.1f}"
            text += f"; verified end to end: cosine {verified.cosine:.6f}, SNR {snr} dB"
        m = advice.machine
        text += (f".  Machine: {m.peak_gflops:.0f} GFLOP/s, {m.bandwidth_gbs:.1f} GB/s, ridge "
                 f"{m.ridge:.1f} FLOP/byte.")
        self.summary.setText(text)
        self.accept_button.setEnabled(bool(plan.recipe.steps))

    def _plot(self, advice: Advice, chosen: set[str]) -> None:
        self.scatter.clear()
        self.legend.clear()
        self.points = []
        spots = []
        for c in advice.sensitivity.candidates:
            x = noise_db(c.snr_db)
            if x is None or c.after_ms is None:
                continue
            in_plan = c.key in chosen
            colour = technique_colour(c.technique)
            self.points.append({"node": c.node, "technique": c.technique, "key": c.key, "x": x,
                                "y": c.gain_ms, "in_plan": in_plan})
            spots.append({"pos": (x, c.gain_ms), "data": c.node, "size": 13 if in_plan else 9,
                          "brush": pg.mkBrush(colour),
                          "pen": pg.mkPen("#1f2933", width=2) if in_plan else pg.mkPen(colour),
                          "symbol": "o"})
        self.scatter.addPoints(spots)
        for technique in dict.fromkeys(p["technique"] for p in self.points):
            sample = pg.ScatterPlotItem(brush=pg.mkBrush(technique_colour(technique)),
                                        pen=pg.mkPen(None), size=9)
            self.legend.addItem(sample, technique)
        budget = advice.plan.budget
        limit = budget.min_snr_db if budget.min_snr_db is not None else \
            -10 * math.log10(max(budget.max_noise_ratio, 1e-12))
        self.budget_line.setValue(-limit)
        self.plot.getPlotItem().autoRange()

    def _tip(self, x: float, y: float, data: Any) -> str:
        return f"{data}\nsaved {y:.4f} ms\nSNR {-x:.1f} dB"

    def _on_point(self, _item: Any, points: Any, *_: Any) -> None:
        if len(points):
            self.nodeClicked.emit(str(points[0].data()))

    def _on_row(self, row: int, _col: int) -> None:
        item = self.table.item(row, 0)
        if item is not None:
            self.nodeClicked.emit(item.text())
