"""Small models shared by tests in several folders (tests/ is on pytest's pythonpath)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def small_mlp(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((64, 128)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((128, 32)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="act"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


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
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "frames"], ["f"], name="frame"),
         helper.make_node("MatMul", ["f", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", 1, [1, "sequence"])],
        [helper.make_tensor_value_info("y", 1, ["n", 8])],
        [numpy_helper.from_array(np.array([-1, 96], np.int64), "frames"),
         numpy_helper.from_array(rng.standard_normal((96, 8)).astype(np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def unsized_matmul(seed: int = 6) -> onnx.ModelProto:
    """One MatMul whose input has a dim no default covers ('height'): synthetic inputs cannot
    be made for it without --dim."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", 1, [1, "height", 32])],
        [helper.make_tensor_value_info("y", 1, [1, "height", 16])],
        [numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
