"""The panel says when structured pruning of one projection rewrites its whole MLP."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.session.edits import Plan
from opstudio.qt.node_panel import NodePanel


def swiglu_layer():
    rng = np.random.default_rng(0)
    scope = "/model/layers.2/mlp"
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), k)
             for k, s in (("Wg", (8, 16)), ("Wu", (8, 16)), ("Wd", (16, 8)))]
    nodes = [helper.make_node("MatMul", ["x", "Wg"], ["g"], name=f"{scope}/gate_proj/MatMul"),
             helper.make_node("MatMul", ["x", "Wu"], ["u"], name=f"{scope}/up_proj/MatMul"),
             helper.make_node("Sigmoid", ["g"], ["s"], name=f"{scope}/act_fn/Sigmoid"),
             helper.make_node("Mul", ["g", "s"], ["a"], name=f"{scope}/act_fn/Mul"),
             helper.make_node("Mul", ["a", "u"], ["m"], name=f"{scope}/Mul"),
             helper.make_node("MatMul", ["m", "Wd"], ["d"], name=f"{scope}/down_proj/MatMul"),
             helper.make_node("Add", ["x", "d"], ["y"], name="/model/layers.2/Add")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_one_projection_shows_the_joint_rewrite(app, qtbot):
    panel = NodePanel(Plan())
    qtbot.addWidget(panel)
    panel.set_model(swiglu_layer())
    panel.show()
    panel.set_selection(["/model/layers.2/mlp/down_proj/MatMul"])
    label = panel.reason_labels["prune"]
    assert panel.radio["prune"].isEnabled()
    assert label.isVisible()
    assert label.text().startswith("structured: prunes layers.2's MLP jointly (gate_proj, "
                                   "up_proj, down_proj)")
    assert "meet channel by channel in '/model/layers.2/mlp/Mul'" in label.text()
    panel.set_selection(["/model/layers.2/Add"])  # not a projection: no remark, its reason
    assert not label.text().startswith("structured:")
