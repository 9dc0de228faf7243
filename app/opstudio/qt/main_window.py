"""The main window: docks, and the wiring between the document, its views and the runs.

The state lives in ``core.document.Document`` (Qt-free): the window starts the core calls in
workers, hands their results to the document, and the views follow the document's events."""

from __future__ import annotations

from pathlib import Path

import onnx
from PySide6.QtCore import QSettings, Qt, QThreadPool, QTimer
from PySide6.QtGui import QCloseEvent, QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import (
    QDockWidget,
    QFileDialog,
    QFrame,
    QMainWindow,
    QScrollArea,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from opstudio.core.errors import OpstudioError
from opstudio.core.measure.compare import Comparison
from opstudio.core.measure.generate import SideBySide, side_by_side_isolated
from opstudio.core.measure.profiler import Profile, ProfileSettings
from opstudio.core.measure.roofline import profile_with_machine
from opstudio.core.model.graph import GraphInfo, input_specs, symbolic_dims
from opstudio.core.model.phases import kv_layout
from opstudio.core.model.provenance import derived_nodes
from opstudio.core.passes import ScanParams
from opstudio.core.plan.advisor import Advice, Budget, advise
from opstudio.core.plan.optimize import OptimizeResult
from opstudio.core.plan.optimize_compare import optimize_and_compare
from opstudio.core.plan.recipe import Recipe, Step
from opstudio.core.session.document import AnyAdvice, Document
from opstudio.core.session.edits import Plan
from opstudio.core.session.opening import Opened, open_for_display
from opstudio.qt.advisor_panel import AdvisorPanel
from opstudio.qt.banner import ErrorBanner
from opstudio.qt.exports import Exports
from opstudio.qt.graph_toolbar import GraphToolbar
from opstudio.qt.graph_view import GraphView
from opstudio.qt.node_panel import NodePanel
from opstudio.qt.op_table import OpTable
from opstudio.qt.plots import PlotsPanel
from opstudio.qt.results_view import ResultsView
from opstudio.qt.run_settings import RunSettingsDialog, settings_from_json, settings_to_json
from opstudio.qt.runs import RunController
from opstudio.qt.session import Session
from opstudio.qt.try_it import TryItPanel
from opstudio.qt.welcome import WelcomePage
from opstudio.qt.window_actions import WindowActions, about_text
from opstudio.qt.worker import Worker


class MainWindow(QMainWindow):
    def __init__(self, settings: QSettings | None = None) -> None:
        super().__init__()
        self.session = Session(settings)
        self.doc = Document(settings_from_json(self.session.run_settings()))
        self.doc.opened.connect(self._on_opened)
        self.doc.advised.connect(self._on_advised)
        self.doc.plan.changed.connect(self._on_plan_changed)

        self.graph_view = GraphView()
        self.graph_bar = GraphToolbar(self.graph_view)
        self.op_combo, self.slowest_button = self.graph_bar.op_combo, self.graph_bar.slowest_button
        self.table = OpTable()
        self.panel = NodePanel(self.doc.plan)
        self.plots = PlotsPanel()
        self.advisor = AdvisorPanel()
        self.try_it = TryItPanel()
        self.welcome = WelcomePage()
        self.banner = ErrorBanner()
        self.banner_text = self.banner.text
        self.results = ResultsView(self.doc, self.table, self.plots, self.graph_view,
                                   self.statusBar)
        self.exports = Exports(self.doc, self, self.statusBar, self.show_error)
        self.runs = RunController(self.statusBar(), self.show_error, self.banner.hide,
                                  self._update_actions)
        self.progress = self.runs.progress
        self.save_optimized = self.doc.save_optimized
        self.export_report = self.doc.export_report

        self._layout()
        a = self.window_actions = WindowActions(self, self, self.doc.plan)
        self.profile_action, self.compare_action, self.cancel_action = a.profile, a.compare, a.cancel
        self._connect()
        self._refresh_recent()
        self._update_actions()
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

    # --- the document's state, as the window's (scripts and tests read these) ------------------
    @property
    def model_path(self) -> Path | None:
        return self.doc.model_path

    @property
    def model(self) -> onnx.ModelProto | None:
        return self.doc.model

    @property
    def graph(self) -> GraphInfo | None:
        return self.doc.graph

    @property
    def plan(self) -> Plan:
        return self.doc.plan

    @property
    def profile(self) -> Profile | None:
        return self.doc.profile

    @property
    def comparison(self) -> Comparison | None:
        return self.doc.comparison

    @property
    def optimized(self) -> OptimizeResult | None:
        return self.doc.optimized

    @property
    def run_settings(self) -> ProfileSettings:
        return self.doc.settings

    @property
    def worker(self) -> Worker | None:
        return self.runs.worker

    # --- construction -------------------------------------------------------------------------
    def _layout(self) -> None:
        graph_page = QWidget()
        gl = QVBoxLayout(graph_page)
        gl.setContentsMargins(0, 0, 0, 0)
        gl.setSpacing(0)
        gl.addWidget(self.graph_bar)
        gl.addWidget(self.graph_view, 1)
        self.stack = QStackedWidget()
        # the welcome page must not set the window's minimum size: it scrolls
        self.stack.addWidget(_scroll(self.welcome))
        self.stack.addWidget(graph_page)
        central = QWidget()
        cl = QVBoxLayout(central)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.setSpacing(0)
        cl.addWidget(self.banner)
        cl.addWidget(self.stack, 1)
        self.setCentralWidget(central)

        bottom, right = Qt.DockWidgetArea.BottomDockWidgetArea, Qt.DockWidgetArea.RightDockWidgetArea
        self.table_dock = self._dock("Operators", self.table, bottom)
        self.plots_dock = self._dock("Results", self.plots, bottom)
        self.splitDockWidget(self.table_dock, self.plots_dock, Qt.Orientation.Horizontal)
        scroll = _scroll(self.panel)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setCorner(Qt.Corner.BottomRightCorner, right)
        self.setCorner(Qt.Corner.TopRightCorner, right)
        self.panel_dock = self._dock("Optimize", scroll, right)
        self.resizeDocks([self.panel_dock], [360], Qt.Orientation.Horizontal)
        self.resizeDocks([self.table_dock, self.plots_dock], [440, 440], Qt.Orientation.Vertical)
        self.resizeDocks([self.table_dock, self.plots_dock], [470, 770], Qt.Orientation.Horizontal)
        # added last, as a tab behind the results, so it does not take a share of the width
        self.advisor_dock = self._dock("Advisor", self.advisor, bottom)
        self.tabifyDockWidget(self.plots_dock, self.advisor_dock)
        self.try_it_dock = self._dock("Try it", self.try_it, bottom)
        self.tabifyDockWidget(self.plots_dock, self.try_it_dock)
        self.plots_dock.raise_()

    def _connect(self) -> None:
        self.advisor.analyzeRequested.connect(self.run_advise)
        self.advisor.set_scan_cluster(self.session.scan_cluster())
        self.advisor.clusterChanged.connect(self.session.save_scan_cluster)
        self.advisor.nodeClicked.connect(self.select_node_named)
        self.advisor.planAccepted.connect(self._on_plan_accepted)
        self.try_it.generate_requested.connect(self.run_generate)
        self.plots.roofline.nodeClicked.connect(self.select_node_named)
        self.welcome.openRequested.connect(self.open_dialog)
        self.welcome.fileChosen.connect(self.open_model)
        self.graph_bar.searchRequested.connect(self._on_search)
        self.graph_bar.opTypeChosen.connect(self.select_op_type)
        self.graph_bar.slowestRequested.connect(self.select_slowest)
        self.graph_view.selectionChanged.connect(self._on_graph_selection)
        self.graph_view.nodeActivated.connect(self._on_node_activated)
        self.graph_view.share_once = self.table.share_once
        self.table.selectionChanged.connect(self._on_table_selection)
        self.table.nodeActivated.connect(lambda i: self.graph_view.center_on(i))
        self.table.layersShown.connect(self.graph_view.show_layers)

    def _default_dock_sizes(self) -> None:
        self.resizeDocks([self.table_dock, self.plots_dock], [560, 740],
                         Qt.Orientation.Horizontal)

    def _dock(self, title: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"dock_{title.lower()}")
        dock.setWidget(widget)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                         | QDockWidget.DockWidgetFeature.DockWidgetFloatable
                         | QDockWidget.DockWidgetFeature.DockWidgetClosable)
        self.addDockWidget(area, dock)
        return dock

    def docks(self) -> tuple[QDockWidget, ...]:
        return (self.table_dock, self.plots_dock, self.advisor_dock, self.try_it_dock,
                self.panel_dock)

    # --- opening ------------------------------------------------------------------------------
    def open_dialog(self) -> None:
        start = str(self.model_path.parent) if self.model_path else ""
        path, _ = QFileDialog.getOpenFileName(self, "Open model", start, "ONNX model (*.onnx)")
        if path:
            self.open_model(path)

    def open_model(self, path: str | Path) -> bool:
        """Load, analyse and show ``path``; errors are shown and the current model stays.

        The loading runs in the worker (a 10k-node model takes seconds) while the window keeps
        painting and Cancel working; callers still get the outcome."""
        if self.is_running():
            self.show_error("wait for the current run to finish (or cancel it) first")
            return False
        p = Path(path)
        s = self.run_settings
        worker = Worker(open_for_display, str(p), dict(s.dims), phase=s.phase, past=s.past,
                        name="open")
        opened = self.runs.run_modal(worker, f"Opening {p.name}")
        if not isinstance(opened, Opened):
            return False  # the error (or the cancel) is already on screen
        self.doc.open(opened, self._saved_plan(opened.path))
        self.statusBar().showMessage(f"Opened {p}", 5000)
        self._update_actions()
        return True

    def _on_opened(self, opened: Opened) -> None:
        graph, model = opened.graph, opened.model
        self.graph_view.set_graph(graph, opened.layout)
        self.table.set_graph(graph, derived_nodes(model))
        self.panel.set_model(model, graph)
        self.plots.clear()
        self.try_it.clear()
        self.graph_bar.set_graph(graph)
        self.setWindowTitle(f"{opened.path.name} — opstudio")
        self.session.set_last_model(opened.path)
        self.session.add_recent(opened.path)
        self._refresh_recent()
        self.banner.hide()
        if self.stack.currentIndex() == 0:
            for dock in self.docks():
                dock.show()
        self.stack.setCurrentIndex(1)
        QTimer.singleShot(0, self.graph_view.fit)

    def _saved_plan(self, model_path: Path) -> list[Step]:
        data = self.session.plan_json(model_path)
        if not data or not data.get("steps"):
            return []
        try:
            return Recipe.from_json(data).steps
        except OpstudioError:
            return []

    def _show_welcome(self) -> None:
        self.welcome.set_recent(self.session.recent_files())
        self.stack.setCurrentIndex(0)
        self.setWindowTitle("opstudio")
        for dock in self.docks():
            dock.hide()  # nothing to show yet; the page gets the whole window

    def _refresh_recent(self) -> None:
        recent = self.session.recent_files()
        self.window_actions.set_recent(recent)
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
        graph = self.graph
        if graph is None or self.profile is None:
            self.statusBar().showMessage("Profile first to know which operators are slowest", 5000)
            return []
        idx: list[int] = []
        rows = 0
        for s in self.doc.slowest():
            # in a file an optimization wrote, a row names the original node: select the
            # nodes standing for it
            shown = [graph.node(name).index for name in self.table.model.shown_as([s.name])
                     if graph.has_node(name)]
            if shown:
                idx.extend(shown)
                rows += 1
            if rows >= n:
                break
        self.set_selection(idx)
        return idx

    def select_node_named(self, name: str) -> None:
        if self.graph is None or not self.graph.has_node(name):
            return
        index = self.graph.node(name).index
        self.set_selection([index])
        self.graph_view.center_on(index)

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

    def _on_search(self, text: str) -> None:
        found = self.graph_view.search(text)
        self.statusBar().showMessage(f"{len(found)} match(es)" if found else "No match", 4000)

    # --- plan ---------------------------------------------------------------------------------
    def _on_plan_changed(self) -> None:
        self.table.model.set_techniques(self.plan.techniques_by_node(self.graph))
        if self.model_path is not None:
            self.session.save_plan(self.model_path, self.plan.recipe().to_json())
        self._update_actions()

    def _on_plan_accepted(self, recipe: Recipe) -> None:
        self.plan.replace(recipe.steps, "use the automatic plan")
        self.statusBar().showMessage("The automatic plan is now the plan (Undo restores the "
                                     "previous one)", 8000)

    # --- runs ---------------------------------------------------------------------------------
    def is_running(self) -> bool:
        return self.runs.is_running()

    def edit_run_settings(self) -> None:
        dims = symbolic_dims(self.model) if self.model is not None else []
        specs = input_specs(self.model) if self.model is not None else []
        reads_tokens = self.model is not None and kv_layout(self.model).ids_input is not None
        dlg = RunSettingsDialog(self.run_settings, dims, self, inputs=specs,
                                model_path=self.model_path, reads_tokens=reads_tokens)
        if dlg.exec():
            self.set_run_settings(dlg.settings())

    def set_run_settings(self, settings: ProfileSettings) -> None:
        self.doc.settings = settings
        self.session.save_run_settings(settings_to_json(settings))

    def run_profile(self) -> Worker | None:
        if self.model_path is None or self.is_running():
            return None
        return self.runs.start(Worker(profile_with_machine, str(self.model_path),
                                      self.run_settings, name="profile"),
                               lambda value: self.doc.set_profile(*value), "Profiling")

    def run_compare(self) -> Worker | None:
        if self.model is None or self.is_running():
            return None
        if not self.plan.steps:
            self.show_error("the plan is empty: select operators and add a technique first")
            return None
        return self.runs.start(Worker(optimize_and_compare, self.model, self.plan.recipe(),
                                      self.run_settings, model_path=self.model_path,
                                      name="optimize & compare"),
                               lambda value: self.doc.set_comparison(*value),
                               "Optimizing and comparing")

    def run_advise(self, budget: Budget | None = None,
                   techniques: dict[str, ScanParams] | None = None) -> Worker | None:
        if self.model_path is None or self.is_running():
            return None
        budget = budget or self.advisor.budget()
        techniques = techniques if techniques is not None else self.advisor.techniques()
        self.advisor.set_running(True)
        worker = Worker(advise, str(self.model_path), self.advisor.settings_for(self.run_settings),
                        budget, techniques, cluster=self.advisor.scan_cluster(), name="advise")
        worker.signals.finished.connect(lambda: self.advisor.set_running(False))
        return self.runs.start(worker, self.doc.set_advice, "Measuring sensitivity")

    def run_generate(self) -> Worker | None:
        """Greedy text of the original model and, once optimized, of the result beside it."""
        if self.model_path is None or self.is_running():
            return None
        prompt, max_tokens, chat, tokenizer = self.try_it.request()
        models: list[str | onnx.ModelProto] = [str(self.model_path)]
        labels = ["original"]
        if self.optimized is not None:
            models.append(self.optimized.model)
            labels.append("optimized")
        self.try_it.set_running(True)
        worker = Worker(side_by_side_isolated, models, prompt, model_path=str(self.model_path),
                        labels=labels, tokenizer=tokenizer, chat=chat, max_tokens=max_tokens,
                        name="generate")
        worker.signals.finished.connect(lambda: self.try_it.set_running(False))
        self.try_it_dock.show()
        self.try_it_dock.raise_()
        return self.runs.start(worker, self._on_generated, "Generating text")

    def _on_generated(self, result: SideBySide) -> None:
        self.try_it.show_result(result)
        self.statusBar().showMessage(self.try_it.summary.text(), 10000)

    def advise_from_menu(self) -> None:
        self.advisor_dock.show()
        self.advisor_dock.raise_()
        self.run_advise()

    def _on_advised(self, advice: AnyAdvice) -> None:
        self.advisor.set_advice(advice)
        self.advisor_dock.show()
        self.advisor_dock.raise_()
        if not isinstance(advice, Advice):  # next-token advice: no roofline, no per-node scan
            return
        if self.profile is not None:  # with the advice's ceilings, the roofline can show
            self.results.show_roofline(self.profile)
        n = len(advice.plan.chosen)
        self.statusBar().showMessage(f"Advice ready: {n} rewrite(s) within the budget", 10000)

    def cancel_run(self) -> None:
        self.runs.cancel()

    def about_text(self) -> str:
        return about_text()

    def show_error(self, message: str, details: str = "") -> None:
        self.banner.show_message(message, details)
        self.statusBar().showMessage(message.splitlines()[0] if message else "", 10000)

    def _update_actions(self) -> None:
        self.window_actions.update(self.doc, self.is_running(), (self.advisor.analyze_button,))
        self.slowest_button.setEnabled(self.profile is not None)

    # --- shutdown -----------------------------------------------------------------------------
    def closeEvent(self, event: QCloseEvent) -> None:
        if self.worker is not None and not self.worker.is_done():
            self.worker.cancel()
            # cancelling stops the child within a second; let the worker see it through
            QThreadPool.globalInstance().waitForDone(3000)
        self.exports.close()
        self.session.save_window(self.saveGeometry(), self.saveState())
        self.session.sync()
        super().closeEvent(event)


def _scroll(widget: QWidget) -> QScrollArea:
    scroll = QScrollArea()
    scroll.setWidget(widget)
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    return scroll
