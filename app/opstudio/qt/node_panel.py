"""The optimization panel: techniques for the selected nodes, their parameters, and the plan.

Each technique comes from ``opstudio.core.passes``; it is enabled only when its ``check`` accepts
every selected node, otherwise it stays visible, disabled, with the core's reason. A pass whose
check analyses the whole model (``Pass.slow_check``: fuse, 1.6 s on a 30-layer decoder) is asked
in a ``Worker`` off the UI thread; its technique reads "checking…" until the answer arrives. Parameter
editors are generated from the pass's ``ParamSpec``s. The plan is the core's ``Plan`` (recipe
steps with undo); the panel edits it and shows it as it changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from opstudio.core.errors import OpstudioError
from opstudio.core.model.graph import GraphInfo
from opstudio.core.passes import TECHNIQUES, get_pass
from opstudio.core.passes.base import ParamSpec, Pass
from opstudio.core.plan.recipe import Recipe, Step
from opstudio.core.session.edits import Plan
from opstudio.qt.worker import Worker

MAX_CHECKED = 5000  # checking more nodes than this per selection would stall the UI
CHECKING = "checking…"  # a slow check's reason until its answer arrives


def available_passes() -> list[Pass]:
    """The passes that import on this machine (a missing optional dependency hides one)."""
    out = []
    for t in TECHNIQUES:
        try:
            out.append(get_pass(t))
        except (ImportError, OpstudioError, KeyError):
            continue
    return out


def describe_step(step: Step) -> str:
    try:
        label = get_pass(step.technique).label or step.technique
    except (ImportError, OpstudioError, KeyError):
        label = step.technique
    params = ", ".join(f"{k}={v}" for k, v in (step.params or {}).items() if v is not None)
    target = step.describe_target()
    return f"{label}  ({params})  →  {target}" if params else f"{label}  →  {target}"


class ParamEditor(QWidget):
    """A form built from a pass's ParamSpecs; ``values()`` gives the params dict."""

    def __init__(self, p: Pass, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.p = p
        self.getters: dict[str, Any] = {}
        self.setters: dict[str, Any] = {}
        form = QFormLayout(self)
        form.setContentsMargins(0, 4, 0, 0)
        form.setLabelAlignment(Qt.AlignmentFlag.AlignRight)
        if not p.params:
            form.addRow(QLabel("No parameters."))
        for spec in p.params:
            editor, get, set_ = _editor(spec)
            if spec.optional:
                box = QCheckBox()
                box.setToolTip("unset = let the technique choose")
                row = QWidget()
                h = QHBoxLayout(row)
                h.setContentsMargins(0, 0, 0, 0)
                h.addWidget(box)
                h.addWidget(editor, 1)
                box.toggled.connect(editor.setEnabled)
                box.setChecked(spec.default is not None)
                editor.setEnabled(spec.default is not None)
                self.getters[spec.name] = (lambda g=get, b=box: g() if b.isChecked() else None)

                def setter(v: Any, s=set_, b=box) -> None:
                    b.setChecked(v is not None)
                    if v is not None:
                        s(v)

                self.setters[spec.name] = setter
                widget: QWidget = row
            else:
                self.getters[spec.name] = get
                self.setters[spec.name] = set_
                widget = editor
            widget.setToolTip(spec.help)
            editor.setObjectName(f"param_{spec.name}")
            label = QLabel(spec.label or spec.name)
            label.setToolTip(spec.help)
            form.addRow(label, widget)

    def values(self) -> dict[str, Any]:
        return {name: get() for name, get in self.getters.items()}

    def set_value(self, name: str, value: Any) -> None:
        self.setters[name](value)


def _editor(spec: ParamSpec) -> tuple[QWidget, Any, Any]:
    d = spec.default
    if spec.kind == "bool":
        check = QCheckBox()
        check.setChecked(bool(d))
        return check, check.isChecked, check.setChecked
    if spec.kind == "int":
        spin = QSpinBox()
        spin.setRange(int(spec.minimum) if spec.minimum is not None else -(2**31 - 1),
                      int(spec.maximum) if spec.maximum is not None else 2**31 - 1)
        if d is not None:
            spin.setValue(int(d))
        return spin, spin.value, lambda v: spin.setValue(int(v))
    if spec.kind == "float":
        fspin = QDoubleSpinBox()
        fspin.setDecimals(4)
        fspin.setRange(spec.minimum if spec.minimum is not None else -1e9,
                       spec.maximum if spec.maximum is not None else 1e9)
        fspin.setSingleStep(0.01 if (spec.maximum or 2) <= 1 else 1.0)
        if d is not None:
            fspin.setValue(float(d))
        return fspin, fspin.value, lambda v: fspin.setValue(float(v))
    if spec.kind == "choice":
        combo = QComboBox()
        for c in spec.choices:
            combo.addItem(str(c), c)
        if d in spec.choices:
            combo.setCurrentIndex(list(spec.choices).index(d))
        return (combo, lambda: combo.currentData(),
                lambda v: combo.setCurrentIndex(max(0, list(spec.choices).index(v))))
    # path
    row = QWidget()
    h = QHBoxLayout(row)
    h.setContentsMargins(0, 0, 0, 0)
    line = QLineEdit(str(d or ""))
    browse = QPushButton("…")
    browse.setFixedWidth(28)

    def pick() -> None:
        path, _ = QFileDialog.getOpenFileName(row, spec.label or spec.name)
        if path:
            line.setText(path)

    browse.clicked.connect(pick)
    h.addWidget(line, 1)
    h.addWidget(browse)
    return row, lambda: line.text() or None, lambda v: line.setText(str(v or ""))


def selection_reason(p: Pass, model: onnx.ModelProto | None,
                     nodes: dict[str, onnx.NodeProto], selection: Sequence[str],
                     params: dict[str, Any]) -> str | None:
    """Why ``p`` cannot take the selected nodes (the first reason, with how many it refuses),
    None when it takes them all."""
    if model is None or not selection:  # nothing is selectable without a model
        return "select one or more operators first"
    if len(selection) > MAX_CHECKED:
        return f"more than {MAX_CHECKED} operators selected; narrow the selection"
    bad: dict[str, list[str]] = {}
    for name in selection:
        node = nodes.get(name)
        if node is None:
            return f"{name}: not in the model"
        try:
            why = p.check(model, node, params)
        except Exception as exc:  # a check must never break the panel
            why = f"cannot check ({type(exc).__name__}: {exc})"
        if why:
            bad.setdefault(why, []).append(name)
    if not bad:
        return None
    why, names = next(iter(bad.items()))
    if len(selection) == 1:
        return why
    count = sum(len(v) for v in bad.values())
    return f"{count} of {len(selection)} selected cannot take it — {names[0]}: {why}"


def _reason_for(technique: str, generation: int, *args: Any, progress: Any = None,
                cancelled: Any = None) -> tuple[str, int, str | None]:
    """``selection_reason`` in a worker, its answer labelled with what was asked."""
    return technique, generation, selection_reason(*args)


class NodePanel(QWidget):
    """Technique chooser + parameters for the selection, and the plan list below it."""

    stepAdded = Signal(object)

    def __init__(self, plan: Plan, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.plan = plan
        self.model: onnx.ModelProto | None = None
        self.graph: GraphInfo | None = None
        self._nodes: dict[str, onnx.NodeProto] = {}
        self.selection: list[str] = []
        self.passes = available_passes()
        self.reasons: dict[str, str | None] = {}
        self._checks: dict[str, Worker] = {}  # technique -> its slow check of the selection
        self._generation = 0  # the selection's; answers for an older one are dropped

        self.header = QLabel("Select operators in the graph or the table.")
        self.header.setWordWrap(True)
        self.header.setObjectName("panelHeader")

        tech_box = QGroupBox("Technique")
        tech_layout = QVBoxLayout(tech_box)
        tech_layout.setSpacing(2)
        self.buttons = QButtonGroup(self)
        self.buttons.setExclusive(True)
        self.radio: dict[str, QRadioButton] = {}
        self.reason_labels: dict[str, QLabel] = {}
        self.editors = QStackedWidget()
        self.editor_for: dict[str, ParamEditor] = {}
        for i, p in enumerate(self.passes):
            rb = QRadioButton(p.label or p.technique)
            rb.setObjectName(f"technique_{p.technique}")
            rb.setToolTip(p.description)
            self.buttons.addButton(rb, i)
            self.radio[p.technique] = rb
            reason = QLabel()
            reason.setWordWrap(True)
            reason.setObjectName("reason")
            reason.setVisible(False)
            reason.setContentsMargins(22, 0, 0, 2)
            self.reason_labels[p.technique] = reason
            tech_layout.addWidget(rb)
            tech_layout.addWidget(reason)
            ed = ParamEditor(p)
            self.editor_for[p.technique] = ed
            self.editors.addWidget(ed)
        self.buttons.idToggled.connect(self._on_technique)

        params_box = QGroupBox("Parameters")
        pl = QVBoxLayout(params_box)
        pl.addWidget(self.editors)
        self.param_error = QLabel()
        self.param_error.setObjectName("error")
        self.param_error.setWordWrap(True)
        pl.addWidget(self.param_error)

        self.apply_button = QPushButton("Add to plan for selected")
        self.apply_button.setObjectName("primary")
        self.apply_button.clicked.connect(self.apply_to_selected)

        plan_box = QGroupBox("Plan")
        plan_layout = QVBoxLayout(plan_box)
        self.plan_list = QListWidget()
        self.plan_list.setMinimumHeight(90)
        self.plan_list.setWordWrap(True)
        self.plan_list.setAlternatingRowColors(True)
        plan_layout.addWidget(self.plan_list)
        row = QHBoxLayout()
        self.remove_button = QPushButton("Remove")
        self.remove_button.clicked.connect(self.remove_selected_step)
        self.undo_button = QPushButton("Undo")
        self.undo_button.clicked.connect(plan.undo)
        self.redo_button = QPushButton("Redo")
        self.redo_button.clicked.connect(plan.redo)
        self.load_button = QPushButton("Load…")
        self.load_button.clicked.connect(self._on_load)
        self.save_button = QPushButton("Save…")
        self.save_button.clicked.connect(self._on_save)
        for b in (self.remove_button, self.undo_button, self.redo_button):
            row.addWidget(b)
        plan_layout.addLayout(row)
        row2 = QHBoxLayout()
        row2.addWidget(self.load_button)
        row2.addWidget(self.save_button)
        row2.addStretch(1)
        plan_layout.addLayout(row2)
        plan.history_changed.connect(self._refresh_history)
        self._refresh_history()

        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 8, 8, 8)
        lay.setSpacing(8)
        lay.addWidget(self.header)
        lay.addWidget(tech_box)
        lay.addWidget(params_box)
        lay.addWidget(self.apply_button)
        lay.addWidget(plan_box, 1)
        plan.changed.connect(self._refresh_plan)
        self.set_selection([])
        self._refresh_plan()

    # --- inputs ---------------------------------------------------------------------------
    def set_model(self, model: onnx.ModelProto | None, graph: GraphInfo | None = None) -> None:
        self.model, self.graph = model, graph
        self._nodes = {n.name: n for n in model.graph.node} if model is not None else {}
        self.set_selection([])
        self._refresh_plan()

    def set_selection(self, names: Sequence[str]) -> None:
        self.selection = list(names)
        n = len(self.selection)
        if n == 0:
            self.header.setText("Select operators in the graph or the table.")
        else:
            ops: dict[str, int] = {}
            for name in self.selection:
                node = self._nodes.get(name)
                if node is not None:
                    ops[node.op_type] = ops.get(node.op_type, 0) + 1
            kinds = ", ".join(f"{op} ×{c}" for op, c in sorted(ops.items(), key=lambda kv: -kv[1]))
            self.header.setText(f"<b>{n} selected</b> — {kinds}" if n > 1
                                else f"<b>{self.selection[0]}</b> — {kinds}")
        self._generation += 1
        for worker in self._checks.values():
            worker.cancel()
        self._checks = {}
        self.reasons = {}
        for p in self.passes:
            if p.slow_check and self._checkable():
                self.reasons[p.technique] = CHECKING
                self._check_in_background(p)
            else:
                self.reasons[p.technique] = self._reason(p)
        self._show_reasons()

    def _checkable(self) -> bool:
        return self.model is not None and 0 < len(self.selection) <= MAX_CHECKED

    def _check_in_background(self, p: Pass) -> None:
        worker = Worker(_reason_for, p.technique, self._generation, p, self.model, self._nodes,
                        list(self.selection), self.editor_for[p.technique].values(),
                        name=f"check {p.technique}")
        # a bound method: Qt drops the connection if the panel goes first
        worker.signals.result.connect(self._on_checked)
        self._checks[p.technique] = worker
        worker.start()

    def _on_checked(self, answer: tuple[str, int, str | None]) -> None:
        technique, generation, why = answer
        if generation != self._generation:  # asked for a selection since replaced
            return
        self._checks.pop(technique, None)
        self.reasons[technique] = why
        self._show_reasons()

    def checking(self) -> bool:
        """A slow check of the selection is still running."""
        return bool(self._checks)

    def _show_reasons(self) -> None:
        n = len(self.selection)
        first_ok = None
        for p in self.passes:
            reason = self.reasons[p.technique]
            rb, lbl = self.radio[p.technique], self.reason_labels[p.technique]
            rb.setEnabled(reason is None)
            rb.setToolTip(p.description if reason is None else reason)
            # what else a technique rewrites with the selection (a pruned MLP's other layers)
            remark = self._remark(p) if reason is None else None
            lbl.setText(reason or remark or "")
            lbl.setVisible(bool(reason or remark) and n > 0)
            if reason is None and first_ok is None:
                first_ok = p.technique
        # Nodes already in a step show that step's technique and params, not the defaults of
        # whatever was checked last (which read as if the node were planned that way).
        index = self._planned_step()
        planned = None if index is None else self.plan.steps[index]
        if index is not None:
            self.plan_list.setCurrentRow(index)  # and Remove takes that step
        if planned is not None and self.reasons.get(planned.technique) is None:
            self.radio[planned.technique].setChecked(True)
            editor = self.editor_for[planned.technique]
            for name, value in planned.params.items():
                if name in editor.setters:
                    editor.set_value(name, value)
        checked = self.current_technique()
        if checked is None or self.reasons.get(checked) is not None:
            if first_ok is not None:
                self.radio[first_ok].setChecked(True)
            elif checked is not None:
                self.buttons.setExclusive(False)
                self.radio[checked].setChecked(False)
                self.buttons.setExclusive(True)
        self._update_apply()

    def _planned_step(self) -> int | None:
        """The index of the last step that names every selected node, if any."""
        chosen = set(self.selection)
        for i in reversed(range(len(self.plan.steps))):
            nodes = self.plan.steps[i].nodes
            if chosen and nodes and chosen <= set(nodes):
                return i
        return None

    def _reason(self, p: Pass) -> str | None:
        return selection_reason(p, self.model, self._nodes, self.selection,
                                self.editor_for[p.technique].values())

    def _remark(self, p: Pass) -> str | None:
        remark = getattr(p, "remark", None)
        if remark is None:
            return None
        try:
            return remark(self.model, [self._nodes[n] for n in self.selection if n in self._nodes])
        except Exception:  # a remark is a courtesy: it must never break the panel
            return None

    # --- actions ------------------------------------------------------------------------------
    def current_technique(self) -> str | None:
        b = self.buttons.checkedButton()
        if b is None:
            return None
        return self.passes[self.buttons.id(b)].technique

    def select_technique(self, technique: str) -> bool:
        rb = self.radio.get(technique)
        if rb is None or not rb.isEnabled():
            return False
        rb.setChecked(True)
        return True

    def params(self) -> dict[str, Any]:
        t = self.current_technique()
        return {} if t is None else self.editor_for[t].values()

    def apply_to_selected(self) -> Step | None:
        t = self.current_technique()
        if t is None or not self.selection or self.reasons.get(t) is not None:
            return None
        p = get_pass(t)
        try:
            params = p.validate_params(self.editor_for[t].values())
        except OpstudioError as exc:
            self.param_error.setText(str(exc))
            return None
        why = self._reason(p)  # checked with the params as they are now (a block size, …)
        if why:
            self.param_error.setText(why)
            return None
        self.param_error.setText("")
        step = Step(technique=t, params=params, nodes=list(self.selection))
        self.plan.add(step)
        self.stepAdded.emit(step)
        return step

    def remove_selected_step(self) -> None:
        row = self.plan_list.currentRow()
        if 0 <= row < len(self.plan.steps):
            self.plan.remove(row)

    def _on_technique(self, index: int, checked: bool) -> None:
        if checked:
            self.editors.setCurrentIndex(index)
        self._update_apply()

    def _update_apply(self) -> None:
        t = self.current_technique()
        ok = t is not None and bool(self.selection) and self.reasons.get(t) is None
        self.apply_button.setEnabled(ok)
        n = len(self.selection)
        self.apply_button.setText(f"Add to plan for {n} selected" if n > 1
                                  else "Add to plan for selected")

    def _refresh_plan(self) -> None:
        current = self.plan_list.currentRow()
        self.plan_list.clear()
        for step in self.plan.steps:
            self.plan_list.addItem(QListWidgetItem(describe_step(step)))
        if self.plan.steps:
            self.plan_list.setCurrentRow(min(max(current, 0), len(self.plan.steps) - 1))
        self.remove_button.setEnabled(bool(self.plan.steps))

    def _refresh_history(self) -> None:
        self.undo_button.setEnabled(self.plan.can_undo())
        self.redo_button.setEnabled(self.plan.can_redo())

    def load_recipe(self, path: str | Path) -> None:
        recipe = Recipe.load(path)
        self.plan.replace(recipe.steps)

    def save_recipe(self, path: str | Path) -> None:
        self.plan.recipe().save(path, overwrite=True)

    def _on_load(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load plan", "", "Recipe (*.json)")
        if path:
            try:
                self.load_recipe(path)
            except OpstudioError as exc:
                QMessageBox.warning(self, "Load plan", str(exc))

    def _on_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save plan", "recipe.json", "Recipe (*.json)")
        if path:
            try:
                self.save_recipe(path)
            except OpstudioError as exc:
                QMessageBox.warning(self, "Save plan", str(exc))
