"""Optimize & compare on a model whose inputs cannot be made (a dim with no value): the app
keeps the optimized model, which can be saved, and shows the accuracy as not measured with
the reason, as ``opstudio optimize`` does; a technique that calibrates is refused in words."""

from __future__ import annotations

import onnx

from model_builders import framed_matmul, unsized_matmul
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.plan.recipe import Step


def _unsized(tmp_path):
    path = tmp_path / "unsized.onnx"
    onnx.save(unsized_matmul(), path)
    return path


def _compare(qtbot, window, technique):
    window.set_run_settings(ProfileSettings(runs=3, warmup=1, threads=1))
    window.plan.add(Step(technique, nodes=["mm"]))
    worker = window.run_compare()
    assert worker is not None
    qtbot.waitUntil(lambda: worker.is_done() and window.progress.isHidden(), timeout=60000)


def test_optimized_model_is_kept_and_accuracy_shown_as_not_measured(window, qtbot, tmp_path):
    window.open_model(_unsized(tmp_path))
    _compare(qtbot, window, "int8-dynamic")
    assert not window.banner.isVisible(), window.banner_text.text()
    assert window.doc.optimized is not None and window.comparison is None
    cell = window.plots.accuracy.item(0, 0).text()
    assert cell == "not measured: input 'x' dim 1 ('height') is unknown"
    assert "speed and accuracy not measured" in window.plots.summary.text()
    assert "Run settings" in window.statusBar().currentMessage()
    assert window.window_actions.save_model.isEnabled()
    out = window.save_optimized(tmp_path / "unsized.int8.onnx")
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_a_technique_that_calibrates_is_refused_with_the_reason(window, qtbot, tmp_path):
    window.open_model(_unsized(tmp_path))
    _compare(qtbot, window, "int8-static")
    assert window.banner.isVisible()
    text = window.banner_text.text()
    assert "int8-static" in text and "'height'" in text
    assert window.doc.optimized is None


def test_an_original_that_does_not_run_on_the_inputs_is_optimized_not_compared(window, qtbot,
                                                                              tmp_path):
    path = tmp_path / "framed.onnx"
    onnx.save(framed_matmul(), path)
    window.open_model(path)
    _compare(qtbot, window, "int8-dynamic")
    assert not window.banner.isVisible(), window.banner_text.text()
    assert window.doc.optimized is not None and window.comparison is None
    cell = window.plots.accuracy.item(0, 0).text()
    assert cell.startswith("not measured: the original model does not run on these inputs (")
