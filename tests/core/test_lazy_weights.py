"""Weights stay in their files until something needs them; big models reach onnxruntime
through files, never as one serialized protobuf."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper

from model_builders import small_mlp
from opstudio.core.measure import accuracy
from opstudio.core.model import model_io, validity
from opstudio.core.model import runtime as ort_session
from opstudio.core.model.graph import analyze
from opstudio.core.model.model_io import (
    is_lazy,
    load_model,
    load_weights,
    save_model,
    tensor_array,
)
from opstudio.core.passes import get_pass
from opstudio.core.plan.optimize import optimize
from opstudio.core.plan.recipe import Recipe
from opstudio.core.session.opening import open_for_display


def external(model: onnx.ModelProto, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return path


def no_data_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any read of external tensor data fail loudly."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("weight data was read")

    monkeypatch.setattr(model_io, "_read_range", refuse)
    monkeypatch.setattr(model_io, "_copy_range", refuse)
    monkeypatch.setattr(external_data_helper, "load_external_data_for_model", refuse)
    monkeypatch.setattr(np, "memmap", refuse)


def test_lazy_load_keeps_weights_in_their_file_and_reads_one_on_demand(tmp_path) -> None:
    original = small_mlp()
    path = external(small_mlp(), tmp_path / "m")
    model = load_model(path, lazy=True)
    assert is_lazy(model)
    assert all(external_data_helper.uses_external_data(t) and not t.raw_data
               for t in model.graph.initializer)
    for tensor, want in zip(model.graph.initializer, original.graph.initializer):
        got = tensor_array(tensor)
        assert isinstance(got, np.memmap) and not got.flags.writeable
        np.testing.assert_array_equal(got, onnx.numpy_helper.to_array(want))


def test_analysis_of_a_lazy_model_reads_no_weight_and_matches_the_loaded_one(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = external(small_mlp(), tmp_path / "m")
    full = analyze(load_model(path), {"batch": 2})
    no_data_reads(monkeypatch)
    lazy = analyze(load_model(path, lazy=True), {"batch": 2})
    assert lazy.shape_inference_error is None
    assert [n.output_shapes for n in lazy.nodes] == [n.output_shapes for n in full.nodes]
    assert [n.flops for n in lazy.nodes] == [n.flops for n in full.nodes] != [None] * 3
    assert lazy.total_param_bytes() == full.total_param_bytes() == (64 * 128 + 128 * 32) * 4


def test_opening_for_display_reads_no_weight(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = external(small_mlp(), tmp_path / "m")
    no_data_reads(monkeypatch)
    opened = open_for_display(path, {"batch": 1})
    assert is_lazy(opened.model)
    assert opened.graph.node("fc1").output_shapes == [[1, 128]]


def test_a_basepath_written_in_the_file_is_not_followed(tmp_path) -> None:
    path = external(small_mlp(), tmp_path / "m")
    decoy = external(small_mlp(seed=5), tmp_path / "decoy")
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        entry = t.external_data.add()
        entry.key, entry.value = "basepath", str(decoy.parent)
    path.write_bytes(proto.SerializeToString())
    model = load_model(path, lazy=True)
    np.testing.assert_array_equal(tensor_array(model.graph.initializer[0]),
                                  onnx.numpy_helper.to_array(small_mlp().graph.initializer[0]))


def test_a_pass_checks_a_node_of_a_lazy_model(tmp_path) -> None:
    path = external(small_mlp(), tmp_path / "m")
    lazy, full = load_model(path, lazy=True), load_model(path)
    for technique in ("int4-weight", "lowrank", "prune"):
        pass_ = get_pass(technique)
        for node in range(3):
            assert (pass_.check(lazy, lazy.graph.node[node])
                    == pass_.check(full, full.graph.node[node]))


def test_saving_a_lazy_model_copies_its_weights_into_the_new_file(tmp_path) -> None:
    path = external(small_mlp(), tmp_path / "m")
    lazy = load_model(path, lazy=True)
    (tmp_path / "out").mkdir()
    out = save_model(lazy, tmp_path / "out" / "copy.onnx")
    assert (out.parent / "copy.onnx.data").is_file()
    written = onnx.load(str(out), load_external_data=False)
    assert all(e.key != "basepath" for t in written.graph.initializer for e in t.external_data)
    again = load_model(out)
    for a, b in zip(again.graph.initializer, small_mlp().graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a),
                                      onnx.numpy_helper.to_array(b))
    assert is_lazy(lazy)  # saving read the weights from the file, not into the model


def test_load_weights_gives_the_fully_loaded_model(tmp_path) -> None:
    path = external(small_mlp(), tmp_path / "m")
    lazy = load_weights(load_model(path, lazy=True))
    assert not is_lazy(lazy)
    assert lazy.SerializeToString() == load_model(path).SerializeToString()


def test_optimizing_a_lazy_model_gives_the_same_model_and_leaves_it_lazy(tmp_path) -> None:
    path = external(small_mlp(), tmp_path / "m")
    recipe = Recipe.from_json({"version": 1, "steps": [
        {"op_types": ["MatMul"], "technique": "int8-weight", "params": {}}]})
    lazy = load_model(path, lazy=True)
    from_lazy = optimize(lazy, recipe)
    from_full = optimize(load_model(path), recipe)
    assert is_lazy(lazy)
    assert from_lazy.model.SerializeToString() == from_full.model.SerializeToString()


# ---------------------------------------------------------------- sessions through files

@pytest.fixture
def low_limit(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Lower the in-memory limit so a small model goes through a file; record the files."""
    monkeypatch.setattr(ort_session, "IN_MEMORY_LIMIT", 1024)
    written: list[Path] = []

    def spy(model: onnx.ModelProto, path: Path, data_name: str) -> None:
        model_io.write_external(model, path, data_name)
        assert (path.parent / data_name).stat().st_size > 1024
        written.append(path)

    monkeypatch.setattr(ort_session, "write_external", spy)
    return written


