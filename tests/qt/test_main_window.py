"""The real main window, offscreen, through the whole path: open → select → plan → profile →
optimize & compare → plots and table → export → re-open; cancel and errors keep the app usable."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent

from opstudio.core.errors import OpstudioError
from opstudio.core.model.model_io import load_model
from opstudio.core.plan.recipe import Step
from opstudio.qt.main_window import MainWindow
from opstudio.qt.op_table import (
    COL_AFTER,
    COL_BOUND,
    COL_GFLOPS,
    COL_INTENSITY,
    COL_P50,
    COL_SPEEDUP,
    COL_TECH,
)


def click_node(qtbot, window, name):
    view = window.graph_view
    index = window.graph.node(name).index
    view.center_on(index)
    qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton,
                     Qt.KeyboardModifier.ControlModifier if window.selected_names() else
                     Qt.KeyboardModifier.NoModifier, pos=view.view_pos_of(index))


def wait_run(qtbot, window, worker, timeout=60000):
    """Until the worker is done and the window has handled its last signal.

    (Waiting on ``finished`` itself could miss a run that ends before the wait starts.)"""
    qtbot.waitUntil(lambda: worker.is_done() and window.progress.isHidden(), timeout=timeout)


def run_and_wait(qtbot, window, start, timeout=60000):
    worker = start()
    assert worker is not None
    wait_run(qtbot, window, worker, timeout)
    assert not window.banner.isVisible(), window.banner_text.text()
    return worker


def ort_output(path, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_whole_path(window, qtbot, mlp_path, tmp_path):
    assert window.stack.currentIndex() == 0  # welcome page first
    assert window.open_model(mlp_path)
    assert window.windowTitle() == "mlp.onnx — opstudio"
    assert window.table.model.rowCount() == 6

    # select by clicking in the graph, then Ctrl-click a second node
    click_node(qtbot, window, "mm0")
    assert window.selected_names() == ["mm0"]
    assert window.table.selected() == [window.graph.node("mm0").index]
    click_node(qtbot, window, "mm1")
    assert window.selected_names() == ["mm0", "mm1"]
    # select by op type from the toolbar
    window.select_op_type("Relu")
    assert window.selected_names() == ["relu0"]
    assert not window.panel.radio["int8-dynamic"].isEnabled()
    combo = window.op_combo
    combo.activated.emit(combo.findData("MatMul"))
    assert window.selected_names() == ["mm0", "mm1"]
    assert window.panel.selection == ["mm0", "mm1"]

    # a technique for the selection
    radio = window.panel.radio["int8-dynamic"]
    qtbot.mouseClick(radio, Qt.MouseButton.LeftButton, pos=QPoint(8, radio.height() // 2))
    assert window.panel.current_technique() == "int8-dynamic"
    qtbot.mouseClick(window.panel.apply_button, Qt.MouseButton.LeftButton)
    assert [(s.technique, s.nodes) for s in window.plan.steps] == [("int8-dynamic",
                                                                     ["mm0", "mm1"])]
    tm = window.table.model
    assert tm.data(tm.index(window.graph.node("mm1").index, COL_TECH)) == "int8-dynamic"

    # baseline profile in the worker
    run_and_wait(qtbot, window, window.run_profile)
    profile = window.profile
    assert profile is not None and window.plots.ops.data["after"] is None
    means = sorted(((s.p50_ms, s.name) for s in profile.nodes), reverse=True)
    assert window.plots.ops.data["before"] == [m for m, _ in means][: window.plots.top_n]
    mm0 = profile.node("mm0") or next(s for s in profile.nodes if "mm0" in s.group)
    assert tm.value(window.graph.node("mm0").index, COL_P50) == mm0.p50_ms
    assert window.graph_view.legend.visible
    # the profile also placed the operators on this machine's roofline
    roof = window.plots.roofline.data
    assert roof["machine"] is not None and roof["machine"].peak_gflops > 0
    point = next(p for p in roof["points"] if p.name == mm0.name)
    i0 = window.graph.node("mm0").index
    assert tm.value(i0, COL_INTENSITY) == pytest.approx(point.intensity)
    assert tm.value(i0, COL_GFLOPS) == pytest.approx(point.achieved_gflops)
    assert tm.value(i0, COL_BOUND) in ("memory", "compute")
    spot = window.plots.roofline.scatter.points()[0]
    window.plots.roofline.scatter.sigClicked.emit(window.plots.roofline.scatter, [spot], None)
    assert window.selected_names() == [spot.data()]

    # optimize & compare in the worker
    run_and_wait(qtbot, window, window.run_compare)
    comp = window.comparison
    assert comp is not None
    rows = comp.nodes[: window.plots.top_n]
    assert window.plots.ops.data["labels"] == [r.name for r in rows]
    assert window.plots.ops.data["before"] == [r.before_ms for r in rows]
    assert window.plots.ops.data["after"] == [r.after_ms for r in rows]
    assert window.plots.total.data["speedup"] == [comp.speedup]
    assert [r["name"] for r in window.plots.accuracy.rows] == ["y"]
    assert window.plots.accuracy.rows[0]["cosine"] > 0.99
    row_mm0 = comp.node("mm0")
    i = window.graph.node("mm0").index
    assert tm.value(i, COL_AFTER) == row_mm0.after_ms
    assert tm.value(i, COL_SPEEDUP) == pytest.approx(row_mm0.speedup)
    assert window.plan.steps  # the plan is still there

    # export: model (never over an existing file unless asked), report, recipe
    out = tmp_path / "mlp.int8.onnx"
    window.save_optimized(out)
    with pytest.raises(OpstudioError, match="already exists"):
        window.save_optimized(out)
    with pytest.raises(OpstudioError, match="original model"):
        window.save_optimized(mlp_path, overwrite=True)
    exported = load_model(out)
    assert "MatMulInteger" in {n.op_type for n in exported.graph.node}
    x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    np.testing.assert_allclose(ort_output(out, x), ort_output(mlp_path, x), atol=0.02)
    html = window.export_report(tmp_path / "report.html")
    assert "<svg" in html.read_text()
    data = json.loads(window.export_report(tmp_path / "report.json").read_text())
    assert data["speedup"] == pytest.approx(comp.speedup, rel=1e-3)
    assert window.export_report(tmp_path / "report.csv").read_text().startswith("name,op_type")
    window.panel.save_recipe(tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["steps"][0]["nodes"] == ["mm0", "mm1"]

    # re-open the exported model
    assert window.open_model(out)
    assert window.windowTitle() == "mlp.int8.onnx — opstudio"
    assert "MatMulInteger" in {n.op_type for n in window.graph.nodes}
    assert window.profile is None and window.comparison is None


def test_cancel_mid_run_keeps_everything(window, qtbot, mlp_path):
    window.open_model(mlp_path)
    window.select_op_type("MatMul")
    window.panel.select_technique("int8-dynamic")
    window.panel.apply_to_selected()
    # endless runs, but bounded in time so nothing is left behind even if this test dies
    window.set_run_settings(dataclasses.replace(window.run_settings, runs=10_000_000,
                                                time_budget_s=30.0, warmup=0,
                                                measure_plain=False))
    worker = window.run_profile()
    assert worker is not None and window.cancel_action.isEnabled()
    seen = []
    worker.signals.progress.connect(lambda f, m: seen.append(f))
    qtbot.waitUntil(lambda: any(f >= 0.1 for f in seen), timeout=30000)  # timed runs started
    cancelled = []
    worker.signals.cancelled.connect(lambda: cancelled.append(time.perf_counter()))
    t = time.perf_counter()
    window.cancel_action.trigger()
    wait_run(qtbot, window, worker, timeout=5000)
    assert cancelled and cancelled[0] - t < 2.0
    assert "cancelled" in window.statusBar().currentMessage()
    assert not window.is_running() and window.profile is None
    assert window.selected_names() == ["mm0", "mm1"]
    assert [s.technique for s in window.plan.steps] == ["int8-dynamic"]
    assert window.profile_action.isEnabled() and window.compare_action.isEnabled()
    assert not window.banner.isVisible()


def test_errors_are_shown_and_the_app_stays_usable(window, qtbot, mlp_path, tmp_path):
    window.open_model(mlp_path)
    window.select_op_type("MatMul")
    window.plan.add(Step("int8-dynamic", {"per_channel": "yes"}, nodes=["mm0"]))
    wait_run(qtbot, window, window.run_compare(), timeout=30000)
    assert window.banner.isVisible()
    assert "per_channel" in window.banner_text.text()
    assert window.comparison is None and len(window.plan.steps) == 1
    assert window.selected_names() == ["mm0", "mm1"]
    # a bad inputs file fails the profile in words too
    window.set_run_settings(dataclasses.replace(window.run_settings,
                                                inputs_path=str(tmp_path / "missing.npz")))
    wait_run(qtbot, window, window.run_profile(), timeout=30000)
    assert "missing.npz" in window.banner_text.text()
    # a file that is not a model leaves the current one open
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert not window.open_model(bad)
    assert "bad.onnx" in window.banner_text.text()
    assert window.windowTitle() == "mlp.onnx — opstudio" and window.graph is not None
    assert window.profile_action.isEnabled()


def test_session_is_restored(app, qtbot, settings, mlp_path):
    first = MainWindow(settings)
    qtbot.addWidget(first)
    first.open_model(mlp_path)
    first.select_op_type("MatMul")
    first.panel.select_technique("int8-dynamic")
    first.panel.apply_to_selected()
    first.set_run_settings(dataclasses.replace(first.run_settings, runs=7))
    first.advisor.cluster.setCurrentText("ray://head.example:10001")
    # no close(): the plan must survive a crash, so it is saved on every edit
    second = MainWindow(settings)
    qtbot.addWidget(second)
    assert second.run_settings.runs == 7
    assert second.advisor.cluster.currentText() == "ray://head.example:10001"
    assert str(mlp_path.resolve()) in second.session.recent_files()
    assert second.session.last_model() == str(mlp_path.resolve())
    second.open_model(mlp_path)
    assert [(s.technique, s.nodes) for s in second.plan.steps] == [("int8-dynamic",
                                                                     ["mm0", "mm1"])]
    assert not second.plan.can_undo()


def test_drop_a_model_file(window, qtbot, mlp_path):
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(mlp_path))])
    event = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime,
                       Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    window.dropEvent(event)
    assert window.windowTitle() == "mlp.onnx — opstudio"


def test_cli_opens_renders_and_quits(mlp_path, tmp_path):
    # a real process: the entry point, QApplication set-up, a render and a clean exit
    from PySide6.QtGui import QImage

    shot = tmp_path / "shot.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_CONFIG_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "opstudio", "gui", str(mlp_path), "--size", "1200x800",
         "--screenshot", str(shot), "--quit-after", "1"],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    img = QImage(str(shot))
    assert (img.width(), img.height()) == (1200, 800)
    assert str(mlp_path.resolve()) in (tmp_path / "opstudio" / "opstudio.conf").read_text()


def test_demo_models_are_found():
    from opstudio.resources import available_demos, demo_model_path

    path = demo_model_path("tiny_llm")
    assert path.name == "tiny_llm.onnx" and path.is_file()
    assert demo_model_path("article_cnn.onnx").is_file()
    assert {key for key, _, _ in available_demos()} == {"tiny_llm", "article_cnn"}
    with pytest.raises(OpstudioError, match="unknown demo model"):
        demo_model_path("resnet")


def test_welcome_page_opens_a_demo_in_one_click(window, qtbot):
    assert window.stack.currentIndex() == 0
    qtbot.mouseClick(window.welcome.demo_buttons["article_cnn"], Qt.MouseButton.LeftButton)
    assert window.windowTitle() == "article_cnn.onnx — opstudio"
    assert window.stack.currentIndex() == 1 and len(window.graph.nodes) == 12


def test_advisor_in_the_window(window, qtbot, mlp_path, tmp_path, monkeypatch):
    """Advise from the window: results land in the advisor dock, a click selects the node,
    "Use this plan" becomes the plan and Undo brings the old one back."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert window.open_model(mlp_path)
    window.advisor.kind.setCurrentIndex(1)
    window.advisor.value.setValue(20.0)
    for name, box in window.advisor.checks.items():
        box.setChecked(name in ("int8-dynamic", "fp16"))
    with qtbot.waitSignal(window.advisor.analyzeRequested):
        window.advisor.analyze_button.click()
    worker = window.worker
    with qtbot.waitSignal(worker.signals.finished, timeout=120_000):
        pass
    advice = window.advisor.advice
    assert advice is not None and advice.plan.budget.min_snr_db == 20.0
    assert window.advisor.table.rowCount() == len(advice.sensitivity.candidates)
    assert window.profile is not None  # the scan's baseline doubles as the profile
    node = advice.sensitivity.candidates[0].node
    window.advisor.nodeClicked.emit(node)
    assert window.selected_names() == [node]
    before = window.plan.recipe().to_json()
    if advice.plan.recipe.steps:
        window.advisor.accept_button.click()
        assert window.plan.recipe().to_json() == advice.plan.recipe.to_json()
        window.plan.undo()
        assert window.plan.recipe().to_json() == before


