"""int4-weight's activation-aware scaling (awq) and k-quant, checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from model_builders import run_ort
from opstudio.core.model import provenance
from opstudio.core.passes import PassContext, get_pass
from opstudio.core.passes import _awq as awq

K, N = 128, 96
# a few input channels carry activations ~30× the rest, as in an LLM's residual stream
LOUD = np.ones(K)
LOUD[[3, 40, 77, 100]] = 30.0


def activations(rng: np.random.Generator, rows: int) -> np.ndarray:
    return (rng.standard_normal((rows, K)) * LOUD).astype(np.float32)


def normed_block(rng: np.random.Generator, *, extra_reader: bool = False,
                 fp16_k: bool = False) -> onnx.ModelProto:
    """x → Mul(x, g) (an RMSNorm's weight) → q and k projections (sharing their input);
    with ``extra_reader`` the normed tensor is also a graph output, so the scale can't be
    folded into g; with ``fp16_k`` k's weight is stored float16 behind a Cast (HF exports)."""
    g = (1.0 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    inits = [numpy_helper.from_array(g, "g")]
    nodes = [helper.make_node("Mul", ["x", "g"], ["normed"], name="norm_mul")]
    outputs = []
    for name in ("q", "k"):
        w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
        if fp16_k and name == "k":
            inits.append(numpy_helper.from_array(w.astype(np.float16), "Wk16"))
            nodes.append(helper.make_node("Cast", ["Wk16"], ["Wk"], name="k_cast",
                                          to=onnx.TensorProto.FLOAT))
        else:
            inits.append(numpy_helper.from_array(w, f"W{name}"))
        node = helper.make_node("MatMul", ["normed", f"W{name}"], [name], name=f"{name}_proj")
        provenance.set_origin(node, [node.name])
        nodes.append(node)
        outputs.append(helper.make_tensor_value_info(name, 1, ["rows", N]))
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("normed", 1, ["rows", K]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["rows", K])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def output_error(model: onnx.ModelProto, out: onnx.ModelProto, x: np.ndarray) -> float:
    ref, new = run_ort(model, {"x": x}), run_ort(out, {"x": x})
    return float(sum(np.linalg.norm(a - b) ** 2 for a, b in zip(ref, new))
                 / sum(np.linalg.norm(a) ** 2 for a in ref))


@pytest.fixture
def calibration(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=activations(np.random.default_rng(5), 256))
    return str(path)


def test_search_prefers_scaling_loud_channels_and_never_predicts_worse_than_rounding():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)) / np.sqrt(K)
    x = activations(rng, 512).astype(np.float64)
    found = awq.search([w], np.abs(x).mean(axis=0), x.T @ x, 32, symmetric=False)
    assert found.alpha > 0 and found.error < 0.7 * found.plain
    # isotropic inputs: nothing to gain, and α = 0 (no scaling) is what it keeps or beats
    iso = rng.standard_normal((512, K))
    flat = awq.search([w], np.abs(iso).mean(axis=0), iso.T @ iso, 32, symmetric=False)
    assert flat.error <= flat.plain


def test_search_on_strided_columns_of_a_wide_weight_picks_the_same_alpha(monkeypatch):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((K, 2048)) / np.sqrt(K)
    x = activations(rng, 512).astype(np.float64)
    args = (np.abs(x).mean(axis=0), x.T @ x, 32)
    full = awq.search([w], *args, symmetric=False)
    monkeypatch.setattr(awq, "SEARCH_COLUMNS", 256)
    strided = awq.search([w], *args, symmetric=False)
    assert strided.alpha == full.alpha
    assert strided.error / strided.plain == pytest.approx(full.error / full.plain, rel=0.1)


def test_round_blocks_matches_onnxruntime_matmulnbits():
    from opstudio.core.passes.quantize_int4 import PASS

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", 1, [K, K])],
        [helper.make_tensor_value_info("y", 1, [K, N])], [numpy_helper.from_array(w, "W")]),
        opset_imports=[helper.make_opsetid("", 17)])
    eye = np.eye(K, dtype=np.float32)
    for symmetric in (True, False):
        out = PASS.apply(model, ["mm"], {"symmetric": symmetric, "accuracy_level": 1},
                         PassContext()).model
        restored = run_ort(out, {"x": eye})[0]  # I·Ŵ is the dequantized weight
        mine = awq.round_blocks(w.astype(np.float64), 32, symmetric)
        # the same grid up to ties: almost every weight lands on the same level
        assert np.mean(np.isclose(restored, mine, atol=1e-6)) > 0.97


def test_awq_folds_the_scale_into_the_norm_and_beats_plain_rounding(calibration):
    rng = np.random.default_rng(1)
    model = normed_block(rng)
    held_out = activations(np.random.default_rng(9), 64)
    params = {"symmetric": False, "accuracy_level": 1}
    plain = get_pass("int4-weight").apply(model, ["q_proj", "k_proj"], params, PassContext())
    result = get_pass("int4-weight").apply(
        model, ["q_proj", "k_proj"],
        {**params, "algorithm": "awq", "calibration": calibration, "samples": 1},
        PassContext())
    assert result.applied == ["q_proj", "k_proj"]
    onnx.checker.check_model(result.model, full_check=True)
    # one scale for the shared input, divided out of the norm's weight: no node added
    ops = sorted(n.op_type for n in result.model.graph.node)
    assert ops == ["MatMulNBits", "MatMulNBits", "Mul"]
    alphas = {result.details[n]["awq_alpha"] for n in ("q_proj", "k_proj")}
    assert len(alphas) == 1 and alphas.pop() > 0
    assert any("AWQ scaled the inputs of 2" in note for note in result.notes)
    assert output_error(model, result.model, held_out) \
        < 0.7 * output_error(model, plain.model, held_out)


