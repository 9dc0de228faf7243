"""int4-weight's activation-aware scaling (awq) and k-quant, checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from model_builders import run_ort
from opstudio.core import provenance
from opstudio.core.passes import PassContext, get_pass
from opstudio.core.passes import _awq as awq

K, N = 128, 96
# a few input channels carry activations ~30× the rest, as in an LLM's residual stream
LOUD = np.ones(K)
LOUD[[3, 40, 77, 100]] = 30.0


def activations(rng: np.random.Generator, rows: int) -> np.ndarray:
    return (rng.standard_normal((rows, K)) * LOUD).astype(np.float32)


def normed_block(rng: np.random.Generator, *, extra_reader: bool = False) -> onnx.ModelProto:
    """x → Mul(x, g) (an RMSNorm's weight) → q and k projections (sharing their input);
    with ``extra_reader`` the normed tensor is also a graph output, so the scale can't be
    folded into g."""
    g = (1.0 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    inits = [numpy_helper.from_array(g, "g")]
    nodes = [helper.make_node("Mul", ["x", "g"], ["normed"], name="norm_mul")]
    outputs = []
    for name in ("q", "k"):
        w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
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