def test_about_names_the_version(window):
    from opstudio import __version__

    assert f"opstudio {__version__}" in window.about_text()
    assert any(a.text() == "About opstudio" for m in window.menuBar().actions()
               for a in (m.menu().actions() if m.menu() else []))


def chain_model(path, n):
    """n Relu/Add nodes in a chain: big enough that opening takes a while."""
    from onnx import TensorProto, helper

    nodes, prev = [], "x"
    for i in range(n):
        op = "Relu" if i % 2 else "Neg"
        nodes.append(helper.make_node(op, [prev], [f"t{i}"], name=f"n{i}"))
        prev = f"t{i}"
    g = helper.make_graph(nodes, "chain",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 8])])
    import onnx

    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_opening_runs_off_the_ui_thread_and_can_be_cancelled(window, qtbot, mlp_path, tmp_path,
                                                             monkeypatch):
    import time

    from PySide6.QtCore import QTimer

    from opstudio.qt import main_window

    opening = main_window.open_for_display

    def slow_open(*args, **kwargs):
        # a load that takes a while whatever the machine: the window must tick meanwhile
        time.sleep(0.3)
        return opening(*args, **kwargs)

    monkeypatch.setattr(main_window, "open_for_display", slow_open)
    big = chain_model(tmp_path / "chain.onnx", 3000)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(window.is_running()))
    timer.start(5)
    assert window.open_model(big)
    timer.stop()
    assert len(window.graph.nodes) == 3000
    assert any(ticks), "the event loop did not run while the model was loading"

    # Cancel while opening: the model that was open stays open
    assert window.open_model(mlp_path)
    QTimer.singleShot(0, window.cancel_run)
    assert not window.open_model(big)
    assert window.model_path == mlp_path.resolve() and len(window.graph.nodes) == 6
    assert "cancelled" in window.statusBar().currentMessage()
    assert not window.is_running()


