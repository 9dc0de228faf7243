"""prune: unstructured/structured sparsification, sparse storage, checked against onnxruntime."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from model_builders import apply_pass, run_ort
from opstudio.core.errors import OpstudioError
from opstudio.core.model import provenance
from opstudio.core.model.graph import analyze
from opstudio.core.passes import get_pass
from opstudio.core.passes.prune import PASS

RNG = np.random.default_rng(11)


def arr(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def make(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, 1, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, 1, s) for n, s in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    # recorded intermediate shapes, as real exports have: the pass must not leave them stale
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


run = run_ort


def apply(model: onnx.ModelProto, nodes: list[str], params: dict):
    return apply_pass(PASS, model, nodes, params)


def weight_of(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    if node.input[1] in inits:
        return inits[node.input[1]]
    const = next(n for n in model.graph.node if node.input[1] in n.output)
    attr = const.attribute[0]
    assert attr.name == "sparse_value"
    sparse = attr.sparse_tensor
    dense = np.zeros(int(np.prod(sparse.dims)), np.float32)
    dense[numpy_helper.to_array(sparse.indices)] = numpy_helper.to_array(sparse.values)
    return dense.reshape(tuple(sparse.dims))


def with_weight(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(value, name))
    return out


def mlp(constant_node: bool = False) -> onnx.ModelProto:
    """x[4,32] → mm0 (32×24) → Add bias → Relu → mm1 (24×8)."""
    w0 = arr(32, 24)
    inits = {"W0": w0, "b0": arr(24), "W1": arr(24, 8)}
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["h"], name="mm0"),
        helper.make_node("Add", ["h", "b0"], ["hb"], name="add0"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu0"),
        helper.make_node("MatMul", ["r", "W1"], ["y"], name="mm1"),
    ]
    if constant_node:
        del inits["W0"]
        nodes.insert(0, helper.make_node("Constant", [], ["W0"], name="w0_const",
                                         value=numpy_helper.from_array(w0, "W0")))
    return make(nodes, [("x", [4, 32])], [("y", [4, 8])], inits)


def cnn() -> onnx.ModelProto:
    """conv1 → bn1 → relu1 → maxpool → conv2 (the chain structured pruning shrinks)."""
    inits = {"W1": arr(16, 3, 3, 3), "b1": arr(16), "s": arr(16), "bb": arr(16), "mu": arr(16),
             "var": np.abs(arr(16)) + 0.5, "W2": arr(8, 16, 3, 3), "b2": arr(8)}
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s", "bb", "mu", "var"], ["n1"],
                         name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Conv", ["p1", "W2", "b2"], ["y"], name="conv2"),
    ]
    return make(nodes, [("x", [1, 3, 16, 16])], [("y", [1, 8, 6, 6])], inits)


def test_registered_and_params() -> None:
    assert get_pass("prune") is PASS
    assert PASS.validate_params({}) == {"sparsity": 0.5, "structured": False, "storage": "dense",
                                        "importance": "magnitude", "calibration": "random",
                                        "samples": 8}
    with pytest.raises(OpstudioError, match="structured"):
        PASS.validate_params({"importance": "activation"})
    with pytest.raises(OpstudioError, match="does not exist"):
        PASS.validate_params({"structured": True, "importance": "activation",
                              "calibration": "/nonexistent/prompt.npz"})
    with pytest.raises(OpstudioError, match="below 1"):
        PASS.validate_params({"sparsity": 1.0})
    with pytest.raises(OpstudioError, match="unstructured"):
        PASS.validate_params({"structured": True, "storage": "sparse"})
    with pytest.raises(OpstudioError, match="storage"):
        PASS.validate_params({"storage": "csr"})
    assert "no faster" in PASS.description


@pytest.mark.parametrize("sparsity", [0.3, 0.75])
@pytest.mark.parametrize("constant_node", [False, True])
def test_unstructured_zeroes_the_smallest(sparsity: float, constant_node: bool) -> None:
    model = mlp(constant_node)
    original = weight_of(model, "mm0") if not constant_node else numpy_helper.to_array(
        model.graph.node[0].attribute[0].t)
    result = apply(model, ["mm0"], {"sparsity": sparsity})
    pruned = weight_of(result.model, "mm0")
    count = math.floor(sparsity * original.size + 0.5)
    smallest = np.argsort(np.abs(original).ravel(), kind="stable")[:count]
    expected = original.ravel().copy()
    expected[smallest] = 0
    np.testing.assert_array_equal(pruned.ravel(), expected)
    assert int((pruned == 0).sum()) == count
    assert result.details["mm0"]["zeroed"] == count
    assert result.details["mm0"]["params_after"] == original.size - count
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add", "Relu", "MatMul"]
    x = arr(4, 32)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    reference = np.maximum(x @ expected.reshape(32, 24) + inits["b0"], 0) @ inits["W1"]
    np.testing.assert_allclose(run(result.model, {"x": x})[0], reference, rtol=1e-4, atol=1e-4)


def test_unstructured_ties_are_deterministic() -> None:
    weight = np.array([[1, -1, 1, 2], [-1, 3, 1, -2]], np.float32)
    model = make([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                 [("x", [1, 2])], [("y", [1, 4])], {"W": weight})
    pruned = weight_of(apply(model, ["mm"], {"sparsity": 0.25}).model, "mm")
    # two of the five |w| = 1 go, the first two in row-major order
    np.testing.assert_array_equal(pruned, [[0, 0, 1, 2], [-1, 3, 1, -2]])


def test_sparse_storage_round_trips_and_is_smaller_at_90_percent() -> None:
    model = cnn()
    feeds = {"x": arr(1, 3, 16, 16)}
    dense = apply(model, ["conv1", "conv2"], {"sparsity": 0.9})
    sparse = apply(model, ["conv1", "conv2"], {"sparsity": 0.9, "storage": "sparse"})
    np.testing.assert_array_equal(weight_of(dense.model, "conv2"),
                                  weight_of(sparse.model, "conv2"))
    np.testing.assert_allclose(run(sparse.model, feeds)[0], run(dense.model, feeds)[0],
                               rtol=1e-5, atol=1e-5)
    consts = [n for n in sparse.model.graph.node if n.op_type == "Constant"]
    assert len(consts) == 2
    assert all(provenance.get_origin(c)[0] in ("conv1", "conv2") for c in consts)
    details = sparse.details["conv2"]
    assert details["bytes_after"] < details["bytes_before"] / 2
    assert len(sparse.model.SerializeToString()) < len(dense.model.SerializeToString())
    assert any("bytes" in note for note in sparse.notes)
    assert any("not make" in note for note in sparse.notes)


def test_sparse_storage_needs_opset_11() -> None:
    model = make([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                 [("x", [1, 8])], [("y", [1, 8])], {"W": arr(8, 8)}, opset=9)
    result = apply(model, ["mm"], {"storage": "sparse"})
    assert "opset 11" in result.skipped["mm"]


def test_unstructured_shared_weight() -> None:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="a"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="b")]
    model = make(nodes, [("x", [2, 8])], [("y", [2, 8])], {"W": arr(8, 8)})
    alone = apply(model, ["a"], {})
    assert "also used by 'b'" in alone.skipped["a"]
    both = apply(model, ["a", "b"], {})
    assert both.applied == ["a", "b"]
    assert [i.name for i in both.model.graph.initializer] == ["W_pruned"]


def test_structured_conv_bn_relu_pool_conv() -> None:
    model = cnn()
    feeds = {"x": arr(1, 3, 16, 16)}
    result = apply(model, ["conv1"], {"sparsity": 0.5, "structured": True})
    details = result.details["conv1"]
    assert (details["channels_before"], details["channels_after"]) == (16, 8)
    w1 = weight_of(model, "conv1")
    norms = np.linalg.norm(w1.reshape(16, -1), axis=1)
    assert details["removed_channels"] == sorted(np.argsort(norms, kind="stable")[:8].tolist())
    shapes = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert sorted(shapes.values()) == sorted([[8, 3, 3, 3], [8]] + [[8]] * 4
                                             + [[8, 8, 3, 3], [8]])
    # FLOPs really drop, and the pass reports what the analysis finds
    before, after = analyze(model).total_flops(), analyze(result.model).total_flops()
    assert after < 0.55 * before
    assert (details["flops_before"], details["flops_after"]) == (before, after)
    assert details["params_after"] < details["params_before"]
    # removing channels = the next layer no longer sees them
    w2 = weight_of(model, "conv2").copy()
    w2[:, details["removed_channels"]] = 0
    reference = run(with_weight(model, "W2", w2), feeds)[0]
    np.testing.assert_allclose(run(result.model, feeds)[0], reference, rtol=1e-4, atol=1e-4)
    assert all(not provenance.get_origin(n) or provenance.get_origin(n) == [n.name]
               for n in result.model.graph.node)


def test_structured_matmul_add_relu_matmul() -> None:
    model = mlp(constant_node=True)
    x = arr(4, 32)
    result = apply(model, ["mm0"], {"sparsity": 0.25, "structured": True})
    details = result.details["mm0"]
    assert (details["channels_before"], details["channels_after"]) == (24, 18)
    assert details["touched"] == ["mm0", "add0", "relu0", "mm1"]
    w1 = weight_of(model, "mm1").copy()
    w1[details["removed_channels"]] = 0
    reference = run(with_weight(model, "W1", w1), {"x": x})[0]
    np.testing.assert_allclose(run(result.model, {"x": x})[0], reference, rtol=1e-4, atol=1e-4)
    assert analyze(result.model).total_flops() < analyze(model).total_flops()
    assert not any(n.op_type == "Constant" for n in result.model.graph.node)


def test_structured_gemm_with_bias_into_gemm() -> None:
    inits = {"B0": arr(12, 10), "C0": arr(12), "B1": arr(12, 5)}
    nodes = [helper.make_node("Gemm", ["x", "B0", "C0"], ["h"], name="fc0", transB=1),
             helper.make_node("Sigmoid", ["h"], ["s"], name="sig"),
             helper.make_node("Gemm", ["s", "B1"], ["y"], name="fc1")]
    model = make(nodes, [("x", [3, 10])], [("y", [3, 5])], inits)
    result = apply(model, ["fc0"], {"sparsity": 0.5, "structured": True})
    removed = result.details["fc0"]["removed_channels"]
    b1 = inits["B1"].copy()
    b1[removed] = 0
    x = arr(3, 10)
    np.testing.assert_allclose(run(result.model, {"x": x})[0],
                               run(with_weight(model, "B1", b1), {"x": x})[0],
                               rtol=1e-4, atol=1e-4)


def test_structured_skip_reasons() -> None:
    inits = {"W1": arr(8, 4, 3, 3), "W2": arr(8, 8, 3, 3), "W3": arr(8, 8, 1, 1),
             "W4": arr(8, 8, 1, 1), "shape": np.array([1, 8, 36], np.int64)}
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["res"], name="add3"),  # residual
        helper.make_node("Conv", ["res", "W3"], ["c3"], name="conv3"),
        helper.make_node("Conv", ["c3", "W3"], ["c4"], name="conv4"),  # shares W3
        helper.make_node("Conv", ["c4", "W4"], ["c5"], name="conv5"),
        helper.make_node("Reshape", ["c5", "shape"], ["flat"], name="reshape"),
        helper.make_node("Conv", ["c4", "dynw"], ["c6"], name="dynamic"),
    ]
    model = make(nodes, [("x", [1, 4, 6, 6]), ("dynw", [4, 8, 1, 1])],
                 [("flat", [1, 8, 36]), ("c6", [1, 4, 6, 6])], inits)
    params = {"structured": True}
    result = apply(model, ["conv2", "conv3", "conv5", "dynamic", "conv1"], params)
    assert result.applied == []
    reasons = result.skipped
    assert reasons["conv2"] == ("output channels of 'conv2' flow into Add 'add3', which also "
                                "takes another branch ('r1'); structured pruning would change "
                                "its shape")
    assert "shared with 'conv4'" in reasons["conv3"]
    assert "Reshape 'reshape', which does not reshape them to [batch, channels" in reasons["conv5"]
    assert "computed at run time" in reasons["dynamic"] or "graph input" in reasons["dynamic"]
    assert "Add 'add3'" in reasons["conv1"]
    by_name = {n.name: n for n in model.graph.node}
    assert PASS.check(model, by_name["conv2"]) is None  # unstructured is fine
    assert "another branch" in PASS.check(model, by_name["conv2"], {"structured": True})


def test_structured_graph_output_and_depthwise() -> None:
    inits = {"W": arr(6, 3, 1, 1), "D": arr(6, 1, 3, 3)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Conv", ["c", "D"], ["y"], name="dw", group=6)]
    model = make(nodes, [("x", [1, 3, 5, 5])], [("c", [1, 6, 5, 5]), ("y", [1, 6, 3, 3])],
                 inits)
    result = apply(model, ["conv", "dw"], {"structured": True})
    assert "graph output 'c'" in result.skipped["conv"]
    assert "group=6" in result.skipped["dw"]


def test_structured_swish_pattern_and_two_consumers() -> None:
    """conv → Mul(c, Sigmoid(c)) → two 1×1 convs: every consumer is shrunk."""
    inits = {"W": arr(8, 3, 3, 3), "A": arr(2, 8, 1, 1), "B": arr(3, 8, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
             helper.make_node("Mul", ["c", "s"], ["m"], name="swish"),
             helper.make_node("Conv", ["m", "A"], ["ya"], name="head_a"),
             helper.make_node("Conv", ["m", "B"], ["yb"], name="head_b")]
    model = make(nodes, [("x", [1, 3, 7, 7])], [("ya", [1, 2, 5, 5]), ("yb", [1, 3, 5, 5])],
                 inits)
    result = apply(model, ["conv"], {"structured": True, "sparsity": 0.5})
    removed = result.details["conv"]["removed_channels"]
    reference = model
    for name in ("A", "B"):
        value = inits[name].copy()
        value[:, removed] = 0
        reference = with_weight(reference, name, value)
    feeds = {"x": arr(1, 3, 7, 7)}
    for got, want in zip(run(result.model, feeds), run(reference, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_deterministic_bytes() -> None:
    model = cnn()
    for params in ({"sparsity": 0.6}, {"sparsity": 0.9, "storage": "sparse"},
                   {"structured": True}):
        first = apply(model, ["conv1", "conv2"], params).model.SerializeToString()
        second = apply(model, ["conv1", "conv2"], params).model.SerializeToString()
        assert first == second


def cnn_head(fold: str) -> onnx.ModelProto:
    """Conv → Relu → fold to [N, C·H·W] → Gemm, the head of the article's CNN."""
    inits = {"W1": arr(6, 3, 3, 3), "b1": arr(6), "F": arr(6 * 4 * 4, 5), "fb": arr(5)}
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1")]
    if fold == "flatten":
        nodes.append(helper.make_node("Flatten", ["r1"], ["flat"], name="fold", axis=1))
    else:
        inits["shape"] = np.array([0, -1] if fold == "reshape-1" else [2, 96], np.int64)
        nodes.append(helper.make_node("Reshape", ["r1", "shape"], ["flat"], name="fold"))
    nodes.append(helper.make_node("Gemm", ["flat", "F", "fb"], ["y"], name="fc"))
    return make(nodes, [("x", [2, 3, 6, 6])], [("y", [2, 5])], inits)