def test_a_model_over_the_limit_reaches_onnxruntime_through_a_file(low_limit) -> None:
    model = small_mlp()
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    got = accuracy.run_outputs(model, {"x": x})
    assert len(low_limit) == 1 and not low_limit[0].parent.exists()  # temp folder gone
    want = np.maximum(x @ onnx.numpy_helper.to_array(model.graph.initializer[0]), 0) \
        @ onnx.numpy_helper.to_array(model.graph.initializer[1])
    np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-5)
    validity.check_model(model)
    assert len(low_limit) == 2


def _refuse_serializing(*_args) -> None:
    raise AssertionError("a small model should not go through a file")


def test_a_small_model_is_handed_over_as_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort_session, "write_external", _refuse_serializing)
    assert not ort_session.needs_file(small_mlp())
    validity.check_model(small_mlp())


def test_a_lazy_model_always_reaches_onnxruntime_through_a_file(tmp_path) -> None:
    path = external(small_mlp(), tmp_path / "m")
    lazy = load_model(path, lazy=True)
    assert ort_session.needs_file(lazy)
    x = np.ones((1, 64), np.float32)
    np.testing.assert_array_equal(accuracy.run_outputs(lazy, {"x": x})["y"],
                                  accuracy.run_outputs(str(path), {"x": x})["y"])


# ---------------------------------------------------------------- weights inside the .onnx file

@pytest.fixture
def skim_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat any file as big, and any weight over 1 KiB as worth leaving in the file."""
    monkeypatch.setattr(model_io, "LAZY_INLINE_ABOVE", 0)
    monkeypatch.setattr(model_io, "_SKIM_MIN_BYTES", 1024)


def with_shape_constant() -> onnx.ModelProto:
    """small_mlp's output reshaped by an inline int64 constant (shape inference reads it)."""
    model = small_mlp()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1, 4, 8]), "shape"))
    model.graph.node.append(onnx.helper.make_node("Reshape", ["y", "shape"], ["z"], name="rs"))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None))
    return model


def test_inline_weights_of_a_big_file_stay_in_it(tmp_path, skim_small, monkeypatch) -> None:
    original = with_shape_constant()
    path = tmp_path / "inline.onnx"
    path.write_bytes(original.SerializeToString())
    model = load_model(path, lazy=True)
    assert is_lazy(model)
    kept = {t.name for t in model.graph.initializer
            if not external_data_helper.uses_external_data(t)}
    assert kept == {"shape"}  # 24 bytes: read with the graph
    for tensor, want in zip(model.graph.initializer, original.graph.initializer):
        np.testing.assert_array_equal(tensor_array(tensor), onnx.numpy_helper.to_array(want))
    full = analyze(load_model(path), {"batch": 2})
    no_data_reads(monkeypatch)
    lazy = analyze(load_model(path, lazy=True), {"batch": 2})
    assert lazy.node("rs").output_shapes == full.node("rs").output_shapes == [[2, 4, 8]]
    assert lazy.total_param_bytes() == full.total_param_bytes()


def test_a_model_with_inline_weights_left_in_its_file_saves_and_runs(tmp_path, skim_small) -> None:
    path = tmp_path / "inline.onnx"
    path.write_bytes(small_mlp().SerializeToString())
    lazy = load_model(path, lazy=True)
    x = np.ones((3, 64), np.float32)
    np.testing.assert_array_equal(accuracy.run_outputs(lazy, {"x": x})["y"],
                                  accuracy.run_outputs(str(path), {"x": x})["y"])
    out = save_model(lazy, tmp_path / "copy.onnx")
    assert load_model(out).graph.initializer[0].raw_data == small_mlp().graph.initializer[0].raw_data
    loaded = load_weights(lazy)
    assert not is_lazy(loaded)
    for a, b in zip(loaded.graph.initializer, small_mlp().graph.initializer):
        assert (a.name, a.raw_data) == (b.name, b.raw_data)


def test_a_truncated_big_file_is_refused_in_words(tmp_path, skim_small) -> None:
    path = tmp_path / "cut.onnx"
    path.write_bytes(small_mlp().SerializeToString()[:-700])
    with pytest.raises(model_io.ModelLoadError, match="not a valid ONNX file"):
        load_model(path, lazy=True)


def test_inline_bytes_estimates_the_serialized_size_without_serializing() -> None:
    model = small_mlp()
    typed = onnx.helper.make_tensor("ids", onnx.TensorProto.INT64, [3000], [-1] * 3000)
    model.graph.initializer.append(typed)  # int64_data: 10-byte varints, not 8 bytes each
    size = len(model.SerializeToString())
    assert size * 0.99 <= model_io.inline_bytes(model) <= size * 1.01 + 1024
