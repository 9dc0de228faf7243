"""int8-weight: MatMulNBits with 8-bit blocks, the accuracy level measured."""

from __future__ import annotations

import platform

import numpy as np
import pytest
from onnx import helper

from model_builders import apply_pass, run_ort, small_mlp
from opstudio.core.passes import get_pass
from opstudio.core.passes._nbits import fastest_level


def test_matmuls_become_8_bit_matmulnbits_close_to_float():
    model = small_mlp()
    result = apply_pass(get_pass("int8-weight"), model, ["fc1", "fc2"], {})
    nbits = [n for n in result.model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and sorted(result.applied) == ["fc1", "fc2"]
    attrs = {a.name: helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert attrs["bits"] == 8
    assert attrs.get("accuracy_level", 0) == fastest_level(8, 32).level
    assert result.details["fc1"]["bits"] == 8
    assert result.details["fc1"]["bytes_after"] < result.details["fc1"]["bytes_before"] / 3
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    (before,), (after,) = run_ort(model, {"x": x}), run_ort(result.model, {"x": x})
    cos = float((before * after).sum() / np.linalg.norm(before) / np.linalg.norm(after))
    assert cos > 0.9995


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the level ranking is onnxruntime's x86 kernels'")
def test_auto_does_not_pick_the_slow_float32_path_for_8_bit_weights():
    # 8-bit weights at level 1 run tens of times slower than at level 4 on x86
    choice = fastest_level(8, 32)
    assert choice.level == 4
    assert choice.times_ms[1][0] > 3 * choice.times_ms[4][0]