def test_an_optimized_file_shows_its_profile_on_the_nodes_that_run(window, qtbot, tmp_path):
    """A file opstudio wrote: its profile is reported per original node (mm0), which is no node
    of this graph any more; the table, the heat map and "slowest N" put it on the nodes that
    stand for mm0 now (its MatMulInteger and scale nodes)."""
    from qt_models import mlp_model

    from opstudio.core.model.model_io import save_model
    from opstudio.core.plan.optimize import optimize
    from opstudio.core.plan.recipe import Recipe

    quantized = optimize(mlp_model(hidden=256), Recipe([Step("int8-dynamic", {},
                                                             nodes=["mm0"])])).model
    path = tmp_path / "mlp.int8.onnx"
    save_model(quantized, path)
    assert window.open_model(path)
    assert not window.graph.has_node("mm0")
    integer = next(n for n in window.graph.nodes if n.op_type == "MatMulInteger")
    run_and_wait(qtbot, window, window.run_profile)
    row = window.profile.node("mm0")
    assert row is not None
    tm = window.table.model
    assert tm.value(integer.index, COL_P50) == row.p50_ms
    item = window.graph_view.item
    unmeasured = len(item._palette) - 1  # the grey of nodes without a time
    assert item.colour[integer.index] != unmeasured
    selected = window.select_slowest(len(window.profile.nodes))
    assert integer.index in selected
