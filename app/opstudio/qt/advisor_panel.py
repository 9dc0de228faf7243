"""The advisor: per-node sensitivity as a table and a scatter plot, and the automatic plan.

The panel only displays an ``opstudio.core.plan.advisor.Advice`` and asks for work through signals:
``analyzeRequested(budget, techniques)`` starts a run (the main window owns the worker),
``nodeClicked(name)`` selects a node (a table row or a scatter point), ``planAccepted(recipe)``
hands the proposed plan to the plan editor, where it can be edited and undone like any edit.

A language model is budgeted by next-token top-1 agreement or KL on the prompt and planned for
its decode step (or prefill): the panel then shows the scan by role and the frontier of
agreement against speedup (``opstudio.core.plan.llm.LlmAdvice``). Cosine and SNR budgets stay
for models without logits.
"""

from __future__ import annotations

import copy
import dataclasses
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
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.passes import TECHNIQUES, get_pass
from opstudio.core.plan.advisor import Advice
from opstudio.core.plan.budget import CONFIDENCE, Budget
from opstudio.core.plan.llm import LLM_TECHNIQUES, LlmAdvice
from opstudio.core.plan.sensitivity import DEFAULT_TECHNIQUES

BUDGET_KINDS = ("cosine ≥", "SNR (dB) ≥", "next-token top-1 ≥", "next-token KL (nats) ≤")
KIND_COSINE, KIND_SNR, KIND_TOP1, KIND_KL = range(4)
LLM_COLUMNS = ("role", "technique", "layers", "top-1", "KL nats", "in plan", "note")
# "Run scan on": this machine's processes, a Ray here ("auto"); a typed ray://HOST:PORT
CLUSTER_CHOICES = ("this machine", "Ray on this machine")


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
    clusterChanged = Signal(str)  # "Run scan on", as typed (for the session to remember)
    nodeClicked = Signal(str)
    planAccepted = Signal(object)  # Recipe

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.advice: Advice | None = None
        self.points: list[dict[str, Any]] = []  # what the scatter shows (tests read it)

        self.kind = QComboBox()
        self.kind.addItems(list(BUDGET_KINDS))
        self.kind.setToolTip("Cosine/SNR: on every output, for any model. Top-1/KL: a language "
                             "model's next token on the prompt in Run settings' inputs, at "
                             "every position; the plan then targets the phase chosen here")
        self.value = QDoubleSpinBox()
        self.value.setDecimals(4)
        # the phase a next-token plan makes faster: decode (one token after a past) or prefill
        self.phase = QComboBox()
        self.phase.addItems(["decode", "prefill"])
        self.phase.setToolTip("The step whose latency the plan cuts: a decode step (one token "
                              "after the past) or the prefill of the prompt")
        self.past = QSpinBox()
        self.past.setRange(0, 1 << 20)
        self.past.setSpecialValueText("prompt")
        self.past.setToolTip("Past (KV cache) length of the decode step; 'prompt' = the "
                             "prompt's own KV cache when Run settings name a prompt (.npz)")
        self.phase.currentIndexChanged.connect(
            lambda i: self.past.setEnabled(i == 0 and self.kind.currentIndex() >= KIND_TOP1))
        self.confidence = QDoubleSpinBox()
        self.confidence.setDecimals(2)
        self.confidence.setRange(0.5, 0.99)
        self.confidence.setSingleStep(0.05)
        self.confidence.setValue(CONFIDENCE)
        self.confidence.setToolTip(
            "The plan must hold the budget by a one-sided bound at this confidence on the "
            "prompt's judged tokens, so that it carries over to other text; 0.50 judges on "
            "the measured value alone. Short prompts need a lower value or a longer prompt")
        self.cluster = self._cluster_field()
        self.checks: dict[str, QCheckBox] = {}
        techniques = QHBoxLayout()
        techniques.setSpacing(10)
        for name in dict.fromkeys([*DEFAULT_TECHNIQUES, *LLM_TECHNIQUES]):
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

        # three short rows rather than one long one: the panel shares its dock area with the
        # results, and its minimum width would otherwise squeeze the operator table and the
        # Optimize dock (the next-token budget's phase, past and confidence take a row alone)
        top = QHBoxLayout()
        top.addWidget(QLabel("Accuracy budget:"))
        top.addWidget(self.kind)
        top.addWidget(self.value)
        self.phase_label = QLabel("Phase:")
        top.addWidget(self.phase_label)
        top.addWidget(self.phase)
        self.past_label = QLabel("past:")
        top.addWidget(self.past_label)
        top.addWidget(self.past)
        self.confidence_label = QLabel("confidence:")
        top.addWidget(self.confidence_label)
        top.addWidget(self.confidence)
        top.addStretch(1)
        techniques.insertWidget(0, QLabel("Try:"))
        actions = QHBoxLayout()
        self.cluster_label = QLabel("Run scan on:")
        actions.addWidget(self.cluster_label)
        actions.addWidget(self.cluster)
        actions.addStretch(1)
        actions.addWidget(self.analyze_button)
        actions.addWidget(self.accept_button)
        self.kind.currentIndexChanged.connect(self._on_kind)
        self._on_kind(0)

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

        # next-token advice: agreement against speedup, the plans and the whole-model variants
        self.frontier_points: list[dict[str, Any]] = []  # what the frontier shows (tests)
        self.frontier_plot = pg.PlotWidget()
        fi = self.frontier_plot.getPlotItem()
        fi.setTitle("Frontier: agreement vs speedup", color="#2a3240", size="11pt")
        fi.setLabel("bottom", "speedup (×)")
        fi.setLabel("left", "next-token top-1 agreement")
        fi.showGrid(x=True, y=True, alpha=0.2)
        fi.setMenuEnabled(False)
        fi.hideButtons()
        self.frontier_legend = fi.addLegend(offset=(-10, -10))
        self.frontier_scatter = pg.ScatterPlotItem(hoverable=True, tip=self._frontier_tip)
        fi.addItem(self.frontier_scatter)
        self.frontier_line = pg.PlotDataItem(pen=pg.mkPen("#8e44ad", width=1.5))
        fi.addItem(self.frontier_line)
        self.top1_line = pg.InfiniteLine(angle=0, movable=False,
                                         pen=pg.mkPen("#b42318", style=Qt.PenStyle.DashLine))
        fi.addItem(self.top1_line)
        self.frontier_plot.hide()

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.table)
        split.addWidget(self.plot)
        split.addWidget(self.frontier_plot)
        split.setSizes([500, 500])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addLayout(top)
        layout.addLayout(techniques)
        layout.addLayout(actions)
        layout.addWidget(self.summary)
        layout.addWidget(split, 1)

    # --- inputs ------------------------------------------------------------------------------
    def _cluster_field(self) -> QComboBox:
        """Where a next-token scan judges its variants; timing stays here in every case."""
        box = QComboBox()
        box.setEditable(True)
        box.addItems(list(CLUSTER_CHOICES))
        box.setPlaceholderText("ray://HOST:PORT")
        box.setMinimumContentsLength(18)
        box.setToolTip(
            "Where the scan builds and judges its variants: this machine's processes, a Ray "
            "on this machine (started if none runs), or a Ray cluster's client address, "
            "ray://HOST:PORT (the model must be on a path every node reads). Timing always "
            "runs on this machine: the plan is for its latency. Ray: pip install "
            "'opstudio[cluster]'")
        box.currentTextChanged.connect(self.clusterChanged.emit)
        return box

    def budget(self) -> Budget:
        kind, value = self.kind.currentIndex(), self.value.value()
        if kind == KIND_COSINE:
            return Budget(min_cosine=value)
        if kind == KIND_SNR:
            return Budget(min_snr_db=value)
        if kind == KIND_TOP1:
            return Budget(min_top1=value, confidence=self.confidence.value())
        return Budget(max_kl=value, confidence=self.confidence.value())

    def techniques(self) -> dict[str, Any]:
        llm = self.kind.currentIndex() >= KIND_TOP1
        allowed = LLM_TECHNIQUES if llm else tuple(DEFAULT_TECHNIQUES)
        return {t: copy.deepcopy(DEFAULT_TECHNIQUES.get(t, {})) for t, box in self.checks.items()
                if box.isChecked() and t in allowed}

    def settings_for(self, settings: ProfileSettings) -> ProfileSettings:
        """The run settings an advise run uses: with a next-token budget, the phase and past
        chosen here."""
        if self.kind.currentIndex() < KIND_TOP1:
            return settings
        past = self.past.value() if self.phase.currentIndex() == 0 and self.past.value() else None
        return dataclasses.replace(settings, phase=self.phase.currentText(), past=past)

    def scan_cluster(self) -> str | None:
        """What ``advise`` takes as ``cluster``: None for this machine (and for cosine and SNR
        budgets, whose scan times every rewrite), else "auto" or the address typed."""
        text = self.cluster.currentText().strip()
        if self.kind.currentIndex() < KIND_TOP1 or text in ("", CLUSTER_CHOICES[0]):
            return None
        return "auto" if text == CLUSTER_CHOICES[1] else text

    def set_scan_cluster(self, text: str) -> None:
        index = self.cluster.findText(text or CLUSTER_CHOICES[0])
        if index >= 0:
            self.cluster.setCurrentIndex(index)
        else:
            self.cluster.setCurrentText(text)

    def set_running(self, running: bool) -> None:
        self.analyze_button.setEnabled(not running)

    def _on_kind(self, index: int) -> None:
        if index == KIND_COSINE:
            self.value.setDecimals(4)
            self.value.setRange(0.5, 1.0)
            self.value.setSingleStep(0.0005)
            self.value.setValue(0.999)
        elif index == KIND_SNR:
            self.value.setDecimals(1)
            self.value.setRange(0.0, 120.0)
            self.value.setSingleStep(1.0)
            self.value.setValue(30.0)
        elif index == KIND_TOP1:
            self.value.setDecimals(3)
            self.value.setRange(0.01, 1.0)
            self.value.setSingleStep(0.01)
            self.value.setValue(0.90)
        else:
            self.value.setDecimals(4)
            self.value.setRange(0.0001, 10.0)
            self.value.setSingleStep(0.01)
            self.value.setValue(0.1)
        llm = index >= KIND_TOP1
        for w in (self.phase, self.phase_label, self.past, self.past_label, self.confidence,
                  self.confidence_label, self.cluster, self.cluster_label):
            w.setVisible(llm)
        self.past.setEnabled(llm and self.phase.currentIndex() == 0)
        allowed = LLM_TECHNIQUES if llm else tuple(DEFAULT_TECHNIQUES)
        for name, box in self.checks.items():
            box.setVisible(name in allowed)

    def _on_analyze(self) -> None:
        if not self.techniques():
            self.summary.setText("Choose at least one technique to try.")
            return
        self.analyzeRequested.emit(self.budget(), self.techniques())

    def _on_accept(self) -> None:
        if self.advice is None:
            return
        recipe = self.advice.recipe if isinstance(self.advice, LlmAdvice) \
            else self.advice.plan.recipe
        if recipe.steps:
            self.planAccepted.emit(recipe)

    # --- display -----------------------------------------------------------------------------
    def set_advice(self, advice: Advice | LlmAdvice) -> None:
        if isinstance(advice, LlmAdvice):
            self._set_llm_advice(advice)
            return
        self.advice = advice
        self.table.setColumnCount(len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.plot.show()
        self.frontier_plot.hide()
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

    def _set_llm_advice(self, advice: LlmAdvice) -> None:
        self.advice = advice  # type: ignore[assignment]
        labels = {v.id: v.label for v in advice.variants}
        planned: dict[tuple[str, str], int] = {}
        for c in advice.chosen:
            planned[(c.variant, c.role)] = planned.get((c.variant, c.role), 0) + 1
        self.table.setSortingEnabled(False)
        self.table.clearContents()
        self.table.setColumnCount(len(LLM_COLUMNS))
        self.table.setHorizontalHeaderLabels(LLM_COLUMNS)
        self.table.setRowCount(len(advice.roles))
        for row, r in enumerate(advice.roles):
            variant = advice.variant(r.variant)
            n_plan = planned.get((r.variant, r.role), 0)
            values = (r.role, labels.get(r.variant, r.variant), float(len(r.nodes)), r.top1,
                      r.kl, f"{n_plan} of {len(r.nodes)}" if n_plan else "", r.error or "")
            for col, v in enumerate(values):
                item = _SortItem()
                if isinstance(v, float):
                    item.setData(Qt.ItemDataRole.DisplayRole,
                                 f"{v:.0f}" if col == 2 else f"{v:.4f}")
                    item.setData(Qt.ItemDataRole.UserRole, v)
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                else:
                    item.setText("" if v is None else str(v))
                if col == 1:
                    item.setForeground(QColor(technique_colour(variant.technique)))
                if col == 0 and r.nodes:
                    item.setData(Qt.ItemDataRole.UserRole + 1, r.nodes[0])
                self.table.setItem(row, col, item)
        self.table.setSortingEnabled(True)
        self.table.resizeColumnsToContents()
        self.plot.hide()
        self.frontier_plot.show()
        self._plot_frontier(advice)
        step = "decode step" if advice.phase == "decode" else "prefill"
        if advice.nothing_applies is not None:
            text = f"Nothing could be applied: {advice.nothing_applies}"
        elif not advice.chosen:
            text = (f"No rewrite saves time within {advice.budget.describe()}: the model is "
                    "best left as it is")
        else:
            text = f"Plan within {advice.budget.describe()}: {len(advice.chosen)} rewrite(s)"
            if advice.verified is not None:
                text += (f"; on the prompt: top-1 {advice.verified['top1']:.3f}, "
                         f"KL {advice.verified['kl'] or 0:.4f} nats")
            if advice.speedup is not None and advice.speedup.speedup is not None:
                text += (f"; {step} {advice.speedup.speedup:.2f}× faster "
                         f"[{advice.speedup.low:.2f}, {advice.speedup.high:.2f}]")
        text += f".  Base {step}: {advice.base_ms:.2f} ms; advised in {advice.seconds:.0f} s."
        self.summary.setText(text)
        self.accept_button.setEnabled(bool(advice.recipe.steps))

    def _plot_frontier(self, advice: LlmAdvice) -> None:
        self.frontier_scatter.clear()
        self.frontier_legend.clear()
        self.frontier_points = []
        spots = []
        styles = {"plan": ("#8e44ad", "o"), "whole": ("#2a3240", "s")}
        for p in advice.frontier:
            if p.top1 is None or p.speedup is None:
                continue
            chosen = advice.speedup is not None and p.limit == advice.speedup.limit \
                and p.kind == "plan"
            colour, symbol = styles.get(p.kind, styles["whole"])
            self.frontier_points.append({"label": p.label, "x": p.speedup, "y": p.top1,
                                         "kind": p.kind, "holds": p.holds, "chosen": chosen})
            spots.append({"pos": (p.speedup, p.top1), "data": p.label,
                          "size": 14 if chosen else 9, "symbol": symbol,
                          "brush": pg.mkBrush(colour if p.holds else "#ffffff"),
                          "pen": pg.mkPen(colour, width=2)})
        self.frontier_scatter.addPoints(spots)
        plans = sorted((p["x"], p["y"]) for p in self.frontier_points if p["kind"] == "plan")
        self.frontier_line.setData([x for x, _ in plans], [y for _, y in plans])
        for kind, text in (("plan", "advisor's plans"), ("whole", "whole-model variants")):
            if any(p["kind"] == kind for p in self.frontier_points):
                colour, symbol = styles[kind]
                self.frontier_legend.addItem(pg.ScatterPlotItem(
                    brush=pg.mkBrush(colour), pen=pg.mkPen(None), size=9, symbol=symbol), text)
        budget = advice.budget
        self.top1_line.setVisible(budget.min_top1 is not None)
        if budget.min_top1 is not None:
            self.top1_line.setValue(budget.min_top1)
        self.frontier_plot.getPlotItem().autoRange()

    def _frontier_tip(self, x: float, y: float, data: Any) -> str:
        return f"{data}\n{x:.2f}× faster\ntop-1 {y:.3f}"

    def _tip(self, x: float, y: float, data: Any) -> str:
        return f"{data}\nsaved {y:.4f} ms\nSNR {-x:.1f} dB"

    def _on_point(self, _item: Any, points: Any, *_: Any) -> None:
        if len(points):
            self.nodeClicked.emit(str(points[0].data()))

    def _on_row(self, row: int, _col: int) -> None:
        item = self.table.item(row, 0)
        if item is not None:
            # a role row selects its first layer's node
            node = item.data(Qt.ItemDataRole.UserRole + 1)
            self.nodeClicked.emit(str(node) if node else item.text())
