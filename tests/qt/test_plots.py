"""Plots: the numbers behind each chart, hover text, PNG export, timeline lanes, accuracy."""

from __future__ import annotations

from types import SimpleNamespace

from PySide6.QtCore import QPointF
from PySide6.QtGui import QImage

from opstudio.qt import plots
from opstudio.qt.plots import PlotsPanel


def fake_profile(scale=1.0):
    nodes = [SimpleNamespace(name=n, op_type=op, mean_ms=ms * scale * 1.1, p50_ms=ms * scale,
                             share=0.0, group=[])
             for n, op, ms in (("a", "MatMul", 1.0), ("b", "Add", 3.0), ("c", "MatMul", 2.0))]
    return SimpleNamespace(
        nodes=nodes, total_ms={"p50": 6.5 * scale, "mean": 6.6 * scale}, plain_ms={"p50": 5.0},
        op_types=[{"op_type": "MatMul", "mean_ms": 3.0 * scale, "count": 2},
                  {"op_type": "Add", "mean_ms": 3.0 * scale, "count": 1}],
        kernel_events=[{"name": "a", "op": "MatMul", "start_us": 100, "dur_us": 50, "tid": 7},
                       {"name": "b", "op": "Add", "start_us": 160, "dur_us": 20, "tid": 9}])


def fake_comparison():
    rows = [SimpleNamespace(name="b", op_type="Add", before_ms=3.0, after_ms=1.0, speedup=3.0,
                            group=[]),
            SimpleNamespace(name="c", op_type="MatMul", before_ms=2.0, after_ms=2.5, speedup=0.8,
                            group=[])]
    acc = SimpleNamespace(outputs=[SimpleNamespace(name="y", shape=[2, 16], max_abs_err=0.01,
                                                   mean_abs_err=0.001, cosine=0.9999,
                                                   snr_db=40.0, top1_agreement=1.0)])
    return SimpleNamespace(
        before=fake_profile(), after=fake_profile(0.5), nodes=rows, accuracy=acc, speedup=2.0,
        plain_speedup=None,
        size_bytes={"before": 4096, "after": 2048},
        op_types=lambda: [{"op_type": "Add", "before_ms": 3.0, "after_ms": 1.0},
                          {"op_type": "MatMul", "before_ms": 3.0, "after_ms": 1.5}])


def test_profile_then_comparison(app, qtbot, tmp_path):
    panel = PlotsPanel()
    qtbot.addWidget(panel)
    panel.show_profile(fake_profile())
    assert panel.ops.data["labels"] == ["b", "c", "a"]  # slowest first
    assert panel.ops.data["before"] == [3.0, 2.0, 1.0] and panel.ops.data["after"] is None
    assert panel.total.data["before"] == [6.5]
    assert panel.timeline.data == {"events": 2, "lanes": [7, 9]}
    panel.show_comparison(fake_comparison())
    assert panel.ops.data["labels"] == ["b", "c"]
    assert panel.ops.data["after"] == [1.0, 2.5] and panel.ops.data["speedup"] == [3.0, 0.8]
    assert panel.op_types.data["speedup"] == [3.0, 2.0]
    assert panel.total.data["before"] == [6.5] and panel.total.data["after"] == [3.25]
    assert "2.00×" in panel.summary.text() and "without the profiler" not in panel.summary.text()
    # on a sub-millisecond model the plain runs tell more than the profiled ones: both shown
    tiny = fake_comparison()
    tiny.before.plain_ms, tiny.after.plain_ms, tiny.plain_speedup = (
        {"p50": 0.080}, {"p50": 0.082}, 0.97)
    panel.show_comparison(tiny)
    assert "without the profiler 0.080 ms → 0.082 ms" in panel.summary.text()
    assert "0.97×" in panel.summary.text()
    panel.show_comparison(fake_comparison())
    assert panel.accuracy.rowCount() == 1 and panel.accuracy.item(0, 2).text() == "0.999900"
    panel.top_spin.setValue(3)
    assert panel.ops.data["labels"] == ["b", "c"]
    out = panel.ops.save_png(tmp_path / "ops.png", width=600)
    img = QImage(str(out))
    assert img.width() == 600 and img.height() > 50


def test_hover_shows_values(app, qtbot, monkeypatch):
    panel = PlotsPanel()
    qtbot.addWidget(panel)
    panel.resize(900, 600)
    panel.show()
    qtbot.waitExposed(panel)
    panel.show_comparison(fake_comparison())
    shown = []
    monkeypatch.setattr(plots.QToolTip, "showText", lambda pos, text, *a: shown.append(text))
    vb = panel.ops.getPlotItem().vb
    scene_pos = vb.mapViewToScene(QPointF(1.0, 1.0))  # x = 1 ms, row 1 ("c")
    panel.ops._on_hover(scene_pos)
    assert shown and "<b>c</b>" in shown[-1] and "0.80×" in shown[-1]
    assert "2.500 ms" in shown[-1]


def test_roofline_draws_the_int8_roof_only_for_integer_kernels(app, qtbot):
    from opstudio.core.measure.roofline import Machine, RooflinePoint
    from opstudio.qt.roofline_plot import RooflinePlot

    machine = Machine(peak_gflops=100.0, bandwidth_gbs=10.0, threads=1, onnxruntime="x",
                      measured_at=0.0, peak_int8_gops=400.0)

    def point(name, precision, intensity, gflops):
        return RooflinePoint(name, "MatMul", 1000, int(1000 / intensity), 0.1, intensity,
                             gflops, 100.0, "compute", precision)

    plot = RooflinePlot()
    qtbot.addWidget(plot)
    plot.set_points([point("fp", "fp32", 20.0, 80.0)], machine)
    assert plot.int8_roof.xData is None or len(plot.int8_roof.xData) == 0
    plot.set_points([point("fp", "fp32", 20.0, 80.0), point("q", "int8", 60.0, 350.0)], machine)
    assert max(plot.int8_roof.yData) == 400.0 and max(plot.roof.yData) == 100.0
    symbols = {s.data(): s.symbol() for s in plot.scatter.points()}
    assert symbols == {"fp": "o", "q": "s"}
    assert "INT8 400 GOP/s" in plot.getPlotItem().titleLabel.text
    assert "of the INT8 roof" in plot._tip(0, 0, "q")
