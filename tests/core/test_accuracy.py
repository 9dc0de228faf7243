"""Accuracy metrics on known arrays, and running two models on the same inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from onnx import helper, numpy_helper

from opstudio.core.errors import OpstudioError
from opstudio.core.measure.accuracy import compare_outputs, evaluate, run_outputs
from opstudio.core.model.model_io import save_model


def test_known_error():
    report = compare_outputs({"y": np.array([3.0, 4.0], np.float32)},
                             {"y": np.array([3.0, 5.0], np.float32)})
    (o,) = report.outputs
    assert o.name == "y" and o.shape == [2]
    assert o.max_abs_err == 1.0 and o.mean_abs_err == 0.5
    assert o.cosine == pytest.approx((9 + 20) / (5 * math.sqrt(34)))
    assert o.snr_db == pytest.approx(10 * math.log10(25 / 1))
    assert o.equal_rate == 0.5 and not o.identical
    assert o.top1_agreement == 1.0  # both rows pick index 1


def test_top1_on_classifier_like_outputs():
    ref = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4]], np.float32)
    new = np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]], np.float32)
    (o,) = compare_outputs({"logits": ref}, {"logits": new}).outputs
    assert o.top1_agreement == 0.75
    # [batch, seq, vocab]: rows over batch and seq
    (o3,) = compare_outputs({"l": ref.reshape(2, 2, 3)}, {"l": new.reshape(2, 2, 3)}).outputs
    assert o3.top1_agreement == 0.75 and o3.shape == [2, 2, 3]
    # a last dim of 1 is not classifier-like
    (o1,) = compare_outputs({"s": ref[:, :1]}, {"s": new[:, :1]}).outputs
    assert o1.top1_agreement is None


def test_identical_outputs_and_json():
    a = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    report = compare_outputs({"y": a}, {"y": a.copy()})
    (o,) = report.outputs
    assert o.identical and o.snr_db == math.inf and o.cosine == pytest.approx(1.0)
    data = report.to_json()
    text = json.dumps(data, allow_nan=False)  # must be strict JSON
    assert json.loads(text)["outputs"][0]["snr_db"] is None
    assert data["outputs"][0]["identical"] is True and data["outputs"][0]["max_abs_err"] == 0.0


def test_non_float_outputs_compare_by_equality():
    (o,) = compare_outputs({"ids": np.array([1, 2, 3, 4], np.int64)},
                           {"ids": np.array([1, 2, 0, 4], np.int64)}).outputs
    assert o.equal_rate == 0.75 and o.max_abs_err == 3.0
    assert o.cosine is None and o.snr_db is None and o.top1_agreement is None


def test_zero_reference():
    (o,) = compare_outputs({"y": np.zeros(4, np.float32)}, {"y": np.zeros(4, np.float32)}).outputs
    assert o.cosine == 1.0 and o.snr_db == math.inf
    (o,) = compare_outputs({"y": np.zeros(4, np.float32)}, {"y": np.ones(4, np.float32)}).outputs
    assert o.cosine == 0.0 and o.snr_db == -math.inf
    assert o.to_json()["snr_db"] is None


def test_mismatches_are_errors():
    with pytest.raises(OpstudioError, match="output 'y': shape \\[3\\] differs"):
        compare_outputs({"y": np.zeros(2)}, {"y": np.zeros(3)})
    with pytest.raises(OpstudioError, match="output 'z' is missing"):
        compare_outputs({"z": np.zeros(2)}, {"y": np.zeros(2)})


def scaled(factor: float):
    node = helper.make_node("Mul", ["x", "k"], ["y"], name="mul0")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [2, 3])],
                              [helper.make_tensor_value_info("y", 1, [2, 3])],
                              [numpy_helper.from_array(np.array(factor, np.float32), "k")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_run_and_evaluate(tmp_path):
    x = {"x": np.arange(6, dtype=np.float32).reshape(2, 3) + 1}
    out = run_outputs(scaled(2.0), x)
    assert list(out) == ["y"] and np.array_equal(out["y"], x["x"] * 2)
    path = tmp_path / "m.onnx"
    save_model(scaled(2.0), path)
    report = evaluate(path, scaled(2.2), x)
    (o,) = report.outputs
    assert o.cosine == pytest.approx(1.0, abs=1e-6)
    assert o.snr_db == pytest.approx(20.0, abs=1e-3)  # error is 10 % of the signal
    assert report.worst_cosine() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(OpstudioError, match="unknown optimization level"):
        run_outputs(path, x, opt_level="max")
