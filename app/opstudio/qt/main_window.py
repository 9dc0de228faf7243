"""The main window: docks, menus and the wiring between widgets and core calls."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from PySide6.QtCore import QEventLoop, QSettings, Qt, QThreadPool, QTimer
from PySide6.QtGui import QAction, QCloseEvent, QDragEnterEvent, QDropEvent, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QComboBox,
    QDockWidget,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMainWindow,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QStackedWidget,
    QToolBar,
    QVBoxLayout,
    QWidget,
)

from opstudio.core.advisor import Budget, advise
from opstudio.core.compare import optimize_and_compare
from opstudio.core.errors import OpstudioError
from opstudio.core.graph import GraphInfo, symbolic_dims
from opstudio.core.model_io import save_model
from opstudio.core.opening import open_for_display
from opstudio.core.profiler import ProfileSettings
from opstudio.core.provenance import derived_nodes
from opstudio.core.recipe import Recipe
from opstudio.core.roofline import cached_machine, profile_roofline, profile_with_machine
from opstudio.qt.advisor_panel import AdvisorPanel
from opstudio.qt.banner import ErrorBanner
from opstudio.qt.graph_view import GraphView
from opstudio.qt.netron_view import NetronWindow
from opstudio.qt.node_panel import NodePanel, Plan
from opstudio.qt.op_table import OpTable
from opstudio.qt.plots import PlotsPanel
from opstudio.qt.run_settings import RunSettingsDialog, settings_from_json, settings_to_json
from opstudio.qt.session import Session
from opstudio.qt.welcome import WelcomePage
from opstudio.qt.worker import Worker


class MainWindow(QMainWindow):
    def __init__(self, settings: QSettings | None = None) -> None:
        super().__init__()
        self.session = Session(settings)
        self.model_path: Path | None = None
        self.model: onnx.ModelProto | None = None
        self.graph: GraphInfo | None = None
        self.profile: Any = None
        self.comparison: Any = None
        self.optimized: Any = None  # OptimizeResult
        self.machine: Any = None  # roofline.Machine, once measured
        self.worker: Worker | None = None
        self.netron_windows: list[NetronWindow] = []
        self._tmpdir = Path(tempfile.mkdtemp(prefix="opstudio-gui-"))
        self.run_settings = settings_from_json(self.session.run_settings())
        self.plan = Plan(self)
        self.plan.changed.connect(self._on_plan_changed)

        self.graph_view = GraphView()
        self.graph_view.node_tooltip_extra = self._node_tooltip
        self.table = OpTable()
        self.panel = NodePanel(self.plan)
        self.plots = PlotsPanel()
        self.advisor = AdvisorPanel()
        self.advisor.analyzeRequested.connect(self.run_advise)
        self.advisor.nodeClicked.connect(self.select_node_named)
        self.advisor.planAccepted.connect(self._on_plan_accepted)
        self.plots.roofline.nodeClicked.connect(self.select_node_named)
        self.welcome = WelcomePage()
        self.welcome.openRequested.connect(self.open_dialog)
        self.welcome.fileChosen.connect(self.open_model)

        self.banner = ErrorBanner()
        self.banner_text = self.banner.text

        graph_page = QWidget()
        gl = QVBoxLayout(graph_page)
        gl.setContentsMargins(0, 0, 0, 0)
        gl.setSpacing(0)
        gl.addWidget(self._graph_toolbar())
        gl.addWidget(self.graph_view, 1)
        welcome_scroll = QScrollArea()  # the page must not set the window's minimum size
        welcome_scroll.setWidget(self.welcome)
        welcome_scroll.setWidgetResizable(True)
        welcome_scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.stack = QStackedWidget()
        self.stack.addWidget(welcome_scroll)
        self.stack.addWidget(graph_page)
        central = QWidget()
        cl = QVBoxLayout(central)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.setSpacing(0)
        cl.addWidget(self.banner)
        cl.addWidget(self.stack, 1)
        self.setCentralWidget(central)

        self.table_dock = self._dock("Operators", self.table, Qt.DockWidgetArea.BottomDockWidgetArea)
        self.plots_dock = self._dock("Results", self.plots, Qt.DockWidgetArea.BottomDockWidgetArea)
        self.splitDockWidget(self.table_dock, self.plots_dock, Qt.Orientation.Horizontal)
        scroll = QScrollArea()
        scroll.setWidget(self.panel)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setCorner(Qt.Corner.BottomRightCorner, Qt.DockWidgetArea.RightDockWidgetArea)
        self.setCorner(Qt.Corner.TopRightCorner, Qt.DockWidgetArea.RightDockWidgetArea)
        self.panel_dock = self._dock("Optimize", scroll, Qt.DockWidgetArea.RightDockWidgetArea)
        self.resizeDocks([self.panel_dock], [360], Qt.Orientation.Horizontal)
        self.resizeDocks([self.table_dock, self.plots_dock], [440, 440], Qt.Orientation.Vertical)
        self.resizeDocks([self.table_dock, self.plots_dock], [470, 770], Qt.Orientation.Horizontal)
        # added last, as a tab behind the results, so it does not take a share of the width
        self.advisor_dock = self._dock("Advisor", self.advisor,
                                       Qt.DockWidgetArea.BottomDockWidgetArea)
        self.tabifyDockWidget(self.plots_dock, self.advisor_dock)
        self.plots_dock.raise_()

        self.progress = QProgressBar()
        self.progress.setFixedWidth(220)
        self.progress.setRange(0, 1000)
        self.progress.hide()
        self.statusBar().addPermanentWidget(self.progress)

        self._actions()
        self.graph_view.selectionChanged.connect(self._on_graph_selection)
        self.table.selectionChanged.connect(self._on_table_selection)
        self.table.nodeActivated.connect(lambda i: self.graph_view.center_on(i))
        self.table.layersShown.connect(self.graph_view.show_layers)
        self.graph_view.share_once = self.table.share_once
        self.graph_view.nodeActivated.connect(self._on_node_activated)
        self.setAcceptDrops(True)
        self.resize(1560, 980)
        geometry, state = self.session.window_geometry(), self.session.window_state()
        if geometry is not None:
            self.restoreGeometry(geometry)
        if state is not None:
            self.restoreState(state)
        else:
            # tabbed docks only take their sizes once the window is laid out
            QTimer.singleShot(0, self._default_dock_sizes)
        self._show_welcome()

    def _default_dock_sizes(self) -> None:
        self.resizeDocks([self.table_dock, self.plots_dock], [560, 740],
                         Qt.Orientation.Horizontal)

    # --- construction -------------------------------------------------------------------------
    def _dock(self, title: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"dock_{title.lower()}")
        dock.setWidget(widget)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                         | QDockWidget.DockWidgetFeature.DockWidgetFloatable
                         | QDockWidget.DockWidgetFeature.DockWidgetClosable)
        self.addDockWidget(area, dock)
        return dock

    def _graph_toolbar(self) -> QWidget:
        bar = QWidget()
        bar.setObjectName("graphBar")
        h = QHBoxLayout(bar)
        h.setContentsMargins(8, 6, 8, 6)
        self.search = QLineEdit()
        self.search.setPlaceholderText("Find node name or op type (Enter)")
        self.search.setClearButtonEnabled(True)
        self.search.setMinimumWidth(250)
        self.search.setMaximumWidth(320)
        self.search.returnPressed.connect(self._on_search)
        self.op_combo = QComboBox()
        self.op_combo.setMinimumWidth(170)
        self.op_combo.activated.connect(self._on_op_combo)
        self.slowest_n = QSpinBox()
        self.slowest_n.setRange(1, 1000)
        self.slowest_n.setValue(5)
        self.slowest_n.setPrefix("slowest ")
        self.slowest_button = QPushButton("Select")
        self.slowest_button.clicked.connect(lambda: self.select_slowest(self.slowest_n.value()))
        fit = QPushButton("Fit")
        fit.clicked.connect(self.graph_view.fit_all)
        zin = QPushButton("+")
        zin.setFixedWidth(30)
        zin.clicked.connect(lambda: self.graph_view.zoom(1.25))
        zout = QPushButton("−")
        zout.setFixedWidth(30)
        zout.clicked.connect(lambda: self.graph_view.zoom(0.8))
        self.graph_info = QLabel()
        self.graph_info.setObjectName("hint")
        for w in (self.search, self.op_combo, self.slowest_n, self.slowest_button):
            h.addWidget(w)
        h.addStretch(1)
        h.addWidget(self.graph_info)
        for w in (zout, zin, fit):
            h.addWidget(w)
        return bar

    def _action(self, text: str, slot: Any, shortcut: Any = None, tip: str = "") -> QAction:
        a = QAction(text, self)
        a.triggered.connect(slot)
        if shortcut is not None:
            a.setShortcut(QKeySequence(shortcut))
        if tip:
            a.setStatusTip(tip)
            a.setToolTip(tip)
        return a

    def _actions(self) -> None:
        self.open_action = self._action("Open…", self.open_dialog, QKeySequence.StandardKey.Open,
                                        "Open an ONNX model")
        self.save_model_action = self._action("Save optimized model as…", self.save_optimized_dialog,
                                              QKeySequence.StandardKey.SaveAs)
        self.export_action = self._action("Export report…", self.export_report_dialog)
        self.load_plan_action = self._action("Load plan…", self.panel._on_load)
        self.save_plan_action = self._action("Save plan…", self.panel._on_save)
        quit_action = self._action("Quit", self.close, QKeySequence.StandardKey.Quit)
        self.profile_action = self._action("Profile", self.run_profile, "F5",
                                           "Measure the model as it is (baseline)")
        self.compare_action = self._action("Optimize && compare", self.run_compare, "F6",
                                           "Apply the plan, then profile before/after and "
                                           "check accuracy")
        self.advise_action = self._action(
            "Advise…", self._on_advise_action, "F7",
            "Measure each technique on each slow operator and propose a plan within an "
            "accuracy budget")
        self.cancel_action = self._action("Cancel", self.cancel_run, "Esc", "Stop the current run")
        self.settings_action = self._action("Run settings…", self.edit_run_settings)
        self.netron_action = self._action("Open in Netron", self.open_netron_original)
        self.netron_opt_action = self._action("Open optimized in Netron",
                                              self.open_netron_optimized)
        undo = self.plan.undo_stack.createUndoAction(self, "Undo")
        undo.setShortcut(QKeySequence.StandardKey.Undo)
        redo = self.plan.undo_stack.createRedoAction(self, "Redo")
        redo.setShortcut(QKeySequence.StandardKey.Redo)

        mb = self.menuBar()
        file_menu = mb.addMenu("&File")
        file_menu.addAction(self.open_action)
        self.recent_menu = file_menu.addMenu("Open recent")
        file_menu.addSeparator()
        for a in (self.save_model_action, self.export_action, self.load_plan_action,
                  self.save_plan_action):
            file_menu.addAction(a)
        file_menu.addSeparator()
        file_menu.addAction(quit_action)
        edit = mb.addMenu("&Edit")
        edit.addAction(undo)
        edit.addAction(redo)
        edit.addSeparator()
        edit.addAction(self._action("Clear selection", lambda: self.set_selection([])))
        view = mb.addMenu("&View")
        view.addAction(self._action("Find…", self._focus_search, QKeySequence.StandardKey.Find))
        view.addAction(self._action("Fit graph", self.graph_view.fit_all, "Ctrl+0"))
        view.addAction(self._action("Zoom in", lambda: self.graph_view.zoom(1.25), "Ctrl++"))
        view.addAction(self._action("Zoom out", lambda: self.graph_view.zoom(0.8), "Ctrl+-"))
        view.addAction(self._action("Fold every layer", self._fold_every_layer))
        view.addAction(self._action("Open every layer", self.graph_view.unfold_all))
        view.addSeparator()
        for d in self._docks():
            view.addAction(d.toggleViewAction())
        run = mb.addMenu("&Run")
        for a in (self.profile_action, self.compare_action, self.advise_action,
                  self.cancel_action, self.settings_action):
            run.addAction(a)
        tools = mb.addMenu("&Tools")
        tools.addAction(self.netron_action)
        tools.addAction(self.netron_opt_action)
        help_menu = mb.addMenu("&Help")
        help_menu.addAction(self._action("About opstudio", self.show_about))

        tb = QToolBar("Main")
        tb.setObjectName("mainToolbar")
        tb.setMovable(False)
        tb.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
        tb.addAction(self.open_action)
        tb.addSeparator()
        for a in (self.settings_action, self.profile_action, self.compare_action,
                  self.cancel_action):
            tb.addAction(a)
        tb.addSeparator()
        for a in (self.save_model_action, self.export_action, self.netron_action):
            tb.addAction(a)
        self.addToolBar(tb)
        self._refresh_recent()
        self._update_actions()

    # --- opening ------------------------------------------------------------------------------
    def open_dialog(self) -> None:
        start = str(self.model_path.parent) if self.model_path else ""
        path, _ = QFileDialog.getOpenFileName(self, "Open model", start, "ONNX model (*.onnx)")
        if path:
            self.open_model(path)

    def open_model(self, path: str | Path) -> bool:
        """Load, analyse and show ``path``; errors are shown and the current model stays.

        The loading runs in the worker (a 10k-node model takes seconds) while a local event
        loop keeps the window painting and Cancel working; callers still get the outcome."""
        if self.is_running():
            self.show_error("wait for the current run to finish (or cancel it) first")
            return False
        p = Path(path)
        outcome: dict[str, Any] = {}
        worker = Worker(open_for_display, str(p), dict(self.run_settings.dims), name="open")
        worker.signals.result.connect(lambda opened: outcome.update(opened=opened))
        loop = QEventLoop()
        QApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
        try:
            self._start(worker, lambda _: None, f"Opening {p.name}", start=False)
            # connected last, so every other slot of the worker has run when the loop ends
            worker.signals.finished.connect(loop.quit)
            worker.start()
            self._update_actions()
            loop.exec()
        finally:
            QApplication.restoreOverrideCursor()
        opened = outcome.get("opened")
        if opened is None:
            return False  # the error (or the cancel) is already on screen
        model, graph, layout = opened.model, opened.graph, opened.layout
        self.model_path, self.model, self.graph = opened.path, model, graph
        self.profile = self.comparison = self.optimized = None
        self.graph_view.set_graph(graph, layout)
        self.table.set_graph(graph, derived_nodes(model))
        self.panel.set_model(model, graph)
        self.plots.clear()
        ops = graph.op_type_counts()
        self.op_combo.clear()
        self.op_combo.addItem("Select op type…", None)
        for op, count in ops.items():
            self.op_combo.addItem(f"{op}  ({count})", op)
        self.graph_info.setText(f"{len(graph.nodes)} operators · {len(ops)} op types")
        self.setWindowTitle(f"{p.name} — opstudio")
        self.session.set_last_model(self.model_path)
        self.session.add_recent(self.model_path)
        self._refresh_recent()
        self._restore_plan()
        self.banner.hide()
        if self.stack.currentIndex() == 0:
            for dock in self._docks():
                dock.show()
        self.stack.setCurrentIndex(1)
        QTimer.singleShot(0, self.graph_view.fit)
        self.statusBar().showMessage(f"Opened {p}", 5000)
        self._update_actions()
        return True

    def _restore_plan(self) -> None:
        data = self.session.plan_json(self.model_path)
        steps = []
        if data and data.get("steps"):
            try:
                steps = Recipe.from_json(data).steps
            except OpstudioError:
                steps = []
        self.plan.replace(steps, "restore plan")
        self.plan.undo_stack.clear()

    def _show_welcome(self) -> None:
        self.welcome.set_recent(self.session.recent_files())
        self.stack.setCurrentIndex(0)
        self.setWindowTitle("opstudio")
        for dock in self._docks():
            dock.hide()  # nothing to show yet; the page gets the whole window

    def _fold_every_layer(self) -> None:
        self.table.set_grouped(True)
        self.graph_view.fold_all()

    def _docks(self) -> tuple[QDockWidget, ...]:
        return (self.table_dock, self.plots_dock, self.advisor_dock, self.panel_dock)

    def _refresh_recent(self) -> None:
        self.recent_menu.clear()
        recent = self.session.recent_files()
        for p in recent:
            def open_recent(path: str = p) -> None:
                self.open_model(path)

            self.recent_menu.addAction(p, open_recent)
        self.recent_menu.setEnabled(bool(recent))
        self.welcome.set_recent(recent)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if any(u.toLocalFile().lower().endswith(".onnx") for u in event.mimeData().urls()):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        for u in event.mimeData().urls():
            if u.toLocalFile().lower().endswith(".onnx"):
                self.open_model(u.toLocalFile())
                event.acceptProposedAction()
                return

    # --- selection ----------------------------------------------------------------------------
    def selected_names(self) -> list[str]:
        if self.graph is None:
            return []
        return [self.graph.nodes[i].name for i in self.graph_view.selected()]

    def set_selection(self, indices: list[int]) -> None:
        self.graph_view.set_selection(indices)
        self.table.set_selection(indices)
        self.panel.set_selection(self.selected_names())

    def select_op_type(self, op_type: str) -> list[int]:
        if self.graph is None:
            return []
        idx = [n.index for n in self.graph.nodes if n.op_type == op_type]
        self.set_selection(idx)
        return idx

    def select_slowest(self, n: int) -> list[int]:
        if self.graph is None or self.profile is None:
            self.statusBar().showMessage("Profile first to know which operators are slowest", 5000)
            return []
        ranked = sorted(self.profile.nodes, key=lambda s: -s.p50_ms)
        idx: list[int] = []
        rows = 0
        for s in ranked:
            # in a file an optimization wrote, a row names the original node: select the
            # nodes standing for it
            shown = [self.graph.node(name).index
                     for name in self.table.model.shown_as([s.name])
                     if self.graph.has_node(name)]
            if shown:
                idx.extend(shown)
                rows += 1
            if rows >= n:
                break
        self.set_selection(idx)
        return idx

    def _on_graph_selection(self, indices: list[int]) -> None:
        self.table.set_selection(indices)
        self.panel.set_selection(self.selected_names())

    def _on_table_selection(self, indices: list[int]) -> None:
        self.graph_view.set_selection(indices)
        self.panel.set_selection(self.selected_names())
        if len(indices) == 1:
            self.graph_view.center_on(indices[0], zoom_in=False)

    def _on_node_activated(self, index: int) -> None:
        self.graph_view.center_on(index)
        self.table.set_selection([index])

    def _on_search(self) -> None:
        found = self.graph_view.search(self.search.text())
        self.statusBar().showMessage(f"{len(found)} match(es)" if found else "No match", 4000)

    def _focus_search(self) -> None:
        self.search.setFocus()
        self.search.selectAll()

    def _on_op_combo(self, index: int) -> None:
        op = self.op_combo.itemData(index)
        if op:
            self.select_op_type(op)
        self.op_combo.setCurrentIndex(0)

    def _node_tooltip(self, index: int) -> str:
        if self.graph is None:
            return ""
        name = self.graph.nodes[index].name
        parts = []
        s = self.table.model.profile.get(name)
        if s is not None:
            parts.append(f"p50 {s.p50_ms:.3f} ms ({s.share * 100:.1f}% of the run)")
        after = self.table.model.after.get(name)
        if after is not None and after[2] is not None:
            parts.append(f"{after[0]:.3f} ms → {after[1]:.3f} ms, {after[2]:.2f}×")
        tech = self.table.model.techniques.get(name)
        if tech:
            parts.append(f"plan: {tech}")
        return "<br>".join(parts)

    # --- plan ---------------------------------------------------------------------------------
    def _on_plan_changed(self) -> None:
        self.table.model.set_techniques(self.plan.techniques_by_node(self.graph))
        if self.model_path is not None:
            self.session.save_plan(self.model_path, self.plan.recipe().to_json())
        self._update_actions()

    # --- runs ---------------------------------------------------------------------------------
    def is_running(self) -> bool:
        return self.worker is not None and not self.worker.is_done()

    def edit_run_settings(self) -> None:
        dims = symbolic_dims(self.model) if self.model is not None else []
        dlg = RunSettingsDialog(self.run_settings, dims, self)
        if dlg.exec():
            self.set_run_settings(dlg.settings())

    def set_run_settings(self, settings: ProfileSettings) -> None:
        self.run_settings = settings
        self.session.save_run_settings(settings_to_json(settings))

    def run_profile(self) -> Worker | None:
        if self.model_path is None or self.is_running():
            return None
        return self._start(Worker(profile_with_machine, str(self.model_path), self.run_settings,
                                  name="profile"), self._on_profiled, "Profiling")

    def run_compare(self) -> Worker | None:
        if self.model is None or self.is_running():
            return None
        if not self.plan.steps:
            self.show_error("the plan is empty: select operators and add a technique first")
            return None
        return self._start(Worker(optimize_and_compare, self.model, self.plan.recipe(),
                                  self.run_settings, name="optimize & compare"),
                           self._on_compare, "Optimizing and comparing")

    def run_advise(self, budget: Budget | None = None,
                   techniques: dict[str, dict[str, Any]] | None = None) -> Worker | None:
        if self.model_path is None or self.is_running():
            return None
        budget = budget or self.advisor.budget()
        techniques = techniques if techniques is not None else self.advisor.techniques()
        self.advisor.set_running(True)
        worker = Worker(advise, str(self.model_path), self.advisor.settings_for(self.run_settings),
                        budget, techniques, name="advise")
        worker.signals.finished.connect(lambda: self.advisor.set_running(False))
        return self._start(worker, self._on_advice, "Measuring sensitivity")

    def _on_advise_action(self) -> None:
        self.advisor_dock.show()
        self.advisor_dock.raise_()
        self.run_advise()

    def _on_advice(self, advice: Any) -> None:
        if not hasattr(advice, "machine"):  # next-token advice: no roofline, no per-node scan
            self.advisor.set_advice(advice)
            self.advisor_dock.show()
            self.advisor_dock.raise_()
            return
        self.machine = advice.machine
        self.advisor.set_advice(advice)
        self.advisor_dock.show()
        self.advisor_dock.raise_()
        if self.profile is None:
            self._on_profile(advice.sensitivity.baseline)
        else:
            self._show_roofline(self.profile)
        n = len(advice.plan.chosen)
        self.statusBar().showMessage(f"Advice ready: {n} rewrite(s) within the budget", 10000)

    def _on_plan_accepted(self, recipe: Recipe) -> None:
        self.plan.replace(recipe.steps, "use the automatic plan")
        self.statusBar().showMessage("The automatic plan is now the plan (Undo restores the "
                                     "previous one)", 8000)

    def select_node_named(self, name: str) -> None:
        if self.graph is None or not self.graph.has_node(name):
            return
        index = self.graph.node(name).index
        self.set_selection([index])
        self.graph_view.center_on(index)

    def cancel_run(self) -> None:
        if self.is_running():
            assert self.worker is not None
            self.worker.cancel()
            self.statusBar().showMessage("Cancelling…")

    def _start(self, worker: Worker, on_result: Any, what: str, start: bool = True) -> Worker:
        self.banner.hide()
        self.worker = worker
        s = worker.signals
        s.progress.connect(self._on_progress)
        s.result.connect(on_result)
        s.failed.connect(lambda failure: self.show_error(failure.message, failure.details))
        s.cancelled.connect(lambda: self.statusBar().showMessage(f"{what}: cancelled", 6000))
        s.finished.connect(self._on_finished)
        self.progress.setValue(0)
        self.progress.show()
        self.statusBar().showMessage(f"{what}…")
        if start:
            worker.start()
            self._update_actions()
        return worker

    def _on_progress(self, fraction: float, message: str) -> None:
        self.progress.setValue(int(fraction * 1000))
        if message:
            self.statusBar().showMessage(message)

    def _on_finished(self) -> None:
        self.progress.hide()
        self._update_actions()

    def _on_profiled(self, value: tuple[Any, Any]) -> None:
        profile, self.machine = value
        self._on_profile(profile)

    def _show_roofline(self, profile: Any) -> None:
        """Operators on this machine's roofline, once its ceilings are known (a profile from
        the toolbar measures them; otherwise they come from the cache or the advisor)."""
        machine = cached_machine(self.run_settings.threads) or self.machine
        if machine is None or self.graph is None:
            return
        points = profile_roofline(self.graph, profile, machine, self.table.model.derived)
        self.plots.show_roofline(points, machine)
        self.table.model.set_roofline(points)

    def _on_profile(self, profile: Any) -> None:
        self.profile = profile
        self.comparison = None
        self.table.model.set_profile(profile)
        self.table.model.set_comparison(None)
        self.plots.show_profile(profile)
        self._show_roofline(profile)
        self._show_heat(profile)
        total = profile.total_ms.get("p50") or profile.total_ms.get("mean", 0.0)
        message = f"Profiled: {total:.3f} ms per run (p50)"
        if profile.notes:
            message += " — " + profile.notes[0]
        self.statusBar().showMessage(message, 8000 if not profile.notes else 30000)

    def _on_compare(self, value: tuple[Any, Any]) -> None:
        self.optimized, self.comparison = value
        self.profile = self.comparison.before
        self.table.model.set_profile(self.comparison.before)
        self.table.model.set_comparison(self.comparison)
        self.plots.show_comparison(self.comparison)
        self._show_roofline(self.comparison.before)
        self._show_heat(self.comparison.before)
        s, plain = self.comparison.speedup, self.comparison.plain_speedup
        message = f"Optimized: {s:.2f}× overall (profiled)" if s else "Optimized"
        if plain:
            message += f", {plain:.2f}× without the profiler"
        self.statusBar().showMessage(message, 10000)

    def _show_heat(self, profile: Any) -> None:
        if self.graph is None:
            return
        share = np.full(len(self.graph.nodes), np.nan)
        for s in profile.nodes:
            for name in self.table.model.shown_as([s.name, *(getattr(s, "group", None) or [])]):
                if self.graph.has_node(name):
                    share[self.graph.node(name).index] = s.share
        self.graph_view.set_heat(share)
        if np.isfinite(share).any():
            self.graph_view.center_on(int(np.nanargmax(share)), zoom_in=False)

    def about_text(self) -> str:
        import onnxruntime
        from PySide6 import __version__ as pyside_version

        from opstudio import __version__

        return (f"<h3>opstudio {__version__}</h3>"
                "<p>Operator-level profiling and optimization of ONNX models: low-rank "
                "factorization, pruning and quantization, measured per operator.</p>"
                f"<p>onnx {onnx.__version__} · onnxruntime {onnxruntime.__version__} · "
                f"PySide6 {pyside_version}</p>")

    def show_about(self) -> None:
        from PySide6.QtWidgets import QMessageBox

        QMessageBox.about(self, "About opstudio", self.about_text())

    def show_error(self, message: str, details: str = "") -> None:
        self.banner.show_message(message, details)
        self.statusBar().showMessage(message.splitlines()[0] if message else "", 10000)

    def _update_actions(self) -> None:
        running = self.is_running()
        has_model = self.model is not None
        self.profile_action.setEnabled(has_model and not running)
        self.compare_action.setEnabled(has_model and not running and bool(self.plan.steps))
        self.advise_action.setEnabled(has_model and not running)
        self.advisor.analyze_button.setEnabled(has_model and not running)
        self.cancel_action.setEnabled(running)
        self.save_model_action.setEnabled(self.optimized is not None)
        self.export_action.setEnabled(self.comparison is not None)
        self.netron_action.setEnabled(has_model)
        self.netron_opt_action.setEnabled(self.optimized is not None)
        self.slowest_button.setEnabled(self.profile is not None)

    # --- export -------------------------------------------------------------------------------
    def save_optimized(self, path: str | Path, overwrite: bool = False) -> Path:
        if self.optimized is None:
            raise OpstudioError("nothing to save: run Optimize & compare first")
        if self.model_path is not None and Path(path).resolve() == self.model_path:
            raise OpstudioError(f"{path}: is the original model; choose another file")
        return save_model(self.optimized.model, path, overwrite=overwrite)

    def save_optimized_dialog(self) -> None:
        if self.optimized is None or self.model_path is None:
            return
        suggested = str(self.model_path.with_name(self.model_path.stem + ".optimized.onnx"))
        path, _ = QFileDialog.getSaveFileName(self, "Save optimized model", suggested,
                                              "ONNX model (*.onnx)")
        if not path:
            return
        try:
            # the dialog already asked before replacing an existing file
            self.save_optimized(path, overwrite=True)
            self.statusBar().showMessage(f"Saved {path}", 6000)
        except OpstudioError as exc:
            self.show_error(str(exc))

    def export_report(self, path: str | Path) -> Path:
        """HTML, JSON or CSV by the file's extension."""
        from opstudio.core import report

        if self.comparison is None:
            raise OpstudioError("nothing to export: run Optimize & compare first")
        p = Path(path)
        steps = self.optimized.steps if self.optimized is not None else ()
        suffix = p.suffix.lower()
        if suffix == ".json":
            return report.write_json(self.comparison, p, steps)
        if suffix == ".csv":
            return report.write_csv(self.comparison, p)
        title = self.model_path.name if self.model_path else ""
        return report.write_html(self.comparison, p, steps, title=title)

    def export_report_dialog(self) -> None:
        if self.comparison is None or self.model_path is None:
            return
        suggested = str(self.model_path.with_name(self.model_path.stem + ".report.html"))
        path, _ = QFileDialog.getSaveFileName(
            self, "Export report", suggested, "HTML report (*.html);;JSON (*.json);;CSV (*.csv)")
        if path:
            try:
                self.export_report(path)
                self.statusBar().showMessage(f"Wrote {path}", 6000)
            except OpstudioError as exc:
                self.show_error(str(exc))

    # --- netron -------------------------------------------------------------------------------
    def open_netron(self, path: str | Path, title: str = "") -> NetronWindow:
        w = NetronWindow(path, title)
        w.closed.connect(lambda win: self.netron_windows.remove(win)
                         if win in self.netron_windows else None)
        self.netron_windows.append(w)
        w.show()
        return w

    def open_netron_original(self) -> None:
        if self.model_path is not None:
            self.open_netron(self.model_path)

    def open_netron_optimized(self) -> None:
        if self.optimized is None or self.model_path is None:
            return
        target = self._tmpdir / (self.model_path.stem + ".optimized.onnx")
        save_model(self.optimized.model, target, overwrite=True)
        self.open_netron(target, f"{self.model_path.stem} (optimized)")

    # --- shutdown -----------------------------------------------------------------------------
    def closeEvent(self, event: QCloseEvent) -> None:
        if self.worker is not None and not self.worker.is_done():
            self.worker.cancel()
            # cancelling stops the child within a second; let the worker see it through
            QThreadPool.globalInstance().waitForDone(3000)
        for w in list(self.netron_windows):
            w.close()
        self.session.save_window(self.saveGeometry(), self.saveState())
        self.session.sync()
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        super().closeEvent(event)
