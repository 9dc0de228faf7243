"""int8-dynamic and int8-static on small models: the rewritten graph, provenance, numerics."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from opstudio.core.errors import OpstudioError
from opstudio.core.model import provenance
from opstudio.core.passes import PassContext, get_pass

RNG = np.random.default_rng(0)


def cnn_mlp(opset: int = 17) -> onnx.ModelProto:
    """x[1,4,8,8] → conv0 → relu0 → flat0 → mm0 → add0 → mm1 → y[1,6]."""
    inits = [
        numpy_helper.from_array(RNG.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3, "W"),
        numpy_helper.from_array(RNG.standard_normal(8).astype(np.float32) * 0.1, "B"),
        numpy_helper.from_array(RNG.standard_normal((288, 32)).astype(np.float32) * 0.1, "M0"),
        numpy_helper.from_array(RNG.standard_normal(32).astype(np.float32) * 0.1, "b0"),
        numpy_helper.from_array(RNG.standard_normal((32, 6)).astype(np.float32) * 0.3, "M1"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv0"),
        helper.make_node("Relu", ["c"], ["r"], name="relu0"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat0"),
        helper.make_node("MatMul", ["f", "M0"], ["h"], name="mm0"),
        helper.make_node("Add", ["h", "b0"], ["h2"], name="add0"),
        helper.make_node("MatMul", ["h2", "M1"], ["y"], name="mm1"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", 1, [1, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def sample(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)}


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def rel_error(ref: np.ndarray, new: np.ndarray) -> float:
    return float(np.linalg.norm(new - ref) / np.linalg.norm(ref))


def new_nodes(before: onnx.ModelProto, after: onnx.ModelProto) -> list[onnx.NodeProto]:
    names = {n.name for n in before.graph.node}
    return [n for n in after.graph.node if n.name not in names]


def calibration(n: int = 8) -> PassContext:
    return PassContext(inputs=[sample(100 + k) for k in range(n)])


def test_dynamic_rewrites_only_the_chosen_matmul():
    model = cnn_mlp()
    result = get_pass("int8-dynamic").apply(model, ["mm0"], {}, PassContext())
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert result.applied == ["mm0"] and result.skipped == {}
    ops = {n.name: n.op_type for n in out.graph.node}
    assert ops["mm0_quant"] == "MatMulInteger"
    assert "DynamicQuantizeLinear" in ops.values()
    # untouched nodes keep their name and type
    for name, op in [("conv0", "Conv"), ("relu0", "Relu"), ("mm1", "MatMul"), ("add0", "Add")]:
        assert ops[name] == op
    created = new_nodes(model, out)
    assert created and all(provenance.get_origin(n) == ["mm0"] for n in created)
    assert len({n.name for n in out.graph.node}) == len(out.graph.node)
    details = result.details["mm0"]
    assert details["bytes_before"] == 288 * 32 * 4
    assert details["bytes_after"] < details["bytes_before"] / 3
    x = sample(1)
    assert rel_error(run(model, x), run(out, x)) < 0.05
    # the input model is untouched
    assert [n.name for n in model.graph.node] == ["conv0", "relu0", "flat0", "mm0", "add0", "mm1"]


def test_dynamic_conv_and_matmul_per_channel():
    model = cnn_mlp()
    result = get_pass("int8-dynamic").apply(model, ["conv0", "mm0"], {"per_channel": True},
                                            PassContext())
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert "ConvInteger" in ops and "MatMulInteger" in ops
    for node in new_nodes(model, out):
        assert provenance.get_origin(node) in (["conv0"], ["mm0"]), node.name
    x = sample(2)
    assert rel_error(run(model, x), run(out, x)) < 0.05


def test_dynamic_check_refuses_unsupported_ops():
    model = cnn_mlp()
    node = helper.make_node("Add", ["a", "b"], ["c"], name="n")
    assert "handles Conv, Gemm, MatMul, not Add" in get_pass("int8-dynamic").check(model, node)
    gemm = helper.make_node("Gemm", ["f", "M0"], ["c"], name="g", transA=1)
    reason = get_pass("int8-dynamic").check(model, gemm)
    assert "transA=1" in reason and "int8-static takes it" in reason


def test_dynamic_gemm_is_quantized_as_matmul():
    weight = RNG.standard_normal((8, 32)).astype(np.float32)  # [N, K], used with transB=1
    bias = RNG.standard_normal(8).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "Wg", "bg"], ["y"], name="fc", transB=1, alpha=0.5,
                            beta=2.0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [4, 32])],
                              [helper.make_tensor_value_info("y", 1, [4, 8])],
                              [numpy_helper.from_array(weight, "Wg"),
                               numpy_helper.from_array(bias, "bg")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = get_pass("int8-dynamic").apply(model, ["fc"], {}, PassContext())
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert result.applied == ["fc"]
    assert any("Gemm" in note for note in result.notes)
    ops = [n.op_type for n in out.graph.node]
    assert "MatMulInteger" in ops and "Gemm" not in ops
    assert all(provenance.get_origin(n) == ["fc"] for n in out.graph.node)
    assert result.details["fc"]["bytes_before"] == 8 * 32 * 4
    x = {"x": RNG.standard_normal((4, 32)).astype(np.float32)}
    assert rel_error(run(model, x), run(out, x)) < 0.05


def test_dynamic_leaves_the_gemms_it_was_not_asked_to_quantize_alone():
    # onnxruntime's dynamic quantizer rewrites every plain Gemm as MatMul + Add; the ones not
    # chosen must come back as they were, with their names, so that a later step (here the
    # per-channel variant on the other projections) still finds them and profiles charge their
    # time to them, not to the quantized node
    rng = np.random.default_rng(1)
    inits, nodes = [], []
    for i, trans in enumerate((0, 1, 1)):
        shape = (16, 32) if trans else (32, 16)
        inits += [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", ["x", f"W{i}", f"b{i}"], [f"y{i}"], name=f"g{i}",
                                      transB=trans))
    graph = helper.make_graph(nodes, "qkv", [helper.make_tensor_value_info("x", 1, [4, 32])],
                              [helper.make_tensor_value_info(f"y{i}", 1, [4, 16])
                               for i in range(3)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    first = get_pass("int8-dynamic").apply(model, ["g0"], {}, PassContext()).model
    onnx.checker.check_model(first, full_check=True)
    by_name = {n.name: n for n in first.graph.node}
    assert by_name["g1"].op_type == "Gemm" and by_name["g2"].op_type == "Gemm"
    assert provenance.get_origin(by_name["g1"]) == ["g1"]
    assert not any(n.name.startswith(("g1_", "g2_")) for n in first.graph.node)
    second = get_pass("int8-dynamic").apply(first, ["g1", "g2"], {"per_channel": True},
                                            PassContext())
    assert second.applied == ["g1", "g2"]
    out = second.model
    onnx.checker.check_model(out, full_check=True)
    assert "Gemm" not in {n.op_type for n in out.graph.node}
    # the same arithmetic as each variant applied on its own
    x = {"x": rng.standard_normal((4, 32)).astype(np.float32)}
    alone = get_pass("int8-dynamic").apply(model, ["g1", "g2"], {"per_channel": True},
                                           PassContext()).model
    got, want_first, want_rest = run_all(out, x), run_all(first, x), run_all(alone, x)
    np.testing.assert_allclose(got[0], want_first[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1:], want_rest[1:], rtol=1e-5, atol=1e-5)


def run_all(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_check_refuses_a_weight_that_is_not_constant():
    model = cnn_mlp()
    node = helper.make_node("MatMul", ["f", "x"], ["z"], name="mm_act")
    reason = get_pass("int8-dynamic").check(model, node)
    assert "graph input" in reason and "initializer" in reason


def test_weights_in_constant_nodes_are_folded_first():
    weight = RNG.standard_normal((16, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], name="const_w",
                         value=numpy_helper.from_array(weight, "w")),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm0"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 16])],
                              [helper.make_tensor_value_info("y", 1, [2, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert get_pass("int8-dynamic").check(model, model.graph.node[1]) is None
    result = get_pass("int8-dynamic").apply(model, ["mm0"], {}, PassContext())
    onnx.checker.check_model(result.model, full_check=True)
    assert result.applied == ["mm0"]
    assert any("Constant" in note for note in result.notes)
    x = {"x": RNG.standard_normal((2, 16)).astype(np.float32)}
    assert rel_error(run(model, x), run(result.model, x)) < 0.05


def test_static_qdq_around_chosen_nodes():
    model = cnn_mlp()
    result = get_pass("int8-static").apply(model, ["conv0", "mm0"], {"samples": 8},
                                           calibration())
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert result.applied == ["conv0", "mm0"]
    producers = {o: n for n in out.graph.node for o in n.output}
    conv = next(n for n in out.graph.node if n.name == "conv0")
    assert all(producers[i].op_type == "DequantizeLinear" for i in conv.input)
    mm1 = next(n for n in out.graph.node if n.name == "mm1")
    assert mm1.input[1] == "M1"  # the unchosen MatMul keeps its float weight
    created = new_nodes(model, out)
    assert {n.op_type for n in created} == {"QuantizeLinear", "DequantizeLinear"}
    for node in created:
        assert provenance.get_origin(node) in (["conv0"], ["mm0"]), node.name
    assert result.details["conv0"]["calibration_samples"] == 8
    x = sample(3)
    assert rel_error(run(model, x), run(out, x)) < 0.1


def test_static_per_channel_raises_an_old_opset_to_13():
    model = cnn_mlp(opset=12)
    result = get_pass("int8-static").apply(model, ["conv0"], {"per_channel": True, "samples": 8},
                                           calibration(8))
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert next(o.version for o in out.opset_import if o.domain == "") >= 13
    assert any("opset from 12 to 13" in note for note in result.notes)
    w_dq = next(n for n in out.graph.node if n.name == "W_DequantizeLinear")
    assert any(a.name == "axis" for a in w_dq.attribute)
    x = sample(4)
    assert rel_error(run(model, x), run(out, x)) < 0.1


def test_static_calibration_from_npz(tmp_path):
    model = cnn_mlp()
    stacked = np.concatenate([sample(k)["x"] for k in range(5)])[:, None]  # [5, 1, 4, 8, 8]
    path = tmp_path / "calib.npz"
    np.savez(path, x=stacked)
    result = get_pass("int8-static").apply(
        model, ["mm0"], {"calibration": str(path), "samples": 3}, PassContext())
    assert result.details["mm0"]["calibration_samples"] == 3
    single = tmp_path / "one.npz"
    np.savez(single, x=sample(9)["x"])
    result = get_pass("int8-static").apply(model, ["mm0"], {"calibration": str(single)},
                                           PassContext())
    assert result.details["mm0"]["calibration_samples"] == 1
    onnx.checker.check_model(result.model, full_check=True)


def test_static_npz_without_the_input_is_an_error(tmp_path):
    path = tmp_path / "wrong.npz"
    np.savez(path, other=np.zeros(3, np.float32))
    with pytest.raises(OpstudioError, match="no array for model input 'x'"):
        get_pass("int8-static").apply(cnn_mlp(), ["mm0"], {"calibration": str(path)},
                                      PassContext())


@pytest.mark.parametrize(("params", "fragment"), [
    ({"calibration": "data.txt"}, "'random' or an .npz file"),
    ({"calibration": "/nonexistent/calib.npz"}, "does not exist"),
    ({"method": "mse"}, "must be one of"),
    ({"samples": 0}, "at least 1"),
    ({"bits": 8}, "unknown parameter"),
])
def test_static_params_are_validated(params, fragment):
    with pytest.raises(OpstudioError, match=fragment):
        get_pass("int8-static").validate_params(params)


def test_unsupported_named_nodes_are_skipped_with_reasons():
    result = get_pass("int8-dynamic").apply(cnn_mlp(), ["relu0", "nope"], {}, PassContext())
    assert result.applied == []
    assert "not Relu" in result.skipped["relu0"]
    assert result.skipped["nope"] == "no such node"


def test_origin_of_an_already_rewritten_node_is_carried_over():
    model = cnn_mlp()
    for node in model.graph.node:
        if node.name == "mm1":
            provenance.set_origin(node, ["orig_mm"])
    out = get_pass("int8-dynamic").apply(model, ["mm1"], {}, PassContext()).model
    created = new_nodes(model, out)
    assert created and all(provenance.get_origin(n) == ["orig_mm"] for n in created)


def test_random_calibration_without_given_inputs_uses_synthetic_ones():
    result = get_pass("int8-static").apply(cnn_mlp(), ["mm0"], {"samples": 3}, PassContext())
    assert result.details["mm0"]["calibration_samples"] == 3
    onnx.checker.check_model(result.model, full_check=True)


def test_same_input_gives_same_bytes():
    model = cnn_mlp()
    params = {"method": "percentile"}
    a = get_pass("int8-static").apply(model, ["conv0", "mm0"], params, calibration(4)).model
    b = get_pass("int8-static").apply(model, ["conv0", "mm0"], params, calibration(4)).model
    assert a.SerializeToString() == b.SerializeToString()
    c = get_pass("int8-dynamic").apply(model, ["mm0"], {}, PassContext()).model
    d = get_pass("int8-dynamic").apply(model, ["mm0"], {}, PassContext()).model
    assert c.SerializeToString() == d.SerializeToString()


# SmoothQuant ------------------------------------------------------------------------------------

OUTLIERS = [3, 17]  # input features 50× larger than the rest, as in LLM activations


def outlier_input(seed: int, rows: int = 8) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)
    x[:, OUTLIERS] *= 50
    return {"x": x}


def attention_inputs() -> onnx.ModelProto:
    """x → q (MatMul), k (MatMul), v (Gemm transB) and side (MatMul, not chosen) → sum → y.

    side shares q's weight, so the original weight must stay for it.
    """
    rng = np.random.default_rng(1)
    weights = {name: (rng.standard_normal(shape) * 0.1).astype(np.float32)
               for name, shape in (("Wq", (64, 32)), ("Wk", (64, 32)), ("Wv", (32, 64)))}
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["q_out"], name="q"),
        helper.make_node("MatMul", ["x", "Wk"], ["k_out"], name="k"),
        helper.make_node("Gemm", ["x", "Wv"], ["v_out"], name="v", transB=1),
        helper.make_node("MatMul", ["x", "Wq"], ["side_out"], name="side"),
        helper.make_node("Sum", ["q_out", "k_out", "v_out", "side_out"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes, "qkv", [helper.make_tensor_value_info("x", 1, [8, 64])],
        [helper.make_tensor_value_info("y", 1, [8, 32])],
        [numpy_helper.from_array(w, name) for name, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def outlier_mlp() -> onnx.ModelProto:
    """fc1 → relu → fc2 whose input has outlier features; fc1's rows for them are 10× smaller,
    so that (as in a trained LLM) the output does not come from those two features alone."""
    rng = np.random.default_rng(2)
    w1 = (rng.standard_normal((64, 128)) * 0.1).astype(np.float32)
    w1[OUTLIERS] *= 0.1
    w2 = (rng.standard_normal((128, 32)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="act"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        "mlp", [helper.make_tensor_value_info("x", 1, ["batch", 64])],
        [helper.make_tensor_value_info("y", 1, ["batch", 32])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_smoothing_alone_leaves_the_output_unchanged():
    from opstudio.core.passes import _smoothquant as smoothquant
    from opstudio.core.passes._activations import input_stats

    model = attention_inputs()
    chosen = ["q", "k", "v"]
    axes = smoothquant.smoothable(model, chosen)
    assert axes == {"q": 0, "k": 0, "v": 1}
    stats = input_stats(model, chosen, [outlier_input(s) for s in range(4)])
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    created = smoothquant.smooth(smoothed, axes, 0.5, {n: s.abs_max for n, s in stats.items()})
    assert created == {"q_smooth": ["q", "k", "v"]}
    onnx.checker.check_model(smoothed, full_check=True)
    # the weights really moved: the outlier rows of q's weight grew by s > 1
    inits = {i.name: numpy_helper.to_array(i) for i in smoothed.graph.initializer}
    by_name = {n.name: n for n in smoothed.graph.node}
    scaled_q = inits[by_name["q"].input[1]]
    ratio = np.abs(scaled_q).max(axis=1) / np.abs(inits["Wq"]).max(axis=1)
    assert ratio[OUTLIERS].min() > 3 * np.median(ratio)
    for seed in (50, 51):
        feeds = outlier_input(seed)
        ref, new = run(model, feeds), run(smoothed, feeds)
        np.testing.assert_allclose(new, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_smooth_quant_inserts_one_float_mul_per_input_tensor():
    model = attention_inputs()
    ctx = PassContext(inputs=[outlier_input(s) for s in range(4)])
    result = get_pass("int8-static").apply(model, ["q", "k", "v"],
                                           {"samples": 4, "smooth_quant": 0.5}, ctx)
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert sorted(result.applied) == ["k", "q", "v"]
    assert all(result.details[n]["smooth_quant"] == 0.5 for n in result.applied)
    muls = [n for n in out.graph.node if n.op_type == "Mul"]
    assert [m.name for m in muls] == ["q_smooth"]
    assert provenance.get_origin(muls[0]) == ["q", "k", "v"]
    assert muls[0].input[0] == "x"
    producers = {o: n for n in out.graph.node for o in n.output}
    # the Mul stays float: it reads x itself, not a DequantizeLinear output
    assert "x" not in producers
    by_name = {n.name: n for n in out.graph.node}
    assert by_name["side"].input == ["x", "Wq"]  # not chosen: reads x and its own weight
    for name in ("q", "k", "v"):  # chosen: quantized, fed by the smoothed tensor
        dq = producers[by_name[name].input[0]]
        assert dq.op_type == "DequantizeLinear"
        assert producers[producers[dq.input[0]].input[0]].name == "q_smooth"
    assert any("SmoothQuant" in note for note in result.notes)
    feeds = outlier_input(60)
    assert rel_error(run(model, feeds), run(out, feeds)) < 0.05
    again = get_pass("int8-static").apply(model, ["q", "k", "v"],
                                          {"samples": 4, "smooth_quant": 0.5}, ctx).model
    assert again.SerializeToString() == out.SerializeToString()


def test_smooth_quant_lowers_the_error_on_outlier_activations():
    model = outlier_mlp()
    ctx = PassContext(inputs=[outlier_input(s) for s in range(16)])
    errors = {}
    for alpha in (0.0, 0.5):
        out = get_pass("int8-static").apply(model, ["fc1", "fc2"],
                                            {"samples": 16, "smooth_quant": alpha}, ctx).model
        errors[alpha] = np.mean([rel_error(run(model, outlier_input(s)),
                                           run(out, outlier_input(s))) for s in range(100, 108)])
    assert errors[0.5] < 0.5 * errors[0.0], errors


def test_smooth_quant_is_validated_and_off_by_default():
    p = get_pass("int8-static")
    assert p.validate_params({})["smooth_quant"] == 0.0
    with pytest.raises(OpstudioError, match="at most 1"):
        p.validate_params({"smooth_quant": 1.5})
    out = p.apply(outlier_mlp(), ["fc1"], {"samples": 2}, PassContext()).model
    assert not [n for n in out.graph.node if n.op_type == "Mul"]
