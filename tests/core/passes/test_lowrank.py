"""lowrank: SVD factorization of MatMul/Gemm/Conv weights, checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from model_builders import apply_pass, run_ort
from opstudio.core.errors import OpstudioError
from opstudio.core.model import provenance
from opstudio.core.model.graph import analyze
from opstudio.core.passes import get_pass
from opstudio.core.passes.lowrank import PASS, choose_rank

RNG = np.random.default_rng(7)


def arr(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def make(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, 1, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, 1, s) for n, s in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


run = run_ort


def apply(model: onnx.ModelProto, nodes: list[str], params: dict):
    return apply_pass(PASS, model, nodes, params)


def matmul_model(k: int = 24, n: int = 16, constant_node: bool = False) -> onnx.ModelProto:
    weight = arr(k, n)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm0")]
    inits = {"W": weight}
    if constant_node:  # how Paddle exports keep their weights
        nodes.insert(0, helper.make_node("Constant", [], ["W"], name="w_const",
                                         value=numpy_helper.from_array(weight, "W")))
        inits = {}
    return make(nodes, [("x", [3, 5, k])], [("y", [3, 5, n])], inits)


def test_registered_and_params() -> None:
    assert get_pass("lowrank") is PASS
    calibration = {"calibration": "random", "samples": 8, "alpha": 0.5}
    assert PASS.validate_params({}) == {"rank": None, "energy": 0.9, "method": "svd",
                                        **calibration}
    assert PASS.validate_params({"rank": 4}) == {"rank": 4, "energy": None, "method": "svd",
                                                 **calibration}
    assert PASS.validate_params({"energy": 0.5, "method": "tucker2"}) == {
        "rank": None, "energy": 0.5, "method": "tucker2", **calibration}
    with pytest.raises(OpstudioError, match="method"):
        PASS.validate_params({"method": "cp"})
    with pytest.raises(OpstudioError, match="not both"):
        PASS.validate_params({"rank": 4, "energy": 0.5})
    with pytest.raises(OpstudioError, match="energy"):
        PASS.validate_params({"energy": 0.0})
    with pytest.raises(OpstudioError, match="at least 1"):
        PASS.validate_params({"rank": 0})
    with pytest.raises(OpstudioError, match="unknown"):
        PASS.validate_params({"ranks": 3})


@pytest.mark.parametrize("constant_node", [False, True])
def test_matmul_full_rank_is_exact(constant_node: bool) -> None:
    model = matmul_model(constant_node=constant_node)
    x = arr(3, 5, 24)
    result = apply(model, ["mm0"], {"rank": 16})
    assert result.applied == ["mm0"]
    nodes = list(result.model.graph.node)
    assert [(n.name, n.op_type) for n in nodes] == [("mm0_lowrank_a", "MatMul"),
                                                    ("mm0_lowrank_b", "MatMul")]
    assert all(provenance.get_origin(n) == ["mm0"] for n in nodes)
    shapes = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert shapes == {"mm0_lowrank_a_weight": [24, 16], "mm0_lowrank_b_weight": [16, 16]}
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)
    details = result.details["mm0"]
    assert details["rank"] == 16 and details["rel_error"] < 1e-6
    assert details["params_before"] == 24 * 16 and details["params_after"] == 16 * 40
    assert any("more parameters" in note for note in result.notes)


def test_gemm_transposes_alpha_beta_bias_full_rank_exact() -> None:
    inits = {"B": arr(10, 12), "C": arr(10)}
    gemm = helper.make_node("Gemm", ["a", "B", "C"], ["y"], name="fc", transA=1, transB=1,
                            alpha=0.7, beta=1.9)
    model = make([gemm], [("a", [12, 4])], [("y", [4, 10])], inits)
    feeds = {"a": arr(12, 4)}
    result = apply(model, ["fc"], {"rank": 10})
    a, b = result.model.graph.node
    assert (a.op_type, b.op_type) == ("Gemm", "Gemm")
    assert list(b.input)[2] == "C"
    np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0],
                               rtol=1e-4, atol=1e-4)


def test_gemm_without_transposes_uses_matmul_then_gemm() -> None:
    inits = {"B": arr(12, 10), "C": arr(1, 10)}
    gemm = helper.make_node("Gemm", ["a", "B", "C"], ["y"], name="fc", alpha=2.0, beta=0.5)
    model = make([gemm], [("a", [4, 12])], [("y", [4, 10])], inits)
    feeds = {"a": arr(4, 12)}
    result = apply(model, ["fc"], {"rank": 10})
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Gemm"]
    np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0],
                               rtol=1e-4, atol=1e-4)


def conv_model() -> onnx.ModelProto:
    inits = {"K": arr(8, 3, 3, 3), "kb": arr(8)}
    conv = helper.make_node("Conv", ["img", "K", "kb"], ["y"], name="conv",
                            strides=[2, 2], pads=[1, 0, 1, 2], dilations=[1, 1])
    return make([conv], [("img", [2, 3, 9, 9])], [("y", [2, 8, 5, 5])], inits)


def test_conv_full_rank_exact_with_pads_and_strides() -> None:
    model = conv_model()
    feeds = {"img": arr(2, 3, 9, 9)}
    result = apply(model, ["conv"], {"rank": 8})
    first, second = result.model.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in first.attribute}
    assert attrs["strides"] == [2, 2] and attrs["pads"] == [1, 0, 1, 2]
    shapes = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert shapes["conv_lowrank_a_weight"] == [8, 3, 3, 3]
    assert shapes["conv_lowrank_b_weight"] == [8, 8, 1, 1]
    assert list(second.input)[2] == "kb"
    np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0],
                               rtol=1e-4, atol=1e-4)


def test_conv_low_rank_error_and_flops_match_analysis() -> None:
    model = conv_model()
    weight = numpy_helper.to_array(model.graph.initializer[0]).reshape(8, -1)
    result = apply(model, ["conv"], {"rank": 3})
    details = result.details["conv"]
    s = np.linalg.svd(weight.astype(np.float64), compute_uv=False)
    assert details["rel_error"] == pytest.approx(np.sqrt((s[3:] ** 2).sum() / (s ** 2).sum()),
                                                 rel=1e-5)
    # the FLOPs the pass reports are the ones the graph analysis finds in the rewritten model
    assert details["flops_before"] == analyze(model).total_flops()
    assert details["flops_after"] == analyze(result.model).total_flops()
    assert details["flops_after"] < details["flops_before"]
    assert details["params_after"] == 3 * (8 + 27) + 8


def test_lower_rank_reconstruction_error_in_outputs() -> None:
    model = matmul_model(k=32, n=32)
    x = arr(3, 5, 32)
    weight = numpy_helper.to_array(model.graph.initializer[0])
    result = apply(model, ["mm0"], {"rank": 8})
    u, s, vt = np.linalg.svd(weight.astype(np.float64), full_matrices=False)
    reference = x @ ((u[:, :8] * s[:8]) @ vt[:8])
    np.testing.assert_allclose(run(result.model, {"x": x})[0], reference, rtol=1e-3, atol=1e-3)
    expected = np.sqrt((s[8:] ** 2).sum() / (s ** 2).sum())
    assert result.details["mm0"]["rel_error"] == pytest.approx(expected, rel=1e-5)
    assert result.details["mm0"]["params_after"] == 8 * 64 < 32 * 32
    assert result.details["mm0"]["flops_after"] == 2 * 15 * 8 * 64
    assert not result.notes


def test_energy_picks_the_smallest_rank_keeping_it() -> None:
    # singular values 8, 4, 2, 1, 0.5…: energies 64/85.3, 80/85.3, 84/85.3 …
    s = np.array([8, 4, 2, 1, 0.5, 0.25, 0.125, 0.0625])
    assert choose_rank(s, None, 0.70) == 1
    assert choose_rank(s, None, 0.80) == 2
    assert choose_rank(s, None, 0.98) == 3
    assert choose_rank(s, None, 1.0) == 8
    assert choose_rank(s, 20, None) == 8
    q1, _ = np.linalg.qr(RNG.standard_normal((40, 40)))
    q2, _ = np.linalg.qr(RNG.standard_normal((40, 40)))
    weight = (q1[:, :8] * s) @ q2[:8]  # a 40×40 weight with exactly those singular values
    model = make([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm0")],
                 [("x", [2, 40])], [("y", [2, 40])], {"W": weight.astype(np.float32)})
    result = apply(model, ["mm0"], {"energy": 0.95})
    details = result.details["mm0"]
    assert details["rank"] == 3 and details["energy_kept"] >= 0.95
    assert [list(i.dims) for i in result.model.graph.initializer] == [[40, 3], [3, 40]]


def test_energy_that_would_grow_the_weight_is_refused() -> None:
    model = matmul_model(k=6, n=6)  # a random 6×6 weight needs ~5 of 6 ranks for 90%
    result = apply(model, ["mm0"], {})
    assert result.applied == []
    assert "would need" in result.skipped["mm0"] and "6×6" in result.skipped["mm0"]


def test_skip_reasons() -> None:
    inits = {"W": arr(8, 8), "V": arr(8, 1), "G": arr(4, 1, 3, 3)}
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="shared_a"),
        helper.make_node("MatMul", ["h", "W"], ["h2"], name="shared_b"),
        helper.make_node("MatMul", ["h2", "dyn"], ["h3"], name="dynamic"),
        helper.make_node("MatMul", ["h3", "V"], ["v"], name="vector"),
        helper.make_node("Relu", ["h3"], ["r"], name="relu"),
        helper.make_node("Conv", ["img", "G"], ["c"], name="depthwise", group=4),
    ]
    model = make(nodes, [("x", [2, 8]), ("dyn", [8, 8]), ("img", [1, 4, 6, 6])],
                 [("v", [2, 1]), ("r", [2, 8]), ("c", [1, 4, 4, 4])], inits)
    by_name = {n.name: n for n in model.graph.node}
    assert "computed at run time" in PASS.check(model, by_name["dynamic"])
    assert "rank 1 at most" in PASS.check(model, by_name["vector"])
    assert "not Relu" in PASS.check(model, by_name["relu"])
    assert "group=4" in PASS.check(model, by_name["depthwise"])
    assert PASS.check(model, by_name["shared_a"]) is None
    # a shared weight stays for the node that still uses it
    result = apply(model, ["shared_a", "dynamic", "missing"], {"rank": 2})
    assert result.applied == ["shared_a"]
    assert set(result.skipped) == {"dynamic", "missing"}
    assert "W" in {i.name for i in result.model.graph.initializer}
    feeds = {"x": arr(2, 8), "dyn": arr(8, 8), "img": arr(1, 4, 6, 6)}
    assert run(result.model, feeds)[1].shape == (2, 8)


def test_unused_weight_and_constant_node_are_removed() -> None:
    model = matmul_model(constant_node=True)
    result = apply(model, ["mm0"], {"rank": 4})
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "MatMul"]
    assert "W" not in {i.name for i in result.model.graph.initializer}


def test_deterministic_bytes() -> None:
    model = conv_model()
    for method in ("svd", "tucker2"):
        params = {"energy": 0.8, "method": method}
        first = apply(model, ["conv"], params).model.SerializeToString()
        second = apply(model, ["conv"], params).model.SerializeToString()
        assert first == second


def test_chained_provenance_keeps_the_first_origin() -> None:
    model = matmul_model(k=32, n=32)
    once = apply(model, ["mm0"], {"rank": 8}).model
    twice = apply(once, ["mm0_lowrank_b"], {"rank": 4}).model
    assert {tuple(provenance.get_origin(n)) for n in twice.graph.node} == {("mm0",)}


def test_weight_filled_by_constant_of_shape() -> None:
    """Older exports fill weights with ConstantOfShape of a constant shape: still a constant."""
    nodes = [
        helper.make_node("Constant", [], ["wshape"], name="shape_const",
                         value=numpy_helper.from_array(np.array([6, 4], np.int64))),
        helper.make_node("ConstantOfShape", ["wshape"], ["W"], name="fill",
                         value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("MatMul", ["x", "W"], ["y"], name="mm0"),
    ]
    model = make(nodes, [("x", [2, 6])], [("y", [2, 4])], {})
    result = apply(model, ["mm0"], {"rank": 1})
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "MatMul"]
    assert result.details["mm0"]["rel_error"] < 1e-6  # a constant fill has rank 1
    x = arr(2, 6)
    np.testing.assert_allclose(run(result.model, {"x": x})[0], x @ np.full((6, 4), 0.5),
                               rtol=1e-5, atol=1e-5)


def test_flops_with_a_symbolic_batch_are_per_sample() -> None:
    model = make([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm0")],
                 [("x", ["batch", 32])], [("y", ["batch", 16])], {"W": arr(32, 16)})
    details = apply(model, ["mm0"], {"rank": 4}).details["mm0"]
    assert details["flops_dims"] == {"batch": 1}
    assert (details["flops_before"], details["flops_after"]) == (2 * 32 * 16, 2 * 4 * 48)


def channel_conv_model(m: int = 12, c: int = 10) -> onnx.ModelProto:
    inits = {"K": arr(m, c, 3, 3), "kb": arr(m)}
    conv = helper.make_node("Conv", ["img", "K", "kb"], ["y"], name="conv",
                            strides=[2, 2], pads=[1, 0, 1, 2], dilations=[1, 1])
    return make([conv], [("img", [2, c, 9, 9])], [("y", [2, m, 5, 5])], inits)


def _kernel_from_tucker_nodes(model: onnx.ModelProto) -> np.ndarray:
    """The kernel the three convs of a Tucker-2 rewrite compute together, as [M, C, kh, kw]."""
    weights = {i.name: numpy_helper.to_array(i).astype(np.float64)
               for i in model.graph.initializer}
    first, core, last = model.graph.node
    u_in = weights[first.input[1]][:, :, 0, 0]  # [r_in, C]
    g = weights[core.input[1]]  # [r_out, r_in, kh, kw]
    u_out = weights[last.input[1]][:, :, 0, 0]  # [M, r_out]
    return np.einsum("mo,oihw,ic->mchw", u_out, g, u_in)


def test_tucker2_full_rank_is_exact_and_keeps_the_geometry_on_the_core() -> None:
    model = channel_conv_model()
    feeds = {"img": arr(2, 10, 9, 9)}
    result = apply(model, ["conv"], {"rank": 12, "method": "tucker2"})
    first, core, last = result.model.graph.node
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute}
             for n in (first, core, last)]
    assert attrs[0] == {"kernel_shape": [1, 1]} and attrs[2] == {"kernel_shape": [1, 1]}
    assert attrs[1]["strides"] == [2, 2] and attrs[1]["pads"] == [1, 0, 1, 2]
    assert list(last.input)[2] == "kb"
    shapes = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert shapes[first.input[1]] == [10, 10, 1, 1]
    assert shapes[core.input[1]] == [12, 10, 3, 3]
    assert shapes[last.input[1]] == [12, 12, 1, 1]
    details = result.details["conv"]
    assert (details["method"], details["rank_out"], details["rank_in"]) == ("tucker2", 12, 10)
    assert details["rel_error"] < 1e-6
    assert {tuple(provenance.get_origin(n)) for n in result.model.graph.node} == {("conv",)}
    np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0],
                               rtol=1e-4, atol=1e-4)


def test_tucker2_low_rank_beats_truncated_hosvd_and_reports_what_the_graph_holds() -> None:
    model = channel_conv_model()
    kernel = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    result = apply(model, ["conv"], {"rank": 4, "method": "tucker2"})
    details = result.details["conv"]
    approx = _kernel_from_tucker_nodes(result.model)
    error = np.linalg.norm(approx - kernel) / np.linalg.norm(kernel)
    assert details["rel_error"] == pytest.approx(error, rel=1e-4)
    # the refined factors are no worse than the plain truncated HOSVD they start from
    u_out = np.linalg.svd(kernel.reshape(12, -1), full_matrices=False)[0][:, :4]
    u_in = np.linalg.svd(kernel.transpose(1, 0, 2, 3).reshape(10, -1),
                         full_matrices=False)[0][:, :4]
    core = np.einsum("mchw,mo,ci->oihw", kernel, u_out, u_in)
    hosvd = np.einsum("oihw,mo,ci->mchw", core, u_out, u_in)
    assert error <= np.linalg.norm(hosvd - kernel) / np.linalg.norm(kernel) + 1e-9
    # the rewritten model computes exactly the conv with that kernel
    feeds = {"img": arr(2, 10, 9, 9)}
    reference = make([model.graph.node[0]], [("img", [2, 10, 9, 9])], [("y", [2, 12, 5, 5])],
                     {"K": approx.astype(np.float32),
                      "kb": numpy_helper.to_array(model.graph.initializer[1])})
    np.testing.assert_allclose(run(result.model, feeds)[0], run(reference, feeds)[0],
                               rtol=1e-4, atol=1e-4)
    assert details["flops_before"] == analyze(model).total_flops()
    assert details["flops_after"] == analyze(result.model).total_flops()
    assert details["params_after"] == 10 * 4 + 4 * 4 * 9 + 4 * 12 + 12
    # at equal rank, fewer FLOPs than the SVD form, which keeps every input channel
    svd = apply(model, ["conv"], {"rank": 4}).details["conv"]
    assert details["flops_after"] < svd["flops_after"]


def test_tucker2_leaves_matrices_to_svd_and_refuses_energy_that_would_grow() -> None:
    mm = apply(matmul_model(k=32, n=32), ["mm0"], {"rank": 8, "method": "tucker2"})
    assert mm.details["mm0"]["method"] == "svd" and mm.details["mm0"]["rank"] == 8
    pointwise = make([helper.make_node("Conv", ["img", "P"], ["y"], name="pw")],
                     [("img", [1, 16, 4, 4])], [("y", [1, 16, 4, 4])], {"P": arr(16, 16, 1, 1)})
    assert apply(pointwise, ["pw"], {"rank": 4, "method": "tucker2"}
                 ).details["pw"]["method"] == "svd"
    grown = apply(channel_conv_model(4, 3), ["conv"], {"energy": 0.99, "method": "tucker2"})
    assert grown.applied == [] and "channel ranks" in grown.skipped["conv"]