@pytest.mark.parametrize("fold", ["flatten", "reshape-1", "reshape-static"])
def test_structured_conv_through_flatten_into_the_head(fold: str) -> None:
    model = cnn_head(fold)
    feeds = {"x": arr(2, 3, 6, 6)}
    result = apply(model, ["conv1"], {"sparsity": 0.5, "structured": True})
    details = result.details["conv1"]
    assert (details["channels_before"], details["channels_after"]) == (6, 3)
    assert details["touched"] == ["conv1", "relu1", "fold", "fc"]
    shapes = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert [3 * 16, 5] in shapes.values()  # the head lost the 16 features of each channel
    if fold == "reshape-static":
        new_shape = next(numpy_helper.to_array(i) for i in result.model.graph.initializer
                         if i.name.startswith("shape"))
        assert new_shape.tolist() == [2, 48]
    assert details["flops_after"] < details["flops_before"]
    # the same as the original with the removed channels' weights and bias zeroed
    zeroed = weight_of(model, "conv1").copy()
    zeroed[details["removed_channels"]] = 0
    bias = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "b1"))
    bias = bias.copy()
    bias[details["removed_channels"]] = 0
    reference = run(with_weight(with_weight(model, "W1", zeroed), "b1", bias), feeds)[0]
    np.testing.assert_allclose(run(result.model, feeds)[0], reference, rtol=1e-4, atol=1e-4)


def test_structured_flatten_that_splits_the_channel_axis_is_refused() -> None:
    model = cnn_head("flatten")
    for node in model.graph.node:
        if node.name == "fold":
            node.attribute[0].i = 2  # [N·C, H·W]: the batch and channels mixed
    model.graph.node[-1].input[1] = "F2"
    model.graph.initializer.append(numpy_helper.from_array(arr(16, 5), "F2"))
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 12
    reason = PASS.check(model, model.graph.node[0], {"structured": True})
    assert "Flatten 'fold', which does not start its flattened dims at the channel axis" in reason
