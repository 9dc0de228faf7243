"""An error opstudio words for the user keeps onnx's or onnxruntime's own error as its cause, so
``--debug`` shows where it came from; without ``--debug`` the user still reads one line."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

from opstudio.cli import main
from opstudio.core.errors import ModelLoadError, OpstudioError
from opstudio.core.measure.accuracy import run_outputs
from opstudio.core.model.model_io import load_model


def corrupt_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x0a\xff\xff\xff\xff\x0f garbage")
    return path


def test_a_corrupt_file_keeps_protobufs_error_as_the_cause(tmp_path):
    with pytest.raises(ModelLoadError, match="not a valid ONNX file") as info:
        load_model(corrupt_file(tmp_path))
    assert info.value.__cause__ is not None


def test_an_onnxruntime_failure_keeps_onnxruntimes_error_as_the_cause():
    # Add of float32 [2] and float32 [3]: a shape onnxruntime rejects when it runs
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(OpstudioError, match="onnxruntime could not run the model") as info:
        run_outputs(model, {"a": np.zeros(2, np.float32), "b": np.zeros(3, np.float32)})
    assert isinstance(info.value.__cause__, (Fail, InvalidArgument, RuntimeError))


def test_debug_prints_the_cause_and_the_plain_run_one_line(tmp_path, capsys):
    path = corrupt_file(tmp_path)
    assert main(["inspect", str(path)]) == 1
    plain = capsys.readouterr().err
    assert plain.count("\n") == 1 and plain.startswith("error: ")

    assert main(["--debug", "inspect", str(path)]) == 1
    debug = capsys.readouterr().err
    assert "The above exception was the direct cause of the following exception" in debug
    assert "DecodeError" in debug or "RuntimeError" in debug
    assert debug.rstrip().splitlines()[-1] == plain.strip()


def test_onnx_checker_errors_stay_the_cause_of_a_malformed_tensor(tmp_path):
    # a tensor claiming 4 floats while holding 1: onnx's checker says why
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    tensor.dims[0] = 4
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [tensor])
    path = tmp_path / "short.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ModelLoadError, match="malformed") as info:
        load_model(path)
    assert info.value.__cause__ is not None
