"""Results plots on a real comparison: error bars on every bar, non-significant differences
greyed and labelled "≈ 1×", the interval and the noise verdict next to the totals."""

from __future__ import annotations

import onnx
import pyqtgraph as pg

from model_builders import small_mlp
from opstudio.core.measure.compare import compare_models
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.qt.plots import PlotsPanel


def test_comparison_of_a_model_with_itself_is_greyed_with_error_bars(app, qtbot, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_mlp(), path)
    c = compare_models(path, path, ProfileSettings(runs=8, warmup=1, threads=1,
                                                   dims={"batch": 16}))
    panel = PlotsPanel()
    qtbot.addWidget(panel)
    panel.show_comparison(c)
    data = panel.ops.data
    assert len(data["before_ci"]) == len(data["labels"]) > 0
    for (lo, hi), value in zip(data["before_ci"], data["before"]):
        assert lo <= value <= hi
    errors = [it for it in panel.ops.listDataItems() + panel.ops.getPlotItem().items
              if isinstance(it, pg.ErrorBarItem)]
    assert errors  # drawn, not only computed
    for ratio, greyed in zip(data["ratios"], data["greyed"]):
        assert greyed == (ratio is not None and not ratio.significant)
    texts = [it.toPlainText() for it in panel.ops.getPlotItem().items
             if isinstance(it, pg.TextItem)]
    assert sum(t in ("≈ 1×", "too few runs") for t in texts) == sum(data["greyed"])
    summary = panel.summary.text()
    assert "[" in summary and "–" in summary  # the total's interval
    assert c.noise() in summary

    panel.show_profile(c.before)
    assert all(ci is not None for ci in panel.ops.data["before_ci"])
    assert c.before.noise["message"] in panel.summary.text()
