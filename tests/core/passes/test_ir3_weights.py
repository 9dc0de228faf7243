"""Old exports (IR version 3) whose weights are computed at run time, as the ONNX model zoo's
"light" models are: fp16 and int8-dynamic results keep IR 3's rule that every initializer is a
graph input, pass onnx's checker, run in onnxruntime and compute what the original computes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from model_builders import ir3_computed_weights, run_ort
from opstudio.core.model import validity
from opstudio.core.passes import RewriterFailed
from opstudio.core.passes._ort_support import ort_rewriter
from opstudio.core.plan.optimize import optimize
from opstudio.core.plan.recipe import Recipe, Step

X = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}


def _optimize(model: onnx.ModelProto, technique: str):
    recipe = Recipe([Step(technique, op_types=["MatMul", "Gemm", "Conv"])])
    return optimize(model, recipe, inputs=X)


def _rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _check_ir3(model: onnx.ModelProto) -> None:
    assert model.ir_version == 3
    onnx.checker.check_model(model, full_check=True)
    declared = {i.name for i in model.graph.input}
    assert {i.name for i in model.graph.initializer} <= declared
    assert model.graph.input[0].name == "x"  # the data input keeps its place


def test_fp16_result_keeps_ir3_rules_and_stores_half_precision_weights() -> None:
    model = ir3_computed_weights()
    expected = run_ort(model, X)[0]
    result = _optimize(model, "fp16")
    _check_ir3(result.model)
    assert sorted(result.steps[0].applied) == ["conv", "fc"]
    inits = {i.name: i for i in result.model.graph.initializer}
    conv = next(n for n in result.model.graph.node if n.name == "conv")
    # the folded weight itself is stored in float16, not kept float32 behind a Cast
    assert inits[conv.input[1]].data_type == TensorProto.FLOAT16
    (got,) = run_ort(result.model, X)
    assert _rel_error(got, expected) < 5e-3


def test_int8_dynamic_result_keeps_ir3_rules() -> None:
    model = ir3_computed_weights()
    expected = run_ort(model, X)[0]
    result = _optimize(model, "int8-dynamic")
    _check_ir3(result.model)
    assert sorted(result.steps[0].applied) == ["conv", "fc"]
    assert any("opset from 9 to 11" in n for n in result.steps[0].notes)
    (got,) = run_ort(result.model, X)
    assert _rel_error(got, expected) < 5e-2


@pytest.mark.parametrize(("technique", "after"), [("fp16", "2.3 MiB"), ("prune", "4.5 MiB")])
def test_weights_made_at_run_time_growing_the_file_are_noted_with_both_sizes(
        technique: str, after: str) -> None:
    model = ir3_computed_weights(hidden=4096)  # a 288×4096 weight: 4.5 MiB, 2.3 in float16
    result = _optimize(model, technique)
    (note,) = [n for n in result.steps[0].notes if "grows from" in n]
    assert "computed at run time" in note
    size = model.ByteSize()
    assert note.endswith(f"grows from {size / 1024:.1f} KiB to {after}"), note
    _check_ir3(result.model)


def test_validity_refuses_an_ir3_initializer_that_is_no_graph_input() -> None:
    model = ir3_computed_weights()
    validity.check_model(model)
    model.graph.initializer.append(numpy_helper.from_array(np.ones(8, np.float32), "stray"))
    model.graph.node[2].input[2] = "stray"  # a real graph would read it
    with pytest.raises(validity.InvalidModel, match="stray in initializer but not in graph input"):
        validity.check_model(model)
    # onnxruntime loads it all the same: only the structure check sees the rule
    validity.check_loads(model)


def test_quantizer_failure_names_the_tool_and_what_to_do(tmp_path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    model = ir3_computed_weights()
    model.graph.initializer.append(numpy_helper.from_array(np.ones(8, np.float32), "stray"))
    model.graph.node[2].input[2] = "stray"  # undeclared: onnx's opset converter refuses it
    src = tmp_path / "m.onnx"
    onnx.save_model(model, str(src))
    with pytest.raises(RewriterFailed) as caught, \
            ort_rewriter("onnxruntime's dynamic quantizer", "leave these nodes out"):
        quantize_dynamic(str(src), str(tmp_path / "q.onnx"))
    message = str(caught.value)
    assert message.startswith("onnxruntime's dynamic quantizer failed on this model (")
    assert message.endswith("; leave these nodes out")
