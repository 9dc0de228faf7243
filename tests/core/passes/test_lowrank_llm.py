"""lowrank with activation-aware methods (svd-llm, asvd), checked against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_builders import apply_pass, run_ort
from opstudio.core.errors import OpstudioError
from opstudio.core.model import provenance
from opstudio.core.passes import PassContext
from opstudio.core.passes.lowrank import PASS

K, H, N = 48, 64, 32


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def anisotropic_mlp(seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    """z → x = z·mix → fc1 → Relu → fc2: fc1's input features span scales e⁻³…e² and are
    correlated, as LLM activations are; z itself is white noise. Also returns ``mix``."""
    rng = np.random.default_rng(seed)
    mix = (rng.standard_normal((K, K)) * np.exp(np.linspace(-3, 2, K))[:, None]).astype(np.float32)
    w1 = (rng.standard_normal((K, H)) / np.sqrt(K)).astype(np.float32)
    w2 = (rng.standard_normal((H, N)) / np.sqrt(H)).astype(np.float32)
    model = make([helper.make_node("MatMul", ["z", "mix"], ["x"], name="mixer"),
                  helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
                  helper.make_node("Relu", ["h"], ["r"], name="act"),
                  helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
                 [("z", ["batch", K])], [("y", ["batch", N])],
                 {"mix": mix, "w1": w1, "w2": w2})
    return model, mix


def white(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, z=white(1, 4, 64, K))  # 4 samples of 64 rows
    return path


def test_params() -> None:
    assert PASS.validate_params({"method": "svd-llm", "rank": 8}) == {
        "rank": 8, "energy": None, "method": "svd-llm", "calibration": "random", "samples": 8,
        "alpha": 0.5}
    with pytest.raises(OpstudioError, match=r"'calibration' must be 'random' or an \.npz"):
        PASS.validate_params({"method": "svd-llm", "calibration": "prompt.txt"})
    with pytest.raises(OpstudioError, match=r"calibration file .*missing\.npz does not exist"):
        PASS.validate_params({"method": "svd-llm", "calibration": "/nowhere/missing.npz"})
    with pytest.raises(OpstudioError, match="'samples' must be at least 1"):
        PASS.validate_params({"method": "svd-llm", "samples": 0})


@pytest.mark.parametrize("method", ["svd-llm", "asvd"])
def test_full_rank_reproduces_the_output(method: str, calib: Path) -> None:
    model, _ = anisotropic_mlp()
    result = apply_pass(PASS, model, ["fc1", "fc2"],
                        {"method": method, "rank": 64, "calibration": str(calib)})
    assert result.applied == ["fc1", "fc2"]
    names = [(n.name, n.op_type) for n in result.model.graph.node]
    assert names == [("mixer", "MatMul"), ("fc1_lowrank_a", "MatMul"),
                     ("fc1_lowrank_b", "MatMul"), ("act", "Relu"),
                     ("fc2_lowrank_a", "MatMul"), ("fc2_lowrank_b", "MatMul")]
    assert provenance.get_origin(result.model.graph.node[1]) == ["fc1"]
    z = white(5, 100, K)
    (expected,), (got,) = run_ort(model, {"z": z}), run_ort(result.model, {"z": z})
    assert rel(got, expected) < 1e-5
    for name, full in (("fc1", min(K, H)), ("fc2", min(H, N))):
        details = result.details[name]
        assert details["method"] == method and details["rank"] == details["full_rank"] == full
        assert details["rel_error"] < 1e-9 and details["output_rel_error"] < 1e-9
        assert details["calibration_rows"] == 4 * 64


def test_svd_llm_beats_plain_svd_on_held_out_inputs(calib: Path) -> None:
    model, _ = anisotropic_mlp()
    z = white(9, 500, K)  # held out: not the calibration samples
    (expected,) = run_ort(model, {"z": z})
    for rank in (8, 16):
        errors = {}
        for method in ("svd", "svd-llm", "asvd"):
            result = apply_pass(PASS, model, ["fc1"],
                                {"method": method, "rank": rank, "calibration": str(calib)})
            assert result.details["fc1"]["rank"] == rank
            errors[method] = rel(run_ort(result.model, {"z": z})[0], expected)
        assert errors["svd-llm"] < 0.5 * errors["svd"], (rank, errors)
        assert errors["asvd"] < errors["svd"], (rank, errors)


def test_reported_errors_are_what_they_say(calib: Path) -> None:
    model, mix = anisotropic_mlp()
    result = apply_pass(PASS, model, ["fc1"],
                        {"method": "svd-llm", "rank": 10, "calibration": str(calib)})
    details = result.details["fc1"]
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    a, b = inits["fc1_lowrank_a_weight"], inits["fc1_lowrank_b_weight"]
    assert a.dtype == b.dtype == np.float32 and a.shape == (K, 10) and b.shape == (10, H)
    w1 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    x = np.load(calib)["z"].reshape(-1, K).astype(np.float64) @ mix
    assert details["output_rel_error"] == pytest.approx(rel(x @ a @ b, x @ w1), rel=1e-4)
    assert details["rel_error"] == pytest.approx(rel(a @ b, w1), rel=1e-4)
    # no ridge: the discarded whitened singular values are the output error, exactly
    assert details["ridge"] == 0.0
    assert details["output_rel_error"] ** 2 == pytest.approx(1 - details["energy_kept"],
                                                             rel=1e-6)


def test_energy_is_measured_on_the_whitened_spectrum(calib: Path) -> None:
    model, _ = anisotropic_mlp()
    llm = apply_pass(PASS, model, ["fc1"],
                     {"method": "svd-llm", "energy": 0.99, "calibration": str(calib)})
    llm_d = llm.details["fc1"]
    # the inputs span few strong directions: 99 % of ‖XW‖² needs a far lower rank than
    # 99 % of ‖W‖², which plain svd refuses since its factors would outgrow W
    svd = apply_pass(PASS, model, ["fc1"], {"energy": 0.99})
    assert "energy 0.99 needs rank 42 of 48" in svd.skipped["fc1"]
    assert llm_d["rank"] < 42 / 2
    assert llm_d["energy_kept"] >= 0.99 and llm_d["output_rel_error"] <= 0.1 + 1e-9
    smaller = apply_pass(PASS, model, ["fc1"], {"method": "svd-llm", "rank": llm_d["rank"] - 1,
                                                "calibration": str(calib)})
    assert smaller.details["fc1"]["energy_kept"] < 0.99


def test_random_calibration_uses_the_given_inputs_first() -> None:
    model, _ = anisotropic_mlp()
    given = {"z": white(3, 30, K)}
    params = PASS.validate_params({"method": "svd-llm", "rank": 8, "samples": 3})
    result = PASS.apply(model, ["fc1"], params, PassContext(inputs=[given]))
    # one given sample of 30 rows, two synthetic ones of the same shape
    assert result.details["fc1"]["calibration_rows"] == 3 * 30
    assert result.applied == ["fc1"]


def test_samples_caps_what_is_read_from_the_file(calib: Path) -> None:
    model, _ = anisotropic_mlp()
    result = apply_pass(PASS, model, ["fc1"], {"method": "svd-llm", "rank": 8, "samples": 2,
                                               "calibration": str(calib)})
    assert result.details["fc1"]["calibration_rows"] == 2 * 64


def test_bad_calibration_files_are_clear_errors(tmp_path: Path) -> None:
    model, _ = anisotropic_mlp()
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, input_ids=np.zeros((1, 4), np.int64))
    params = PASS.validate_params({"method": "svd-llm", "calibration": str(wrong)})
    with pytest.raises(OpstudioError, match="no array for model input 'z'"):
        PASS.apply(model, ["fc1"], params, PassContext())
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    params = PASS.validate_params({"method": "svd-llm", "calibration": str(broken)})
    with pytest.raises(OpstudioError, match=r"not a readable \.npz"):
        PASS.apply(model, ["fc1"], params, PassContext())
    shaped = tmp_path / "shaped.npz"
    np.savez(shaped, z=white(0, 2, 5, K + 1))
    params = PASS.validate_params({"method": "svd-llm", "calibration": str(shaped)})
    with pytest.raises(OpstudioError, match="calibration sample 1"):
        PASS.apply(model, ["fc1"], params, PassContext())


def test_weight_behind_fp16_and_cast(calib: Path) -> None:
    model, _ = anisotropic_mlp()
    w1 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    graph = model.graph
    graph.initializer.remove(next(i for i in graph.initializer if i.name == "w1"))
    graph.initializer.append(numpy_helper.from_array(w1.astype(np.float16), "w1_fp16"))
    graph.node.insert(0, helper.make_node("Cast", ["w1_fp16"], ["w1"], name="w1_cast",
                                          to=TensorProto.FLOAT))
    result = apply_pass(PASS, model, ["fc1"],
                        {"method": "svd-llm", "rank": 48, "calibration": str(calib)})
    assert result.applied == ["fc1"]
    kept = {i.name: i.data_type for i in result.model.graph.initializer}
    assert "w1_fp16" not in kept and "w1_cast" not in {n.name for n in result.model.graph.node}
    assert kept["fc1_lowrank_a_weight"] == kept["fc1_lowrank_b_weight"] == TensorProto.FLOAT
    z = white(5, 50, K)
    assert rel(run_ort(result.model, {"z": z})[0], run_ort(model, {"z": z})[0]) < 1e-5


def test_singular_gram_gets_a_ridge_and_stays_exact_at_full_rank(tmp_path: Path) -> None:
    model, _ = anisotropic_mlp()
    few = tmp_path / "few.npz"
    np.savez(few, z=white(2, 1, 10, K))  # 10 positions for 48 features: XᵀX has rank 10
    result = apply_pass(PASS, model, ["fc1"],
                        {"method": "svd-llm", "rank": 48, "calibration": str(few)})
    details = result.details["fc1"]
    assert details["ridge"] > 0
    assert any("Gram matrix is singular" in note and "10 positions for 48 features" in note
               for note in result.notes)
    z = white(5, 50, K)
    assert rel(run_ort(result.model, {"z": z})[0], run_ort(model, {"z": z})[0]) < 1e-4
    # rank 10 captures everything the 10 calibration positions saw
    low = apply_pass(PASS, model, ["fc1"], {"method": "svd-llm", "rank": 10,
                                            "calibration": str(few)})
    assert low.details["fc1"]["output_rel_error"] < 1e-3


def test_gemm_with_bias_alpha_beta_full_rank(calib: Path) -> None:
    rng = np.random.default_rng(4)
    mix = (rng.standard_normal((K, K)) * np.exp(np.linspace(-3, 2, K))[:, None]).astype(np.float32)
    weight = rng.standard_normal((H, K)).astype(np.float32)  # transB: [N, K]
    bias = rng.standard_normal(H).astype(np.float32)
    model = make([helper.make_node("MatMul", ["z", "mix"], ["x"], name="mixer"),
                  helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", transB=1,
                                   alpha=0.5, beta=2.0)],
                 [("z", [7, K])], [("y", [7, H])], {"mix": mix, "W": weight, "C": bias})
    full = apply_pass(PASS, model, ["gemm"], {"method": "svd-llm", "rank": 48,
                                              "calibration": "random"})
    z = white(6, 7, K)
    assert rel(run_ort(full.model, {"z": z})[0], run_ort(model, {"z": z})[0]) < 1e-5
    assert [n.op_type for n in full.model.graph.node] == ["MatMul", "MatMul", "Gemm"]


def test_what_activation_methods_skip(calib: Path) -> None:
    conv = make([helper.make_node("Conv", ["x", "W"], ["y"], name="conv")],
                [("x", [1, 4, 6, 6])], [("y", [1, 8, 6, 6])],
                {"W": white(0, 8, 4, 1, 1)})
    result = PASS.apply(conv, ["conv"], PASS.validate_params({"method": "svd-llm", "rank": 2}),
                        PassContext())
    assert result.applied == [] and "Conv takes method svd or tucker2" in result.skipped["conv"]
    gemm = make([helper.make_node("Gemm", ["x", "W"], ["y"], name="gemm", transA=1)],
                [("x", [K, 5])], [("y", [5, H])], {"W": white(0, K, H)})
    result = PASS.apply(gemm, ["gemm"], PASS.validate_params({"method": "asvd", "rank": 2}),
                        PassContext())
    assert "transA=1" in result.skipped["gemm"]
    # an input that is always zero leaves nothing to weigh by
    zero = make([helper.make_node("Mul", ["x", "zero"], ["x0"], name="mask"),
                 helper.make_node("MatMul", ["x0", "W"], ["y"], name="mm")],
                [("x", [5, K])], [("y", [5, H])],
                {"zero": np.zeros(1, np.float32), "W": white(0, K, H)})
    result = PASS.apply(zero, ["mm"], PASS.validate_params({"method": "svd-llm", "rank": 2}),
                        PassContext())
    assert "zero on every calibration sample" in result.skipped["mm"]


def test_deterministic_bytes(calib: Path) -> None:
    model, _ = anisotropic_mlp()
    params = {"method": "svd-llm", "rank": 12, "calibration": str(calib)}
    first = apply_pass(PASS, model, ["fc1", "fc2"], params).model.SerializeToString()
    assert apply_pass(PASS, model, ["fc1", "fc2"], params).model.SerializeToString() == first
