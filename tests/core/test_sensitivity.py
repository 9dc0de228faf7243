"""Sensitivity scan and the measured automatic plan on a small two-layer model."""

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.measure.inputs import make_inputs
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.model.model_io import load_model
from opstudio.core.plan.advisor import Budget, greedy_plan, measured_verifier
from opstudio.core.plan.sensitivity import analyze_sensitivity


def two_branch_model(path):
    """Two MatMuls on two outputs. "hard_mm" reads an activation with an outlier feature (the
    LLM outlier problem): its weight row for that feature is zero, so the outlier does not reach
    the output, but per-tensor dynamic INT8 sets the activation's scale by it and rounds every
    other feature away. "easy_mm" reads plain activations."""
    rng = np.random.default_rng(0)
    w_easy = (rng.standard_normal((64, 64)) * 0.1).astype(np.float32)
    w_hard = (rng.standard_normal((64, 64)) * 0.1).astype(np.float32)
    w_hard[0, :] = 0.0
    outlier = np.zeros((1, 64), np.float32)
    outlier[0, 0] = 1000.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_easy"], ["y1"], name="easy_mm"),
         helper.make_node("Add", ["x", "outlier"], ["xo"], name="add_outlier"),
         helper.make_node("MatMul", ["xo", "w_hard"], ["y2"], name="hard_mm")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 64])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [32, 64]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [32, 64])],
        [numpy_helper.from_array(w_easy, "w_easy"), numpy_helper.from_array(w_hard, "w_hard"),
         numpy_helper.from_array(outlier, "outlier")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    path = two_branch_model(tmp_path_factory.mktemp("sens") / "two.onnx")
    settings = ProfileSettings(runs=3, warmup=1, threads=1, measure_plain=False)
    sens = analyze_sensitivity(path, settings, {"int8-dynamic": {"per_channel": False},
                                                "fp16": {}}, use_cache=False)
    return path, settings, sens


def test_every_candidate_is_measured(scanned):
    _, _, sens = scanned
    pairs = {(c.node, c.technique) for c in sens.candidates}
    assert pairs == {(n, t) for n in ("easy_mm", "hard_mm") for t in ("int8-dynamic", "fp16")}
    for c in sens.candidates:
        assert c.error is None, c.error
        assert c.after_ms is not None and c.after_ms > 0
        assert c.before_ms > 0


def test_errors_reflect_known_sensitivities(scanned):
    _, _, sens = scanned
    snr = {(c.node, c.technique): c.snr_db for c in sens.candidates}
    # the outlier wipes out the other features under per-tensor INT8 activations
    assert snr[("hard_mm", "int8-dynamic")] < 10
    assert snr[("easy_mm", "int8-dynamic")] > 25
    # FP16 keeps ~3 significant digits whatever the range: fine on both
    assert snr[("hard_mm", "fp16")] > 40 and snr[("easy_mm", "fp16")] > 40


def test_measured_plan_meets_the_budget_end_to_end(scanned):
    path, _, sens = scanned
    model = load_model(path)
    inputs = make_inputs(model)
    budget = Budget(min_snr_db=35)
    plan = greedy_plan(sens.candidates, budget, measured_verifier(str(path), inputs))
    assert "hard_mm/int8-dynamic" in plan.rejected
    for c in plan.chosen:
        assert c.snr_db >= 35
    if plan.chosen:
        assert plan.verified is not None and budget.holds(plan.verified.cosine,
                                                          plan.verified.snr_db)
    assert plan.recipe.to_json()["version"] == 1
    # nothing hard-wired: every rejection says why
    assert all(reason for reason in plan.rejected.values())
    assert math.isfinite(plan.predicted_gain_ms)


def test_cache_key_follows_the_onnxruntime_and_opstudio_versions(tmp_path, monkeypatch):
    from opstudio.core.measure.profiler import ProfileSettings
    from opstudio.core.plan import sensitivity

    model = tmp_path / "m.onnx"
    model.write_bytes(b"model bytes")
    prompt = tmp_path / "p.npz"
    prompt.write_bytes(b"prompt a")
    settings = ProfileSettings()

    def key(*extra):
        return sensitivity.cache_key(model, settings, {"int8-dynamic": {}}, 40, extra)

    plain, with_prompt = key(), key(prompt)
    assert plain != with_prompt
    prompt.write_bytes(b"prompt b")  # another prompt measures anew
    assert key(prompt) != with_prompt
    monkeypatch.setattr(sensitivity, "versions",
                        lambda: {"onnxruntime": "9.9.9", "opstudio": "0.0.1"})
    assert key() != plain
