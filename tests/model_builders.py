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
    from opstudio.core import validity
    from opstudio.core.passes import PassContext

    before = model.SerializeToString()
    result = pass_.apply(model, nodes, pass_.validate_params(params), PassContext())
    assert model.SerializeToString() == before, "the input model was mutated"
    validity.check_model(result.model)
    return result
