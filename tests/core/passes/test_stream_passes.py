"""fp16, int8-dynamic, lowrank and prune on a model whose weights stay in their files: one
weight at a time into a scratch file, with the bytes of the in-memory pass (onnxruntime's
converter and quantizer there)."""

from __future__ import annotations

import importlib
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from lazy_models import assert_same, decoder_like, streamed_and_reference
from opstudio.core.errors import Cancelled, OpstudioError
from opstudio.core.model.model_io import is_lazy, load_model
from opstudio.core.model.runtime import create_session
from opstudio.core.passes import _stream as stream
from opstudio.core.plan.optimize import optimize, optimize_file
from opstudio.core.plan.recipe import Recipe
from opstudio.core.tempdir import opstudio_temp_root

# the module, not the function ``opstudio.core.plan`` exports under its name
optimize_module = importlib.import_module("opstudio.core.plan.optimize")


def test_fp16_casts_each_weight_as_onnxruntimes_converter_does(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "CHUNK_BYTES", 700)  # several bands per weight
    streamed = streamed_and_reference(tmp_path, "fp16", {}, ["mm_in", "mm", "mm_out"])
    assert streamed.applied == ["mm_in", "mm", "mm_out"]


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_dynamic_quantizes_each_weight_as_onnxruntimes_quantizer_does(
        tmp_path, monkeypatch, per_channel):
    monkeypatch.setattr(stream, "CHUNK_BYTES", 700)
    streamed = streamed_and_reference(tmp_path, "int8-dynamic", {"per_channel": per_channel},
                                      ["mm_in", "mm", "mm_out"])
    assert streamed.applied == ["mm_in", "mm", "mm_out"]


@pytest.mark.parametrize("sparsity", [0.5, 0.0, 0.9])
def test_prune_zeroes_each_weight_as_the_in_memory_pass_does(tmp_path, monkeypatch, sparsity):
    monkeypatch.setattr(stream, "CHUNK_BYTES", 700)
    model = decoder_like(100, 70, 37, 48)
    # ties at the cut: the earlier elements in row-major order go first
    w = next(t for t in model.graph.initializer if t.name == "W")
    w.CopyFrom(numpy_helper.from_array(np.round(numpy_helper.to_array(w), 1), "W"))
    streamed = streamed_and_reference(tmp_path, "prune", {"sparsity": sparsity},
                                      ["mm_in", "mm", "mm_out"], model, sizes=False)
    assert streamed.details["mm"]["zeroed"] == round(sparsity * 100 * 70)


@pytest.mark.parametrize("params", [{"rank": 8}, {"energy": 0.5}])
def test_lowrank_factorizes_each_weight_as_the_in_memory_pass_does(tmp_path, params):
    streamed = streamed_and_reference(tmp_path, "lowrank", params, ["mm_in", "mm", "mm_out"])
    assert streamed.applied == ["mm_in", "mm", "mm_out"]


def _saved_lazily(tmp_path):
    source = tmp_path / "src" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(decoder_like(100, 70, 37, 48), str(source), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    return source


@pytest.mark.parametrize("technique", ["fp16", "int8-dynamic", "lowrank", "prune"])
def test_optimize_streams_a_big_model_and_writes_what_the_in_memory_path_writes(
        tmp_path, monkeypatch, technique):
    monkeypatch.setattr(optimize_module, "STREAM_ABOVE", 0)  # this small model counts as big
    source = _saved_lazily(tmp_path)
    recipe = Recipe.from_json({"version": 1, "steps": [
        {"op_types": ["MatMul"], "technique": technique, "params": {}}]})
    seen: list[str] = []
    streamed = optimize(load_model(source, lazy=True), recipe, consume=True,
                        progress=lambda f, m: seen.append(m))
    assert is_lazy(streamed.model)  # no step read every weight into memory
    assert not any("reading all" in m for m in seen)
    assert any("tensor 3 of 3" in m for m in seen), seen
    reference = optimize(decoder_like(100, 70, 37, 48), recipe)
    assert_same(streamed.model, reference.model)
    optimize_file(source, recipe, tmp_path / "out.onnx")
    ids = np.array([[0, 5, 36]], dtype=np.int64)
    got = create_session(tmp_path / "out.onnx").run(None, {"ids": ids})[0]
    want = create_session(reference.model).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, want)


