"""Small models and graphs for the GUI tests, built in code."""

from __future__ import annotations

import numpy as np
import onnx

from model_builders import parsed
from opstudio.core.model.graph import GraphInfo, NodeInfo


def mlp_model(hidden: int = 64, seed: int = 0) -> onnx.ModelProto:
    """x[batch,32] → MatMul+Add → Relu → MatMul+Add → Softmax; two constant weights."""
    rng = np.random.default_rng(seed)
    return parsed("""
        <ir_version: 8, opset_import: ["" : 17]>
        mlp (float[batch, 32] x) => (float[batch, 16] y) {
            [mm0] h0 = MatMul(x, w1)
            [add0] h1 = Add(h0, b1)
            [relu0] h2 = Relu(h1)
            [mm1] h3 = MatMul(h2, w2)
            [add1] h4 = Add(h3, b2)
            [softmax] y = Softmax<axis = -1>(h4)
        }""",
        w1=rng.standard_normal((32, hidden)).astype(np.float32) * 0.2,
        b1=np.zeros(hidden, np.float32),
        w2=rng.standard_normal((hidden, 16)).astype(np.float32) * 0.2,
        b2=np.zeros(16, np.float32))


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
