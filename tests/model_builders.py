"""Models built in code for the tests, the benchmarks and the demo generator (tests/ is on
pytest's pythonpath; benchmarks/ and resources/make_demo_models.py put it on sys.path).

``GraphBuilder`` writes graphs that are too big or too regular to read as text; the small ones
are written as ONNX text (``onnx.parser``), as onnxscript's tests do, with their seeded weights
added by ``parsed``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx.parser
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """Collects nodes and initializers; every node gets the name it is given."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def normal(self, name: str, shape: Sequence[int], std: float) -> str:
        data = self.rng.standard_normal(tuple(shape)).astype(np.float32) * np.float32(std)
        return self.weight(name, data)

    def const_i64(self, name: str, values: Sequence[int]) -> str:
        return self.weight(name, np.asarray(values, dtype=np.int64))

    def const_f32(self, name: str, value: float) -> str:
        return self.weight(name, np.asarray(value, dtype=np.float32))

    def op(self, op_type: str, name: str, inputs: Sequence[str], n_out: int = 1,
           **attrs: object) -> str | list[str]:
        outputs = [name] if n_out == 1 else [f"{name}.out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def graph(self, name: str, inputs: Sequence[onnx.ValueInfoProto],
              outputs: Sequence[onnx.ValueInfoProto]) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)


def parsed(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    """The model written in ONNX text, with ``weights`` (name=array) as its initializers."""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in weights.items())
    onnx.checker.check_model(model)
    return model