def test_awq_inserts_a_mul_when_the_input_has_other_readers(calibration):
    rng = np.random.default_rng(1)
    model = normed_block(rng, extra_reader=True)
    result = get_pass("int4-weight").apply(
        model, ["q_proj"], {"algorithm": "awq", "calibration": calibration, "samples": 1,
                            "accuracy_level": 1}, PassContext())
    out = result.model
    added = [n for n in out.graph.node if n.name.endswith("_awq")]
    assert len(added) == 1 and added[0].op_type == "Mul"
    assert provenance.get_origin(added[0]) == ["q_proj"]
    x = activations(np.random.default_rng(2), 8)
    ref, new = run_ort(model, {"x": x}), run_ort(out, {"x": x})
    # the norm's own output is untouched; the unchosen k projection is exact
    np.testing.assert_allclose(new[2], ref[2], rtol=1e-6)
    np.testing.assert_allclose(new[1], ref[1], rtol=1e-5, atol=1e-6)
    assert output_error(model, out, x) < 0.05


def test_awq_on_q_alone_scales_k_too_so_the_norm_takes_the_scale(calibration):
    """A plan rounds q in INT4 and leaves k to another step: k's weight rows take the scale
    (still stored float16 behind its Cast) and nothing is inserted between norm and
    projections."""
    rng = np.random.default_rng(1)
    model = normed_block(rng, fp16_k=True)
    result = get_pass("int4-weight").apply(
        model, ["q_proj"], {"algorithm": "awq", "calibration": calibration, "samples": 1,
                            "accuracy_level": 1}, PassContext())
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert result.details["q_proj"]["awq_alpha"] > 0
    assert sorted(n.op_type for n in out.graph.node) == ["Cast", "MatMul", "MatMulNBits", "Mul"]
    assert not any(n.name.endswith("_awq") for n in out.graph.node)
    k_weight = next(n for n in out.graph.node if n.op_type == "Cast").input[0]
    assert next(i for i in out.graph.initializer if i.name == k_weight).data_type \
        == onnx.TensorProto.FLOAT16
    assert {i.name for i in out.graph.initializer}.isdisjoint({"g", "Wk16"})
    assert any("1 other reader(s)" in note and "k_proj" in note for note in result.notes)
    x = activations(np.random.default_rng(2), 8)
    ref, new = run_ort(model, {"x": x}), run_ort(out, {"x": x})
    # k is the same product up to float16 storage of its scaled rows
    np.testing.assert_allclose(new[1], ref[1], rtol=0, atol=2e-3 * np.abs(ref[1]).max())
    assert output_error(model, out, x) < 0.05


def test_awq_divides_the_scale_out_of_a_fused_norms_gamma(calibration):
    """onnxruntime-genai exports: the projections read SkipSimplifiedLayerNormalization's
    output 0; γ takes 1/s, the residual sum (output 3) stays as it was."""
    rng = np.random.default_rng(3)
    gamma = (1.0 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    norm = helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"],
                            ["normed", "", "", "sum"], name="norm", domain="com.microsoft",
                            epsilon=1e-6)
    mm = helper.make_node("MatMul", ["normed", "W"], ["y"], name="qkv_proj")
    graph = helper.make_graph(
        [norm, mm], "g",
        [helper.make_tensor_value_info(n, 1, [1, "rows", K]) for n in ("x", "skip")],
        [helper.make_tensor_value_info("y", 1, [1, "rows", N]),
         helper.make_tensor_value_info("sum", 1, [1, "rows", K])],
        [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    x = activations(np.random.default_rng(5), 256)[None]
    path = calibration.replace("calib", "calib_skip")
    np.savez(path, x=x, skip=np.zeros_like(x))
    result = get_pass("int4-weight").apply(
        model, ["qkv_proj"], {"algorithm": "awq", "calibration": path, "samples": 1,
                              "accuracy_level": 1}, PassContext())
    out = result.model
    assert result.details["qkv_proj"]["awq_alpha"] > 0
    assert sorted(n.op_type for n in out.graph.node) == ["MatMulNBits",
                                                         "SkipSimplifiedLayerNormalization"]
    assert "gamma" not in {i.name for i in out.graph.initializer}
    feeds = {"x": activations(np.random.default_rng(8), 16)[None],
             "skip": rng.standard_normal((1, 16, K)).astype(np.float32)}
    ref, new = run_ort(model, feeds), run_ort(out, feeds)
    np.testing.assert_array_equal(new[1], ref[1])
    assert np.linalg.norm(new[0] - ref[0]) < 0.1 * np.linalg.norm(ref[0])


def test_k_quant_writes_zero_points_and_stays_close():
    rng = np.random.default_rng(4)
    model = normed_block(rng)
    result = get_pass("int4-weight").apply(model, ["q_proj"], {"algorithm": "k_quant"},
                                           PassContext())
    assert result.applied == ["q_proj"] and result.details["q_proj"]["algorithm"] == "k_quant"
    assert result.details["q_proj"]["symmetric"] is False  # k-quant always has zero points
    nbits = next(n for n in result.model.graph.node if n.op_type == "MatMulNBits")
    assert len(nbits.input) >= 4 and nbits.input[3]  # asymmetric: a zero-point input
    zero_points = next(i for i in result.model.graph.initializer if i.name == nbits.input[3])
    assert zero_points.data_type == onnx.TensorProto.UINT8  # what the fast kernels read
    x = activations(np.random.default_rng(6), 16)
    assert output_error(model, result.model, x) < 0.02
