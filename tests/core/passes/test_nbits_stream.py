"""int4-weight / int8-weight on a model whose weights stay in their files: one weight at a time,
in bands, bit-exact against onnxruntime's MatMulNBits quantizer on the same model in memory."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from lazy_models import assert_same, decoder_like, lazy_copy, streamed_and_reference
from opstudio.core.errors import Cancelled
from opstudio.core.model.model_io import is_lazy, load_model, save_model
from opstudio.core.model.runtime import create_session
from opstudio.core.passes import PassContext, get_pass
from opstudio.core.passes import _stream as stream
from opstudio.core.plan.optimize import optimize, optimize_file
from opstudio.core.plan.recipe import Recipe

# the module, not the function ``opstudio.core.plan`` exports under its name
optimize_module = importlib.import_module("opstudio.core.plan.optimize")

CASES = [  # (technique, k, n, vocab, hidden, block, symmetric, fp16)
    ("int4-weight", 100, 70, 37, 48, 32, True, False),
    ("int4-weight", 100, 70, 37, 48, 16, False, False),
    ("int4-weight", 64, 33, 41, 80, 32, False, True),
    ("int4-weight", 130, 128, 64, 64, 64, True, True),
    ("int8-weight", 100, 70, 37, 48, 32, True, False),
    ("int8-weight", 96, 33, 40, 64, 16, False, False),
]


@pytest.mark.parametrize(("technique", "k", "n", "vocab", "hidden", "block", "symmetric",
                          "fp16"), CASES)
def test_streamed_bands_are_bit_exact_against_onnxruntimes_quantizer(
        tmp_path, monkeypatch, technique, k, n, vocab, hidden, block, symmetric, fp16):
    # a few hundred bytes per band: every weight is quantized in several bands, odd ones too
    monkeypatch.setattr(stream, "CHUNK_BYTES", 700)
    model = decoder_like(k, n, vocab, hidden, fp16)
    nodes = ["embed", "mm_in", "mm", "mm_out"]
    params = {"block_size": block, "symmetric": symmetric, "accuracy_level": 4}
    streamed = streamed_and_reference(tmp_path, technique, params, nodes, model)
    bits = get_pass(technique).bits
    assert {t.name for t in streamed.model.graph.initializer} >= {f"W_Q{bits}", "W_scales"}


def test_level_0_writes_no_accuracy_level(tmp_path):
    model = decoder_like(64, 32, 16, 32)
    params = {"block_size": 32, "accuracy_level": 0}
    pass_ = get_pass("int4-weight")
    reference = pass_.apply(model, ["mm"], params, PassContext())
    streamed = pass_.apply(lazy_copy(model, tmp_path), ["mm"], params, PassContext())
    assert_same(streamed.model, reference.model)


def test_each_tensor_reports_progress_and_cancel_stops_between_tensors(tmp_path):
    model = lazy_copy(decoder_like(64, 32, 16, 32), tmp_path)
    seen: list[str] = []
    get_pass("int4-weight").apply(model, ["embed", "mm_in", "mm"], {"accuracy_level": 4},
                                  PassContext(progress=lambda f, m: seen.append(m)))
    quantizing = [m for m in seen if "quantizing tensor" in m]
    assert quantizing == ["int4-weight: quantizing tensor 1 of 3 (embed)",
                          "int4-weight: quantizing tensor 2 of 3 (mm_in)",
                          "int4-weight: quantizing tensor 3 of 3 (mm)"]

    calls: list[str] = []

    def cancelled() -> bool:  # let the first tensor through, then cancel
        calls.append("asked")
        return len(calls) > 2

    cancel_dir, work = tmp_path / "cancel", tmp_path / "work"
    cancel_dir.mkdir()
    work.mkdir()
    with pytest.raises(Cancelled):
        get_pass("int4-weight").apply(lazy_copy(decoder_like(64, 32, 16, 32), cancel_dir),
                                      ["embed", "mm_in", "mm"], {"accuracy_level": 4},
                                      PassContext(cancelled=cancelled, workdir=str(work)))
    assert len(calls) == 3
    assert list(work.iterdir()) == []  # the quantized tensor's scratch file went with it


def test_optimize_keeps_weights_in_files_and_writes_what_the_in_memory_path_writes(
        tmp_path, monkeypatch):
    monkeypatch.setattr(optimize_module, "STREAM_ABOVE", 0)  # stream even this small model
    model = decoder_like(100, 70, 37, 48)
    (tmp_path / "src").mkdir()
    source = tmp_path / "src" / "model.onnx"
    # onnx's saver moves the data of the model it is given: it saves a copy
    onnx.save_model(decoder_like(100, 70, 37, 48), str(source), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    recipe = Recipe.from_json({"version": 1, "steps": [
        {"op_types": ["MatMul", "Gather"], "technique": "int4-weight",
         "params": {"accuracy_level": 4}}]})
    streamed = optimize(load_model(source, lazy=True), recipe, consume=True)
    assert is_lazy(streamed.model)  # no step read every weight into memory
    reference = optimize(model, recipe)
    assert_same(streamed.model, reference.model)

    out = optimize_file(source, recipe, tmp_path / "out.onnx")
    assert out.steps[0].applied == ["embed", "mm_in", "mm", "mm_out"]
    saved = load_model(tmp_path / "out.onnx")
    assert_same(saved, reference.model)
    ids = np.array([[0, 5, 36]], dtype=np.int64)
    got = create_session(tmp_path / "out.onnx").run(None, {"ids": ids})[0]
    want = create_session(reference.model).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, want)


def test_a_small_model_opened_lazily_is_read_at_once_as_before(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save_model(decoder_like(64, 32, 16, 32), str(source), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    recipe = Recipe.from_json({"version": 1, "steps": [
        {"op_types": ["MatMul"], "technique": "int4-weight", "params": {"accuracy_level": 4}}]})
    result = optimize(load_model(source, lazy=True), recipe, consume=True)
    assert not is_lazy(result.model)
    assert result.model.SerializeToString() == optimize(load_model(source), recipe).model \
        .SerializeToString()


def test_a_later_step_that_needs_the_weights_gets_them(tmp_path, monkeypatch):
    monkeypatch.setattr(optimize_module, "STREAM_ABOVE", 0)
    source = tmp_path / "model.onnx"
    onnx.save_model(decoder_like(64, 32, 16, 32), str(source), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    recipe = Recipe.from_json({"version": 1, "steps": [
        {"nodes": ["mm"], "technique": "int4-weight", "params": {"accuracy_level": 4}},
        {"nodes": ["mm_in"], "technique": "fp16", "params": {}}]})
    result = optimize(load_model(source, lazy=True), recipe, consume=True)
    assert [s.applied for s in result.steps] == [["mm"], ["mm_in"]]
    save_model(result.model, tmp_path / "out.onnx")
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    assert create_session(tmp_path / "out.onnx").run(None, {"ids": ids})[0].shape == (1, 3, 16)


def test_shared_weights_and_a_gemm_stream_as_in_memory(tmp_path):
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="mm1"),
        helper.make_node("MatMul", ["a", "W"], ["b"], name="mm2"),  # the same weight again
        helper.make_node("Gemm", ["b", "Wg", "bg"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 64])],
        [helper.make_tensor_value_info("y", 1, [2, 16])],
        [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal((16, 64)).astype(np.float32), "Wg"),
         numpy_helper.from_array(np.ones(16, np.float32), "bg")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    params = {"accuracy_level": 4, "symmetric": False}
    pass_ = get_pass("int4-weight")
    reference = pass_.apply(model, ["mm1", "mm2", "fc"], params, PassContext())
    streamed = pass_.apply(lazy_copy(model, tmp_path), ["mm1", "mm2", "fc"], params,
                           PassContext())
    assert streamed.applied == ["mm1", "mm2", "fc"]
    assert_same(streamed.model, reference.model)
