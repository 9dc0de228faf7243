"""A model with external data opens without its weights; the panel and Optimize & compare
read them from the file when they need them."""

from __future__ import annotations

import onnx
from PySide6.QtCore import QPoint, Qt
from qt_models import mlp_model

from opstudio.core.model.model_io import is_lazy


def test_external_data_model_opens_lazily_and_optimizes(window, qtbot, tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save_model(mlp_model(), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="mlp.onnx.data", size_threshold=0)
    assert window.open_model(path)
    assert is_lazy(window.doc.model)
    assert window.table.model.rowCount() == len(mlp_model().graph.node)

    window.select_op_type("MatMul")
    radio = window.panel.radio["int8-weight"]
    assert radio.isEnabled()  # the weights were checked, read from the file
    qtbot.mouseClick(radio, Qt.MouseButton.LeftButton, pos=QPoint(8, radio.height() // 2))
    qtbot.mouseClick(window.panel.apply_button, Qt.MouseButton.LeftButton)
    worker = window.run_compare()
    assert worker is not None
    qtbot.waitUntil(lambda: worker.is_done() and window.progress.isHidden(), timeout=60000)
    assert not window.banner.isVisible(), window.banner_text.text()
    assert window.doc.comparison is not None
    assert window.doc.comparison.accuracy.outputs[0].cosine > 0.99
    assert is_lazy(window.doc.model)  # the optimizer read the weights into its own copy
