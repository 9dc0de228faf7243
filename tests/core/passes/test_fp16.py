"""fp16: only the chosen nodes in float16, casts at their borders, range checks on constants."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.model import provenance
from opstudio.core.passes import PassContext, get_pass

RNG = np.random.default_rng(2)


def two_branch() -> onnx.ModelProto:
    """x → mm0 → relu0 → mm1 → y, and x → add0 → mul0 → z where mul0 shares W0 with mm0."""
    inits = [
        numpy_helper.from_array(RNG.standard_normal((16, 16)).astype(np.float32) * 0.25, "W0"),
        numpy_helper.from_array(RNG.standard_normal((16, 8)).astype(np.float32) * 0.25, "W1"),
        numpy_helper.from_array(RNG.standard_normal(16).astype(np.float32), "B"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["h"], name="mm0"),
        helper.make_node("Relu", ["h"], ["r"], name="relu0"),
        helper.make_node("MatMul", ["r", "W1"], ["y"], name="mm1"),
        helper.make_node("Add", ["x", "B"], ["a"], name="add0"),
        helper.make_node("Mul", ["a", "W0"], ["z"], name="mul0"),  # shares W0 with mm0
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [16, 16])],
                              [helper.make_tensor_value_info("y", 1, [16, 8]),
                               helper.make_tensor_value_info("z", 1, [16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}


def test_only_chosen_nodes_become_float16():
    model = two_branch()
    result = get_pass("fp16").apply(model, ["mm0", "relu0"], {}, PassContext())
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert result.applied == ["mm0", "relu0"]
    types = elem_types(out)
    assert types["h"] == TensorProto.FLOAT16 and types["r"] == TensorProto.FLOAT16
    assert types["x"] == TensorProto.FLOAT and types["y"] == TensorProto.FLOAT
    assert types["a"] == TensorProto.FLOAT and types["z"] == TensorProto.FLOAT
    created = [n for n in out.graph.node if n.name not in {m.name for m in model.graph.node}]
    assert created and {n.op_type for n in created} == {"Cast"}
    for node in created:
        assert provenance.get_origin(node) in (["mm0"], ["relu0"]), node.name
    # one cast into the float16 region, one out of it
    assert len(created) == 2
    # untouched nodes keep their tensors' names
    by_name = {n.name: n for n in out.graph.node}
    assert list(by_name["add0"].output) == ["a"] and list(by_name["mul0"].output) == ["z"]
    x = RNG.standard_normal((16, 16)).astype(np.float32)
    (y_ref, z_ref), (y_new, z_new) = run(model, x), run(out, x)
    assert np.linalg.norm(y_new - y_ref) / np.linalg.norm(y_ref) < 1e-2
    # the untouched branch is bit-exact, although it shares W0 with a float16 node
    assert np.array_equal(z_new, z_ref)
    assert result.details["mm0"]["bytes_after"] == 16 * 16 * 2
    assert any("no float16 kernel" in note and "MatMul" in note for note in result.notes)
    assert result.details["mm0"]["cpu_fp16_kernel"] is False


def test_consecutive_chosen_nodes_have_no_casts_between_them():
    model = two_branch()
    out = get_pass("fp16").apply(model, ["mm0", "relu0", "mm1"], {}, PassContext()).model
    onnx.checker.check_model(out, full_check=True)
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2  # graph input x → float16, y → float32
    assert {provenance.get_origin(c)[0] for c in casts} == {"mm0", "mm1"}


def bn_model(variance: float) -> onnx.ModelProto:
    c = 2
    inits = [numpy_helper.from_array(np.ones(c, np.float32), "s"),
             numpy_helper.from_array(np.zeros(c, np.float32), "b"),
             numpy_helper.from_array(np.zeros(c, np.float32), "m"),
             numpy_helper.from_array(np.full(c, variance, np.float32), "v")]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn0")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1, c, 4, 4])],
                              [helper.make_tensor_value_info("y", 1, [1, c, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_constants_out_of_float16_range_are_refused():
    p = get_pass("fp16")
    big = bn_model(1e8)
    reason = p.check(big, big.graph.node[0])
    assert "constant 'v'" in reason and "65504" in reason
    tiny = bn_model(1e-9)
    assert "too small" in p.check(tiny, tiny.graph.node[0])
    fine = bn_model(2.0)
    assert p.check(fine, fine.graph.node[0]) is None
    result = p.apply(big, ["bn0"], {}, PassContext())
    assert result.applied == [] and "65504" in result.skipped["bn0"]


def test_ops_the_converter_keeps_in_float32_are_refused():
    model = two_branch()
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")
    assert "keeps TopK in float32" in get_pass("fp16").check(model, node)


def test_deterministic():
    model = two_branch()
    a = get_pass("fp16").apply(model, ["mm0", "add0"], {}, PassContext()).model
    b = get_pass("fp16").apply(model, ["mm0", "add0"], {}, PassContext()).model
    assert a.SerializeToString() == b.SerializeToString()
    onnx.checker.check_model(a, full_check=True)


def test_constant_node_weights_become_float16_initializers():
    weight = RNG.standard_normal((16, 8)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w"], name="const_w",
                              value=numpy_helper.from_array(weight, "w")),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm0")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 16])],
                              [helper.make_tensor_value_info("y", 1, [2, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = get_pass("fp16").apply(model, ["mm0"], {}, PassContext())
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert any("Constant" in note for note in result.notes)
    assert [i.data_type for i in out.graph.initializer] == [TensorProto.FLOAT16]
    assert [n.op_type for n in out.graph.node] == ["Cast", "MatMul", "Cast"]
    x = RNG.standard_normal((2, 16)).astype(np.float32)
    (ref,), (new,) = run(model, x), run(out, x)
    assert np.allclose(ref, new, rtol=1e-2, atol=1e-2)