def small_mlp(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    return parsed("""
        <ir_version: 8, opset_import: ["" : 17]>
        mlp (float[batch, 64] x) => (float[batch, 32] y) {
            [fc1] h = MatMul(x, w1)
            [act] r = Relu(h)
            [fc2] y = MatMul(r, w2)
        }""",
        w1=(rng.standard_normal((64, 128)) * 0.1).astype(np.float32),
        w2=(rng.standard_normal((128, 32)) * 0.1).astype(np.float32))


def run_ort(model: onnx.ModelProto, feeds: dict) -> list:
    """All outputs of one single-threaded onnxruntime run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def apply_pass(pass_, model: onnx.ModelProto, nodes: list, params: dict):
    """Run a pass as the optimizer does, checking it left its input alone and made a valid model."""
    from opstudio.core.model import validity
    from opstudio.core.passes import PassContext

    before = model.SerializeToString()
    result = pass_.apply(model, nodes, pass_.validate_params(params), PassContext())
    assert model.SerializeToString() == before, "the input model was mutated"
    validity.check_model(result.model)
    return result


def ir3_computed_weights(hidden: int = 16) -> onnx.ModelProto:
    """An old export (IR version 3, opset 9) whose weights are computed when it runs, as the
    ONNX model zoo's "light" models are: each weight is a ``ConstantOfShape`` fill times a
    stored scale, and every initializer is also declared as a graph input (IR 3's rule).

    x [1,3,8,8] → Conv (8 filters 3×3) → Relu → Flatten → Gemm (288 → ``hidden``) = y."""
    rng = np.random.default_rng(5)
    arrays = {
        "conv_w_shape": np.array([8, 3, 3, 3], np.int64),
        "conv_w_scale": (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32),
        "conv_b": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "fc_w_shape": np.array([288, hidden], np.int64),
        "fc_w_scale": (rng.standard_normal((1, hidden)) * 0.05).astype(np.float32),
        "fc_b": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
    }
    one = numpy_helper.from_array(np.ones(1, np.float32))
    nodes = [
        helper.make_node("ConstantOfShape", ["conv_w_shape"], ["conv_w_fill"], name="conv_w_fill",
                         value=one),
        helper.make_node("Mul", ["conv_w_fill", "conv_w_scale"], ["conv_w"], name="conv_w"),
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv",
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
        helper.make_node("ConstantOfShape", ["fc_w_shape"], ["fc_w_fill"], name="fc_w_fill",
                         value=one),
        helper.make_node("Mul", ["fc_w_fill", "fc_w_scale"], ["fc_w"], name="fc_w"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype),
                                             list(a.shape)) for name, a in arrays.items()]
    graph = helper.make_graph(
        nodes, "ir3", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, hidden])],
        [numpy_helper.from_array(a, name) for name, a in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)


def framed_matmul(seed: int = 7) -> onnx.ModelProto:
    """A model that runs only on a whole number of 96-sample frames: the 128 samples of
    default synthetic inputs make onnxruntime refuse it (Reshape to [-1, 96])."""
    rng = np.random.default_rng(seed)
    return parsed("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, sequence] x) => (float[n, 8] y)
        <int64[2] frames = {-1, 96}> {
            [frame] f = Reshape(x, frames)
            [mm] y = MatMul(f, W)
        }""", W=rng.standard_normal((96, 8)).astype(np.float32))


def unsized_matmul(seed: int = 6) -> onnx.ModelProto:
    """One MatMul whose input has a dim no default covers ('height'): synthetic inputs cannot
    be made for it without --dim."""
    rng = np.random.default_rng(seed)
    return parsed("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, height, 32] x) => (float[1, height, 16] y) {
            [mm] y = MatMul(x, W)
        }""", W=rng.standard_normal((32, 16)).astype(np.float32))


def gpt2_block(d: int = 768, heads: int = 12, mlp: int = 3072, seq: int = 128,
               seed: int = 0) -> onnx.ModelProto:
    """One pre-LN decoder block, GPT-2-small-sized by default: LayerNorm → QKV → causal
    attention → projection → residual → LayerNorm → MLP (Gelu) → residual. Input ``x``
    [1, seq, d]. Built for the benchmarks (never stored), with the op mix real exports have."""
    b = GraphBuilder(np.random.default_rng(seed))
    hd = d // heads
    ones, zeros = np.ones(d, np.float32), np.zeros(d, np.float32)

    def linear(name: str, x: str, n_in: int, n_out: int) -> str:
        y = b.op("MatMul", name, [x, b.normal(f"{name}.w", (n_in, n_out), 0.02)])
        return b.op("Add", f"{name}_bias", [y, b.weight(f"{name}.b", np.zeros(n_out, np.float32))])

    ln1 = b.op("LayerNormalization", "ln1", ["x", b.weight("ln1.g", ones),
                                             b.weight("ln1.b", zeros)], axis=-1, epsilon=1e-5)
    qkv = linear("attn.qkv", ln1, d, 3 * d)
    b.nodes.append(helper.make_node("Split", [qkv, b.const_i64("split3", [d, d, d])],
                                    ["q", "k", "v"], name="attn.split", axis=-1))
    shape4 = b.const_i64("shape4", [1, seq, heads, hd])
    parts = {}
    for t in ("q", "k", "v"):
        r = b.op("Reshape", f"attn.{t}_heads", [t, shape4])
        parts[t] = b.op("Transpose", f"attn.{t}_t", [r],
                        perm=[0, 2, 3, 1] if t == "k" else [0, 2, 1, 3])
    scores = b.op("MatMul", "attn.scores", [parts["q"], parts["k"]])
    scaled = b.op("Mul", "attn.scale", [scores, b.const_f32("scale", 1 / np.sqrt(hd))])
    mask = np.triu(np.full((seq, seq), -1e4, np.float32), k=1)
    masked = b.op("Add", "attn.mask", [scaled, b.weight("causal_mask", mask)])
    probs = b.op("Softmax", "attn.softmax", [masked], axis=-1)
    ctx = b.op("MatMul", "attn.context", [probs, parts["v"]])
    ctx = b.op("Transpose", "attn.merge_t", [ctx], perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", "attn.merge", [ctx, b.const_i64("shape3", [1, seq, d])])
    h = b.op("Add", "residual1", ["x", linear("attn.proj", ctx, d, d)])
    ln2 = b.op("LayerNormalization", "ln2", [h, b.weight("ln2.g", ones), b.weight("ln2.b", zeros)],
               axis=-1, epsilon=1e-5)
    fc1 = linear("mlp.fc1", ln2, d, mlp)
    # Gelu written out with Erf, as exporters emit it below opset 20
    half = b.op("Mul", "mlp.gelu_half", [fc1, b.const_f32("half", 0.5)])
    erf_in = b.op("Div", "mlp.gelu_div", [fc1, b.const_f32("sqrt2", np.sqrt(2))])
    erf = b.op("Erf", "mlp.gelu_erf", [erf_in])
    erf1 = b.op("Add", "mlp.gelu_add", [erf, b.const_f32("one", 1.0)])
    gelu = b.op("Mul", "mlp.gelu", [half, erf1])
    b.op("Add", "y", [h, linear("mlp.fc2", gelu, mlp, d)])
    return _bench_model(b, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, d])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, d])])


def resnet_like(size: int = 224, widths: tuple[int, ...] = (64, 128, 256), classes: int = 1000,
                seed: int = 0) -> onnx.ModelProto:
    """Stem (7×7/2 conv, BN, ReLU, max-pool), one basic residual block per stage (the first
    conv of a later stage strides by 2, with a 1×1 projection shortcut), global pool, FC."""
    b = GraphBuilder(np.random.default_rng(seed))

    def conv_bn(x: str, name: str, c_in: int, c_out: int, k: int, stride: int, relu: bool) -> str:
        w = b.normal(f"{name}.w", (c_out, c_in, k, k), np.sqrt(2.0 / (c_in * k * k)))
        y = b.op("Conv", name, [x, w], kernel_shape=[k, k], strides=[stride, stride],
                 pads=[k // 2] * 4)
        bn = [b.weight(f"{name}.bn.{p}", v) for p, v in (
            ("scale", np.ones(c_out, np.float32)),
            ("bias", (b.rng.standard_normal(c_out) * 0.01).astype(np.float32)),
            ("mean", np.zeros(c_out, np.float32)), ("var", np.ones(c_out, np.float32)))]
        y = b.op("BatchNormalization", f"{name}.bn", [y, *bn], epsilon=1e-5)
        return b.op("Relu", f"{name}.relu", [y]) if relu else y

    x = conv_bn("image", "stem", 3, widths[0], 7, 2, True)
    x = b.op("MaxPool", "stem.pool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    c_in = widths[0]
    for i, c in enumerate(widths):
        stride = 1 if i == 0 else 2
        y = conv_bn(x, f"stage{i}.conv1", c_in, c, 3, stride, True)
        y = conv_bn(y, f"stage{i}.conv2", c, c, 3, 1, False)
        shortcut = x if stride == 1 and c_in == c else conv_bn(x, f"stage{i}.down", c_in, c, 1,
                                                               stride, False)
        x = b.op("Add", f"stage{i}.add", [y, shortcut])
        x = b.op("Relu", f"stage{i}.out", [x])
        c_in = c
    x = b.op("GlobalAveragePool", "pool", [x])
    x = b.op("Flatten", "flatten", [x], axis=1)
    b.op("Gemm", "logits", [x, b.normal("fc.w", (classes, c_in), 0.01),
                            b.weight("fc.b", np.zeros(classes, np.float32))], transB=1)
    return _bench_model(
        b, [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])])


def _bench_model(b: GraphBuilder, inputs: list[onnx.ValueInfoProto],
                 outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    model = helper.make_model(b.graph("bench", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
