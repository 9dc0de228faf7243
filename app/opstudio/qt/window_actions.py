"""The main window's actions, menus and toolbar, and which of them a state allows.

Built from a window that provides the slots (``WindowSlots``), so this module does not import
the window's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import onnx
from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QDockWidget, QMainWindow, QMessageBox, QPushButton, QToolBar

from opstudio.core.session.document import Document
from opstudio.core.session.edits import Plan
from opstudio.qt.exports import Exports
from opstudio.qt.graph_toolbar import GraphToolbar
from opstudio.qt.graph_view import GraphView
from opstudio.qt.node_panel import NodePanel
from opstudio.qt.op_table import OpTable
from opstudio.qt.worker import Worker


class WindowSlots(Protocol):
    exports: Exports
    panel: NodePanel
    graph_view: GraphView
    graph_bar: GraphToolbar
    table: OpTable

    def open_dialog(self) -> None: ...
    def open_model(self, path: str | Path) -> bool: ...
    def run_profile(self) -> Worker | None: ...
    def run_compare(self) -> Worker | None: ...
    def advise_from_menu(self) -> None: ...
    def cancel_run(self) -> None: ...
    def edit_run_settings(self) -> None: ...
    def set_selection(self, indices: list[int]) -> None: ...
    def docks(self) -> tuple[QDockWidget, ...]: ...


def about_text() -> str:
    import onnxruntime
    from PySide6 import __version__ as pyside_version

    from opstudio import __version__

    return (f"<h3>opstudio {__version__}</h3>"
            "<p>Operator-level profiling and optimization of ONNX models: low-rank "
            "factorization, pruning and quantization, measured per operator.</p>"
            f"<p>onnx {onnx.__version__} · onnxruntime {onnxruntime.__version__} · "
            f"PySide6 {pyside_version}</p>")


class WindowActions:
    def __init__(self, window: QMainWindow, slots: WindowSlots, plan: Plan) -> None:
        self.window, self.plan = window, plan
        s, view = slots, slots.graph_view
        self.open = self._action("Open…", s.open_dialog, QKeySequence.StandardKey.Open,
                                 "Open an ONNX model")
        self.save_model = self._action("Save optimized model as…",
                                       s.exports.save_optimized_dialog,
                                       QKeySequence.StandardKey.SaveAs)
        self.export = self._action("Export report…", s.exports.export_report_dialog)
        self.load_plan = self._action("Load plan…", s.panel._on_load)
        self.save_plan = self._action("Save plan…", s.panel._on_save)
        self.export_olive = self._action("Export plan as Olive workflow…",
                                         s.exports.export_olive_dialog)
        quit_action = self._action("Quit", window.close, QKeySequence.StandardKey.Quit)
        self.profile = self._action("Profile", s.run_profile, "F5",
                                    "Measure the model as it is (baseline)")
        self.compare = self._action("Optimize && compare", s.run_compare, "F6",
                                    "Apply the plan, then profile before/after and check "
                                    "accuracy")
        self.advise = self._action(
            "Advise…", s.advise_from_menu, "F7",
            "Measure each technique on each slow operator and propose a plan within an "
            "accuracy budget")
        self.cancel = self._action("Cancel", s.cancel_run, "Esc", "Stop the current run")
        self.settings = self._action("Run settings…", s.edit_run_settings)
        self.netron = self._action("Open in Netron", s.exports.open_netron_original)
        self.netron_opt = self._action("Open optimized in Netron",
                                       s.exports.open_netron_optimized)
        self.undo = self._action("Undo", plan.undo, QKeySequence.StandardKey.Undo)
        self.redo = self._action("Redo", plan.redo, QKeySequence.StandardKey.Redo)
        plan.history_changed.connect(self._on_history)
        self._on_history()

        mb = window.menuBar()
        file_menu = mb.addMenu("&File")
        file_menu.addAction(self.open)
        self.recent_menu = file_menu.addMenu("Open recent")
        self._open_model = s.open_model
        file_menu.addSeparator()
        for a in (self.save_model, self.export, self.load_plan, self.save_plan,
                  self.export_olive):
            file_menu.addAction(a)
        file_menu.addSeparator()
        file_menu.addAction(quit_action)
        edit = mb.addMenu("&Edit")
        edit.addAction(self.undo)
        edit.addAction(self.redo)
        edit.addSeparator()
        edit.addAction(self._action("Clear selection", lambda: s.set_selection([])))
        view_menu = mb.addMenu("&View")
        view_menu.addAction(self._action("Find…", s.graph_bar.focus_search,
                                         QKeySequence.StandardKey.Find))
        view_menu.addAction(self._action("Fit graph", view.fit_all, "Ctrl+0"))
        view_menu.addAction(self._action("Zoom in", lambda: view.zoom(1.25), "Ctrl++"))
        view_menu.addAction(self._action("Zoom out", lambda: view.zoom(0.8), "Ctrl+-"))

        def fold_every_layer() -> None:
            s.table.set_grouped(True)
            view.fold_all()

        view_menu.addAction(self._action("Fold every layer", fold_every_layer))
        view_menu.addAction(self._action("Open every layer", view.unfold_all))
        view_menu.addSeparator()
        for d in s.docks():
            view_menu.addAction(d.toggleViewAction())
        run = mb.addMenu("&Run")
        for a in (self.profile, self.compare, self.advise, self.cancel, self.settings):
            run.addAction(a)
        tools = mb.addMenu("&Tools")
        tools.addAction(self.netron)
        tools.addAction(self.netron_opt)
        help_menu = mb.addMenu("&Help")
        help_menu.addAction(self._action(
            "About opstudio", lambda: QMessageBox.about(window, "About opstudio", about_text())))

        tb = QToolBar("Main")
        tb.setObjectName("mainToolbar")
        tb.setMovable(False)
        tb.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
        tb.addAction(self.open)
        tb.addSeparator()
        for a in (self.settings, self.profile, self.compare, self.cancel):
            tb.addAction(a)
        tb.addSeparator()
        for a in (self.save_model, self.export, self.netron):
            tb.addAction(a)
        window.addToolBar(tb)

    def _action(self, text: str, slot: Callable[[], object],
                shortcut: QKeySequence | QKeySequence.StandardKey | str | None = None,
                tip: str = "") -> QAction:
        a = QAction(text, self.window)
        a.triggered.connect(slot)
        if shortcut is not None:
            a.setShortcut(QKeySequence(shortcut))
        if tip:
            a.setStatusTip(tip)
            a.setToolTip(tip)
        return a

    def _on_history(self) -> None:
        self.undo.setEnabled(self.plan.can_undo())
        self.undo.setText(f"Undo {self.plan.undo_text()}".strip())
        self.redo.setEnabled(self.plan.can_redo())
        self.redo.setText(f"Redo {self.plan.redo_text()}".strip())

    def set_recent(self, recent: list[str]) -> None:
        self.recent_menu.clear()
        for p in recent:
            def open_recent(path: str = p) -> None:
                self._open_model(path)

            self.recent_menu.addAction(p, open_recent)
        self.recent_menu.setEnabled(bool(recent))

    def update(self, doc: Document, running: bool, extra: tuple[QPushButton, ...] = ()) -> None:
        """Enable what the document's state and a run in progress allow; ``extra`` buttons
        (the advisor's Analyze) follow the Profile action."""
        has_model = doc.model is not None
        self.profile.setEnabled(has_model and not running)
        self.compare.setEnabled(has_model and not running and bool(doc.plan.steps))
        self.advise.setEnabled(has_model and not running)
        for button in extra:
            button.setEnabled(has_model and not running)
        self.cancel.setEnabled(running)
        self.save_model.setEnabled(doc.optimized is not None)
        self.export.setEnabled(doc.comparison is not None)
        self.export_olive.setEnabled(has_model and bool(doc.plan.steps))
        self.netron.setEnabled(has_model)
        self.netron_opt.setEnabled(doc.optimized is not None)
