"""Loading and saving models: every bad file is one clear ``ModelLoadError`` line."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.errors import ModelLoadError, OpstudioError
from opstudio.core.model.model_io import ensure_node_names, load_model, save_model


def small_model(names: list[str] | None = None, weight_size: int = 64) -> onnx.ModelProto:
    """x[1, n] @ W[n, n] -> Relu -> y, with ``weight_size`` = n."""
    n = weight_size
    w = numpy_helper.from_array(
        np.arange(n * n, dtype=np.float32).reshape(n, n) / (n * n), "W")
    names = names or ["mm", "relu"]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name=names[0]),
             helper.make_node("Relu", ["h"], ["y"], name=names[1])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def write(path: Path, model: onnx.ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def one_line_error(path: Path, match: str) -> str:
    with pytest.raises(ModelLoadError, match=match) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message or path.name in message
    return message


def test_loads_a_valid_model(tmp_path):
    model = load_model(write(tmp_path / "m.onnx", small_model()))
    assert [n.name for n in model.graph.node] == ["mm", "relu"]


def test_missing_path(tmp_path):
    one_line_error(tmp_path / "nope.onnx", "no such file")


def test_directory(tmp_path):
    d = tmp_path / "dir.onnx"
    d.mkdir()
    one_line_error(d, "is a directory")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    one_line_error(p, "empty")


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.97])
def test_truncated_file(tmp_path, keep):
    data = small_model().SerializeToString()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: int(len(data) * keep)])
    one_line_error(p, "not a valid ONNX file|not an ONNX model|graph is empty")


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(tmp_path, seed):
    rng = random.Random(seed)
    p = tmp_path / "noise.onnx"
    p.write_bytes(bytes(rng.randrange(256) for _ in range(2000)))
    one_line_error(p, "not a valid ONNX file|not an ONNX model")


def test_text_file(tmp_path):
    p = tmp_path / "notes.onnx"
    p.write_text("this is not a model\n" * 20)
    one_line_error(p, "not a valid ONNX file|not an ONNX model")


@pytest.mark.parametrize("kind", ["tensor", "graph", "node"])
def test_valid_protobuf_that_is_not_a_model(tmp_path, kind):
    m = small_model()
    message = {"tensor": m.graph.initializer[0], "graph": m.graph, "node": m.graph.node[0]}[kind]
    p = tmp_path / f"{kind}.onnx"
    p.write_bytes(message.SerializeToString())
    one_line_error(p, "not a valid ONNX file|not an ONNX model")


def test_ir_version_too_new(tmp_path):
    m = small_model()
    m.ir_version = onnx.IR_VERSION + 5
    one_line_error(write(tmp_path / "ir.onnx", m), "IR version .* newer")


def test_opset_too_new(tmp_path):
    m = small_model()
    m.opset_import[0].version = onnx.defs.onnx_opset_version() + 3
    one_line_error(write(tmp_path / "opset.onnx", m), "opset .* newer")


def test_no_default_opset(tmp_path):
    m = small_model()
    del m.opset_import[:]
    one_line_error(write(tmp_path / "noopset.onnx", m), "imports no ONNX opset")


def test_tensor_data_shorter_than_its_shape(tmp_path):
    m = small_model()
    m.graph.initializer[0].dims[0] = 2**31 - 1  # claims 2**31 rows, holds 64
    one_line_error(write(tmp_path / "short.onnx", m), "tensor 'W' is malformed")


def test_constant_node_tensor_checked_too(tmp_path):
    m = small_model()
    bad = numpy_helper.from_array(np.zeros(1, np.int64))
    bad.dims[0] = 2**31 - 1
    m.graph.node.insert(0, helper.make_node("Constant", [], ["c"], name="c", value=bad))
    one_line_error(write(tmp_path / "const.onnx", m), "constant tensor is malformed")


def test_name_that_is_not_utf8(tmp_path):
    data = small_model().SerializeToString()
    assert data.count(b"relu") >= 1
    p = tmp_path / "latin.onnx"
    p.write_bytes(data.replace(b"relu", b"r\xe3lu"))  # same length: the protobuf stays valid
    one_line_error(p, "not valid UTF-8")


def test_empty_graph(tmp_path):
    m = small_model()
    del m.graph.node[:]
    del m.graph.output[:]
    one_line_error(write(tmp_path / "hollow.onnx", m), "graph is empty")


# --- external data -------------------------------------------------------------------------


def save_external(model: onnx.ModelProto, folder: Path, location: str = "w.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "model.onnx"
    onnx.save_model(model, str(p), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return p


def set_location(path: Path, location: str) -> None:
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(m.SerializeToString())


def test_external_data_round_trip(tmp_path):
    original = small_model()
    expected = numpy_helper.to_array(original.graph.initializer[0])
    p = save_external(original, tmp_path / "ext")  # (onnx turns ``original`` external too)
    assert (tmp_path / "ext" / "w.bin").stat().st_size == 64 * 64 * 4
    loaded = load_model(p)
    assert loaded.graph.initializer[0].data_location == TensorProto.DEFAULT
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), expected)


def test_external_data_file_missing(tmp_path):
    p = save_external(small_model(), tmp_path / "ext")
    (tmp_path / "ext" / "w.bin").unlink()
    one_line_error(p, "external data file 'w.bin' .* missing")


def test_external_data_truncated(tmp_path):
    p = save_external(small_model(), tmp_path / "ext")
    data = tmp_path / "ext" / "w.bin"
    data.write_bytes(data.read_bytes()[:100])
    one_line_error(p, "beyond the end")


def test_external_data_climbing_out_is_refused(tmp_path):
    p = save_external(small_model(), tmp_path / "inner")
    os.replace(tmp_path / "inner" / "w.bin", tmp_path / "w.bin")  # the file really exists
    set_location(p, "../w.bin")
    one_line_error(p, "outside the model's folder; refused")


def test_external_data_absolute_path_is_refused(tmp_path):
    p = save_external(small_model(), tmp_path / "inner")
    set_location(p, str(tmp_path / "inner" / "w.bin"))  # even when it points inside
    one_line_error(p, "absolute path .* refused")


def test_external_data_symlink_out_is_refused(tmp_path):
    p = save_external(small_model(), tmp_path / "inner")
    outside = tmp_path / "secret.bin"
    os.replace(tmp_path / "inner" / "w.bin", outside)
    (tmp_path / "inner" / "w.bin").symlink_to(outside)
    one_line_error(p, "outside the model's folder; refused")


def test_external_data_not_read_when_not_asked(tmp_path):
    p = save_external(small_model(), tmp_path / "ext")
    m = load_model(p, load_external_data=False)
    assert m.graph.initializer[0].data_location == TensorProto.EXTERNAL


# --- node names ----------------------------------------------------------------------------


def test_duplicate_and_empty_names_are_made_unique(tmp_path):
    m = small_model(names=["same", "same"])
    m.graph.node.add().CopyFrom(helper.make_node("Identity", ["y"], ["z"], name=""))
    m.graph.output[0].name = "z"
    loaded = load_model(write(tmp_path / "dup.onnx", m))
    names = [n.name for n in loaded.graph.node]
    assert names == ["same", "same__2", "Identity_2"]
    assert ensure_node_names(loaded) == 0  # already unique: nothing renamed


def test_generated_name_never_collides_with_an_existing_one():
    m = small_model(names=["Relu_1", ""])
    assert ensure_node_names(m) == 1
    names = [n.name for n in m.graph.node]
    assert len(set(names)) == 2 and all(names)


# --- saving --------------------------------------------------------------------------------


def test_save_refuses_to_overwrite(tmp_path):
    p = write(tmp_path / "m.onnx", small_model())
    before = p.read_bytes()
    with pytest.raises(OpstudioError, match="already exists"):
        save_model(small_model(weight_size=8), p)
    assert p.read_bytes() == before


def test_save_overwrite_when_asked_and_no_temp_left(tmp_path):
    p = write(tmp_path / "m.onnx", small_model())
    save_model(small_model(weight_size=8), p, overwrite=True)
    assert onnx.load(str(p)).graph.initializer[0].dims == [8, 8]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.onnx"]


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "m.onnx"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_model(small_model(), p)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp file


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(OpstudioError, match="does not exist"):
        save_model(small_model(), tmp_path / "no" / "m.onnx")


def test_save_big_model_writes_external_data(tmp_path, monkeypatch):
    import opstudio.core.model.model_io as model_io

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    p = save_model(small_model(), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size >= 64 * 64 * 4
    loaded = load_model(p)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]),
                                  numpy_helper.to_array(small_model().graph.initializer[0]))
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".opstudio-save")]


def test_written_files_get_the_permissions_a_plain_open_gives(tmp_path):
    import os

    from opstudio.core import fileio

    target = tmp_path / "report.json"
    fileio.write_text_atomic(target, "{}")
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert (target.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~fileio._UMASK
    assert os.access(target, os.R_OK)
