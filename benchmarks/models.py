"""Benchmark models, generated (never stored): a GPT-2-small-sized transformer block and a
ResNet-like CNN, with seeded random weights and the op mix real exports have."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], std: float) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def model(self, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "bench", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        return model


def gpt2_block(d: int = 768, heads: int = 12, mlp: int = 3072, seq: int = 128,
               seed: int = 0) -> onnx.ModelProto:
    """One pre-LN decoder block: LayerNorm → QKV → causal attention → projection → residual →
    LayerNorm → MLP (Gelu) → residual. Input ``x`` [1, seq, d]."""
    b = _Builder(seed)
    hd = d // heads
    ones, zeros = np.ones(d, np.float32), np.zeros(d, np.float32)
    ln1 = b.node("LayerNormalization", ["x", b.const("ln1.g", ones), b.const("ln1.b", zeros)],
                 "ln1", axis=-1, epsilon=1e-5)
    qkv = b.node("MatMul", [ln1, b.weight("attn.qkv.w", (d, 3 * d), 0.02)], "attn.qkv")
    qkv = b.node("Add", [qkv, b.const("attn.qkv.b", np.zeros(3 * d, np.float32))], "attn.qkv_bias")
    split = helper.make_node("Split", [qkv, b.const("split3", np.array([d, d, d], np.int64))],
                             ["q", "k", "v"], name="attn.split", axis=-1)
    b.nodes.append(split)
    shape4 = b.const("shape4", np.array([1, seq, heads, hd], np.int64))
    parts = {}
    for t in ("q", "k", "v"):
        r = b.node("Reshape", [t, shape4], f"attn.{t}_heads")
        perm = [0, 2, 3, 1] if t == "k" else [0, 2, 1, 3]
        parts[t] = b.node("Transpose", [r], f"attn.{t}_t", perm=perm)
    scores = b.node("MatMul", [parts["q"], parts["k"]], "attn.scores")
    scaled = b.node("Mul", [scores, b.const("scale", np.array(1 / np.sqrt(hd), np.float32))],
                    "attn.scale")
    mask = np.triu(np.full((seq, seq), -1e4, np.float32), k=1)
    masked = b.node("Add", [scaled, b.const("causal_mask", mask)], "attn.mask")
    probs = b.node("Softmax", [masked], "attn.softmax", axis=-1)
    ctx = b.node("MatMul", [probs, parts["v"]], "attn.context")
    ctx = b.node("Transpose", [ctx], "attn.merge_t", perm=[0, 2, 1, 3])
    ctx = b.node("Reshape", [ctx, b.const("shape3", np.array([1, seq, d], np.int64))],
                 "attn.merge")
    proj = b.node("MatMul", [ctx, b.weight("attn.proj.w", (d, d), 0.02)], "attn.proj")
    proj = b.node("Add", [proj, b.const("attn.proj.b", zeros)], "attn.proj_bias")
    h = b.node("Add", ["x", proj], "residual1")
    ln2 = b.node("LayerNormalization", [h, b.const("ln2.g", ones), b.const("ln2.b", zeros)],
                 "ln2", axis=-1, epsilon=1e-5)
    fc1 = b.node("MatMul", [ln2, b.weight("mlp.fc1.w", (d, mlp), 0.02)], "mlp.fc1")
    fc1 = b.node("Add", [fc1, b.const("mlp.fc1.b", np.zeros(mlp, np.float32))], "mlp.fc1_bias")
    # Gelu written out with Erf, as exporters emit it below opset 20
    half = b.node("Mul", [fc1, b.const("half", np.array(0.5, np.float32))], "mlp.gelu_half")
    erf_in = b.node("Div", [fc1, b.const("sqrt2", np.array(np.sqrt(2), np.float32))],
                    "mlp.gelu_div")
    erf = b.node("Erf", [erf_in], "mlp.gelu_erf")
    erf1 = b.node("Add", [erf, b.const("one", np.array(1.0, np.float32))], "mlp.gelu_add")
    gelu = b.node("Mul", [half, erf1], "mlp.gelu")
    fc2 = b.node("MatMul", [gelu, b.weight("mlp.fc2.w", (mlp, d), 0.02)], "mlp.fc2")
    fc2 = b.node("Add", [fc2, b.const("mlp.fc2.b", zeros)], "mlp.fc2_bias")
    b.node("Add", [h, fc2], "y")
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, d])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, d])])


def resnet_like(size: int = 224, widths: tuple[int, ...] = (64, 128, 256), classes: int = 1000,
                seed: int = 0) -> onnx.ModelProto:
    """Stem (7×7/2 conv, BN, ReLU, max-pool), one basic residual block per stage (the first
    conv of a later stage strides by 2, with a 1×1 projection shortcut), global pool, FC."""
    b = _Builder(seed)

    def conv_bn(x: str, name: str, c_in: int, c_out: int, k: int, stride: int, relu: bool) -> str:
        w = b.weight(f"{name}.w", (c_out, c_in, k, k), np.sqrt(2.0 / (c_in * k * k)))
        y = b.node("Conv", [x, w], name, kernel_shape=[k, k], strides=[stride, stride],
                   pads=[k // 2] * 4)
        bn = [b.const(f"{name}.bn.{p}", v) for p, v in (
            ("scale", np.ones(c_out, np.float32)),
            ("bias", (b.rng.standard_normal(c_out) * 0.01).astype(np.float32)),
            ("mean", np.zeros(c_out, np.float32)), ("var", np.ones(c_out, np.float32)))]
        y = b.node("BatchNormalization", [y, *bn], f"{name}.bn", epsilon=1e-5)
        return b.node("Relu", [y], f"{name}.relu") if relu else y

    x = conv_bn("image", "stem", 3, widths[0], 7, 2, True)
    x = b.node("MaxPool", [x], "stem.pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    c_in = widths[0]
    for i, c in enumerate(widths):
        stride = 1 if i == 0 else 2
        y = conv_bn(x, f"stage{i}.conv1", c_in, c, 3, stride, True)
        y = conv_bn(y, f"stage{i}.conv2", c, c, 3, 1, False)
        shortcut = x if stride == 1 and c_in == c else conv_bn(x, f"stage{i}.down", c_in, c, 1,
                                                               stride, False)
        x = b.node("Add", [y, shortcut], f"stage{i}.add")
        x = b.node("Relu", [x], f"stage{i}.out")
        c_in = c
    x = b.node("GlobalAveragePool", [x], "pool")
    x = b.node("Flatten", [x], "flatten", axis=1)
    b.node("Gemm", [x, b.weight("fc.w", (classes, c_in), 0.01),
                    b.const("fc.b", np.zeros(classes, np.float32))], "logits", transB=1)
    return b.model([helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])])


if __name__ == "__main__":
    import sys

    for name, m in (("gpt2_block", gpt2_block()), ("resnet_like", resnet_like())):
        onnx.checker.check_model(m, full_check=True)
        path = f"{sys.argv[1] if len(sys.argv) > 1 else '.'}/{name}.onnx"
        onnx.save(m, path)
        print(path, len(m.graph.node), "nodes")
