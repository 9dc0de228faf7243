"""Small models and graphs for the GUI tests, built in code."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.model.graph import GraphInfo, NodeInfo


def mlp_model(hidden: int = 64, seed: int = 0) -> onnx.ModelProto:
    """x[batch,32] → MatMul+Add → Relu → MatMul+Add → Softmax; two constant weights."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((32, hidden)).astype(np.float32) * 0.2, "w1")
    b1 = numpy_helper.from_array(np.zeros(hidden, np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, 16)).astype(np.float32) * 0.2, "w2")
    b2 = numpy_helper.from_array(np.zeros(16, np.float32), "b2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm0"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="add0"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu0"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="mm1"),
        helper.make_node("Add", ["h3", "b2"], ["h4"], name="add1"),
        helper.make_node("Softmax", ["h4"], ["y"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], [w1, b1, w2, b2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def synthetic_graph(n: int, seed: int = 0) -> GraphInfo:
    """A GraphInfo of ``n`` nodes shaped like a stack of blocks (no ONNX model needed)."""
    rng = np.random.default_rng(seed)
    ops = ["MatMul", "Add", "Relu", "LayerNormalization", "Reshape", "Transpose", "Softmax", "Mul"]
    nodes, edges = [], []
    for i in range(n):
        nodes.append(NodeInfo(index=i, name=f"node_{i}", op_type=ops[i % len(ops)], domain="",
                              inputs=[f"t{i - 1}"] if i else ["x"], outputs=[f"t{i}"],
                              output_shapes=[[1, 128]]))
        if i:
            edges.append((i - 1, i, f"t{i - 1}"))
            if i > 3 and rng.random() < 0.3:
                j = i - int(rng.integers(2, 4))
                edges.append((j, i, f"t{j}"))
    return GraphInfo(nodes=nodes, edges=edges, inputs=[], outputs=[], tensors={}, opset=17,
                     ir_version=8, producer="test")
