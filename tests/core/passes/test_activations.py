"""Activation statistics of chosen nodes' inputs, measured by running the model."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from model_builders import small_mlp
from opstudio.core.errors import OpstudioError
from opstudio.core.passes._activations import input_stats


def test_statistics_match_numpy_over_all_rows_of_all_samples():
    model = small_mlp()
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((5, 64)).astype(np.float32)} for _ in range(3)]
    stats = input_stats(model, ["fc1", "fc2"], samples, gram=True)
    x = np.concatenate([s["x"] for s in samples]).astype(np.float64)
    w1 = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    r = np.maximum(x @ w1, 0)
    for name, expected in (("fc1", x), ("fc2", r)):
        got = stats[name]
        assert got.rows == 15
        np.testing.assert_allclose(got.sq_norm, (expected ** 2).sum(0), rtol=1e-4)
        np.testing.assert_allclose(got.abs_mean, np.abs(expected).mean(0), rtol=1e-4)
        np.testing.assert_allclose(got.abs_max, np.abs(expected).max(0), rtol=1e-5)
        np.testing.assert_allclose(got.gram, expected.T @ expected, rtol=1e-4, atol=1e-6)


def test_no_samples_or_bad_samples_are_errors_in_words():
    with pytest.raises(OpstudioError, match="no calibration samples"):
        input_stats(small_mlp(), ["fc1"], [])
    with pytest.raises(OpstudioError, match="calibration sample 1 failed"):
        input_stats(small_mlp(), ["fc1"], [{"x": np.zeros((2, 3), np.float32)}])