def test_cancel_between_tensors_leaves_no_output_and_no_scratch(tmp_path, monkeypatch):
    monkeypatch.setattr(optimize_module, "STREAM_ABOVE", 0)
    source = _saved_lazily(tmp_path)
    recipe = Recipe.from_json({"version": 1, "steps": [
        {"op_types": ["MatMul"], "technique": "int8-dynamic", "params": {}}]})
    started: list[str] = []
    scratch = set(opstudio_temp_root().glob(f"weights-{os.getpid()}-*"))

    def progress(fraction: float, message: str) -> None:
        if "quantizing tensor" in message:
            started.append(message)

    with pytest.raises(Cancelled):  # flips once the first tensor is under way
        optimize_file(source, recipe, tmp_path / "out.onnx", progress=progress,
                      cancelled=lambda: bool(started))
    assert started == ["int8-dynamic: quantizing tensor 1 of 3 (W_in)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    # the first tensor's scratch file went with it
    assert set(opstudio_temp_root().glob(f"weights-{os.getpid()}-*")) == scratch


def test_a_step_that_cannot_stream_says_so_and_is_refused_when_it_would_not_fit(
        tmp_path, monkeypatch):
    monkeypatch.setattr(optimize_module, "STREAM_ABOVE", 0)
    source = _saved_lazily(tmp_path)
    recipe = Recipe.from_json({"version": 1, "steps": [
        {"nodes": ["mm_in"], "technique": "prune", "params": {"structured": True}}]})
    monkeypatch.setattr(optimize_module, "available_bytes", lambda: 1000)
    with pytest.raises(OpstudioError, match=r"step 1 \(prune\).*rewrites the model in memory "
                       r".*only 1000 B is free.*one weight at a time: .*fp16"):
        optimize(load_model(source, lazy=True), recipe, consume=True)
    monkeypatch.setattr(optimize_module, "available_bytes", lambda: 2**40)
    result = optimize(load_model(source, lazy=True), recipe, consume=True)
    assert any(n.startswith("read all ") and "prune with these parameters rewrites the model "
               "in memory" in n for n in result.steps[0].notes), result.steps[0].notes


def test_the_float16_cast_is_the_converters_to_the_bit():
    from onnxruntime.transformers.float16 import convert_np_to_float16

    from opstudio.core.passes.fp16 import FP16_MAX, FP16_MIN_POSITIVE, to_float16

    rng = np.random.default_rng(5)
    values = np.concatenate([
        rng.standard_normal(1000) * 10.0 ** rng.integers(-12, 7, 1000),
        [0.0, -0.0, np.inf, -np.inf, np.nan, FP16_MAX, -FP16_MAX, 65505.0, -1e9,
         FP16_MIN_POSITIVE, -FP16_MIN_POSITIVE, 1e-30, -1e-30, 3e-8]]).astype(np.float32)
    want = convert_np_to_float16(values, FP16_MIN_POSITIVE, FP16_MAX)
    np.testing.assert_array_equal(to_float16(values).view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_dynamic_feeds_a_tied_embedding_as_onnxruntime_does(tmp_path, per_channel):
    # the lm_head's weight is also the embedding table, through a Transpose left float
    rng = np.random.default_rng(2)
    n, vocab = 24, 40
    nodes = [
        helper.make_node("Transpose", ["W_out"], ["table"], name="tie", perm=[1, 0]),
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "W"], ["h"], name="mm"),
        helper.make_node("MatMul", ["h", "W_out"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3, vocab])],
        [numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal((n, vocab)).astype(np.float32),
                                 "W_out")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    streamed = streamed_and_reference(tmp_path, "int8-dynamic", {"per_channel": per_channel},
                                      ["mm", "lm_head"], model)
    # the Transpose comes first: it keeps reading the float weight, as with onnxruntime
    assert {"W_out", "W_out_quantized"} <= {t.name for t in streamed.model.graph.initializer}


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_dynamic_dequantizes_a_weight_a_later_float_matmul_reads(tmp_path, per_channel):
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W"], ["y"], name="mm2")]  # left float
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 16])],
        [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    streamed = streamed_and_reference(tmp_path, "int8-dynamic", {"per_channel": per_channel},
                                      ["mm1"], model)
    assert "W_DequantizeLinear" in {n.name for n in streamed.model.graph.node}
