"""Validity as onnxruntime sees it: exporters' ORT-only ops pass, real faults do not."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.model import model_io, validity
from opstudio.core.model import runtime as ort_session


def _norm_model(op_domain: str = "") -> onnx.ModelProto:
    """x → SimplifiedLayerNormalization (as onnxruntime-genai writes it) → MatMul."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")]
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["h"], name="norm",
                              domain=op_domain, axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    opsets = [helper.make_opsetid("", 17)]
    if op_domain:
        opsets.append(helper.make_opsetid(op_domain, 1))
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=opsets)


def test_ort_op_in_default_domain_is_valid() -> None:
    model = _norm_model()
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model, full_check=True)  # what used to refuse every result
    assert validity.unregistered_ops(model) == {"SimplifiedLayerNormalization"}
    validity.check_model(model)


def test_shape_fault_next_to_an_ort_op_is_still_caught() -> None:
    model = _norm_model()
    model.graph.initializer[1].CopyFrom(
        numpy_helper.from_array(np.ones((5, 4), np.float32), "w"))  # K = 5 against 8
    with pytest.raises(validity.InvalidModel, match=r"not a valid ONNX model|onnxruntime"):
        validity.check_model(model)


def test_op_nobody_runs_is_refused_by_onnxruntime() -> None:
    model = _norm_model()
    model.graph.node[0].op_type = "NoSuchNormalization"
    with pytest.raises(validity.InvalidModel, match="not loadable by onnxruntime"):
        validity.check_model(model)


def test_checker_sees_no_weight_data_and_leaves_the_model_alone() -> None:
    model = _norm_model()
    before = model.SerializeToString()
    skeleton = validity._skeleton(model)
    assert len(skeleton.graph.initializer) == 0
    assert {"gamma", "w"} <= {i.name for i in skeleton.graph.input}
    assert model.SerializeToString() == before


def test_big_model_is_loaded_from_external_data(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(ort_session, "IN_MEMORY_LIMIT", 10)
    written: list[str] = []

    def spy(model: onnx.ModelProto, path, data_name: str) -> None:
        written.append(data_name)
        model_io.write_external(model, path, data_name)

    monkeypatch.setattr(ort_session, "write_external", spy)
    model = _norm_model()
    validity.check_model(model)
    assert written == ["model.onnx.data"]
    model.graph.initializer[1].CopyFrom(
        numpy_helper.from_array(np.ones((8, 4), np.float64), "w"))  # double against float
    with pytest.raises(validity.InvalidModel, match="onnxruntime"):
        validity.check_loads(model)


def test_write_external_streams_weights_and_keeps_the_model(tmp_path) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    model = _norm_model()
    big = rng.standard_normal((8, 4)).astype(np.float32)
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(big, "w"))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(2**19, np.float32), "pad"))
    before = model.SerializeToString()
    path = tmp_path / "m.onnx"
    model_io.write_external(model, path, "m.onnx.data")
    assert model.SerializeToString() == before
    loaded = model_io.load_model(path)
    arrays = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    np.testing.assert_array_equal(arrays["w"], big)
    assert arrays["pad"].shape == (2**19,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 8)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, h @ big, rtol=1e-4, atol=1e-5)
