"""The one verdict in the window: status bar, results text, plots and operator table say
faster, slower, "≈ 1×" or "too few runs to tell" as ``Ratio.verdict`` decides."""

from __future__ import annotations

import dataclasses

import pyqtgraph as pg
from test_main_window import click_node, run_and_wait

from opstudio.core.measure.timing import Ratio
from opstudio.qt import theme
from opstudio.qt.op_table import COL_SPEEDUP


def speedup_cell(window, name):
    tm = window.table.model
    index = tm.index(window.graph.node(name).index, COL_SPEEDUP)
    return tm.data(index), tm.data(index, 9)  # display text, foreground colour (ForegroundRole)


def plot_texts(window):
    return [it.toPlainText() for it in window.plots.ops.getPlotItem().items
            if isinstance(it, pg.TextItem)]


def test_three_runs_read_too_few_runs_to_tell_never_about_1x(window, qtbot, mlp_path):
    assert window.open_model(mlp_path)
    click_node(qtbot, window, "mm0")
    window.panel.radio["fp16"].setChecked(True)
    window.panel.apply_button.click()
    assert window.plan.steps
    run_and_wait(qtbot, window, window.run_compare)  # the fixture's settings: 3 runs
    status = window.statusBar().currentMessage()
    assert status.startswith("Optimized: too few runs to tell (3 pairs; 6 needed)"), status
    assert "≈ 1×" not in status and "no change" not in status
    summary = window.plots.summary.text()
    assert "too few runs to tell (3 pairs; 6 needed)" in summary and "≈ 1×" not in summary
    texts = plot_texts(window)
    assert texts and all(t in ("too few runs", "removed", "added") for t in texts), texts
    text, colour = speedup_cell(window, "mm0")
    assert text == "too few runs" and colour == theme.NOISE


def test_faster_slower_and_same_in_the_window(window, qtbot, mlp_path):
    assert window.open_model(mlp_path)
    click_node(qtbot, window, "mm0")
    window.panel.radio["fp16"].setChecked(True)
    window.panel.apply_button.click()
    run_and_wait(qtbot, window, window.run_compare)
    optimized, real = window.doc.optimized, window.comparison
    row = real.node("mm0")
    cases = {"faster": (Ratio(1.85, 1.79, 1.92, 30), "Optimized: 1.85× faster, 95 % interval "
                        "[1.79, 1.92]", "1.85×", theme.FASTER),
             "slower": (Ratio(0.87, 0.83, 0.92, 30), "Optimized: 1.15× slower (0.87×), 95 % "
                        "interval [0.83, 0.92]", "0.87×", theme.SLOWER),
             "same": (Ratio(1.01, 0.96, 1.05, 30), "Optimized: ≈ 1× (no change beyond the "
                      "noise), 95 % interval [0.96, 1.05]", "≈ 1×", theme.NOISE)}
    for ratio, status, cell, colour in cases.values():
        node = dataclasses.replace(row, ratio=ratio)
        c = dataclasses.replace(real, plain_ratio=ratio, total_ratio=ratio,
                                nodes=[node if r is row else r for r in real.nodes])
        window.doc.set_comparison(optimized, c)
        assert window.statusBar().currentMessage().startswith(status)
        assert speedup_cell(window, "mm0") == (cell, colour)
        assert cell in plot_texts(window)
        # the slowdown is said in words next to its figure in the results text
        assert ("1.15× slower" in window.plots.summary.text()) == (ratio.median < 1)
