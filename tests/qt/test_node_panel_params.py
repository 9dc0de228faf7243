"""The panel checks a technique with the params in its editor: a block size too large for a
node's K is refused when the step is added, not later inside the optimizer."""

from __future__ import annotations

from qt_models import mlp_model

from opstudio.core.model.model_io import ensure_node_names
from opstudio.core.session.edits import Plan
from opstudio.qt.node_panel import NodePanel


def test_a_node_refused_with_the_editor_params_is_not_added(app, qtbot):
    model = mlp_model(hidden=64)  # mm0: K = 32, mm1: K = 64
    ensure_node_names(model)
    panel = NodePanel(Plan())
    qtbot.addWidget(panel)
    panel.set_model(model)
    panel.show()
    panel.set_selection(["mm1"])
    assert panel.select_technique("int4-weight")
    panel.editor_for["int4-weight"].set_value("block_size", 128)
    assert panel.apply_to_selected() is None
    assert panel.param_error.text() == "K=64 is smaller than the block size 128"
    assert panel.plan.steps == []
    panel.editor_for["int4-weight"].set_value("block_size", 64)
    step = panel.apply_to_selected()
    assert step is not None and step.params["block_size"] == 64 and step.nodes == ["mm1"]
    assert panel.param_error.text() == ""
    # a selection checked while the editor holds 128: the technique is refused right away
    panel.editor_for["int4-weight"].set_value("block_size", 128)
    panel.set_selection(["mm0", "mm1"])
    assert not panel.radio["int4-weight"].isEnabled()
    assert "K=32 is smaller than the block size 128" in panel.reasons["int4-weight"]
