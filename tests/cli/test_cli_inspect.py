"""``opstudio inspect``: the table, the JSON, and one ``error:`` line (exit 1) per bad input."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from opstudio.cli import main

RESOURCES = Path(__file__).resolve().parents[2] / "resources"


def mlp_model() -> onnx.ModelProto:
    w1 = numpy_helper.from_array(np.ones((16, 32), np.float32), "w1")
    w2 = numpy_helper.from_array(np.ones((32, 4), np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(capsys, *argv: str, match: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    assert match.lower() in lines[0].lower(), lines[0]
    return lines[0]


def test_table_and_summary(tmp_path, capsys):
    p = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(p))
    code, out, err = run(capsys, str(p), "--dim", "batch=2")
    assert code == 0, err
    assert "fc1" in out and "MatMul" in out and "[2,32]" in out
    assert "3 operators" in out
    # 2*2*16*32 + 2*2*32*4 = 2048 + 512 FLOPs for the MatMuls, 64 for the Relu
    assert "2.62 kFLOPs" in out
    assert "2.5 KiB of weights" in out


def test_json_to_stdout_matches_the_documented_format(tmp_path, capsys):
    p = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(p))
    code, out, _ = run(capsys, str(p), "--json", "-", "--dim", "batch=1")
    assert code == 0
    data = json.loads(out)
    assert data["model"] == str(p) and data["opset"] == 17
    assert [n["name"] for n in data["nodes"]] == ["fc1", "act", "fc2"]
    for n in data["nodes"]:
        assert {"name", "op_type", "domain", "inputs", "outputs", "output_shapes", "flops",
                "param_bytes"} <= set(n)
    fc1 = data["nodes"][0]
    assert fc1["flops"] == 2 * 16 * 32 and fc1["param_bytes"] == 16 * 32 * 4
    assert fc1["output_shapes"] == [[1, 32]]
    assert data["op_types"] == {"MatMul": 2, "Relu": 1}
    assert data["totals"]["flops"] == 2 * 16 * 32 + 32 + 2 * 32 * 4
    assert data["totals"]["param_bytes"] == (16 * 32 + 32 * 4) * 4


def test_symbolic_dims_kept_without_binding(tmp_path, capsys):
    p = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(p))
    code, out, _ = run(capsys, str(p), "--json", "-")
    assert code == 0
    data = json.loads(out)
    assert data["nodes"][0]["output_shapes"] == [["batch", 32]]
    assert data["nodes"][0]["flops"] is None


def test_footer_says_which_dims_the_flops_need(tmp_path, capsys):
    p = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(p))
    code, out, _ = run(capsys, str(p))
    assert code == 0
    footer = out.strip().splitlines()[-3:]
    assert "0 FLOPs" not in out
    assert "FLOPs unknown" in footer[0]
    assert footer[1] == "FLOPs need dims: pass --dim batch=N"
    code, out, _ = run(capsys, str(p), "--json", "-")
    totals = json.loads(out)["totals"]
    assert totals["nodes_without_flops"] == 3 and totals["unbound_dims"] == ["batch"]


def test_footer_counts_ops_of_unknown_cost_when_dims_are_given(tmp_path, capsys):
    m = mlp_model()
    m.graph.node.append(helper.make_node("Mystery", ["y"], ["z"], name="odd", domain="com.example"))
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    p = tmp_path / "odd.onnx"
    onnx.save(m, str(p))
    code, out, _ = run(capsys, str(p), "--dim", "batch=2")
    assert code == 0
    assert "2.62 kFLOPs + 1 operator of unknown cost" in out
    assert "need dims" not in out


def test_shared_weight_counted_once_in_totals(tmp_path, capsys):
    table = numpy_helper.from_array(np.ones((16, 16), np.float32), "table")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "table"], ["h"], name="mm"),
             helper.make_node("MatMul", ["h", "table"], ["y"], name="head")]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16])], [table])
    p = tmp_path / "tied.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), str(p))
    code, out, _ = run(capsys, str(p))
    assert code == 0 and "1.0 KiB of weights" in out
    code, out, _ = run(capsys, str(p), "--json", "-")
    data = json.loads(out)
    assert [n["param_bytes"] for n in data["nodes"]] == [1024] * 3
    assert data["totals"]["param_bytes"] == 1024


def test_json_file_and_shape_flag(tmp_path, capsys):
    p = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(p))
    target = tmp_path / "out.json"
    code, out, _ = run(capsys, str(p), "--json", str(target), "--shape", "x=3,16")
    assert code == 0 and "fc1" in out
    data = json.loads(target.read_text())
    assert data["nodes"][2]["output_shapes"] == [[3, 4]]
    assert data["nodes"][2]["flops"] == 2 * 3 * 32 * 4


@pytest.mark.parametrize("name", ["article_cnn.onnx", "tiny_llm.onnx"])
def test_demo_models_node_counts(capsys, name):
    path = RESOURCES / name
    code, out, _ = run(capsys, str(path), "--json", "-", "--dim", "batch=1", "--dim", "seq=16")
    assert code == 0
    data = json.loads(out)
    assert len(data["nodes"]) == len(onnx.load(str(path)).graph.node)
    heavy = [n for n in data["nodes"] if n["op_type"] in ("MatMul", "Gemm", "Conv")]
    assert heavy and all(n["flops"] for n in heavy)


# --- every bad input: exit 1, one line ------------------------------------------------------


def test_missing_path(tmp_path, capsys):
    assert_one_error_line(capsys, str(tmp_path / "missing.onnx"), match="no such file")


def test_directory(tmp_path, capsys):
    assert_one_error_line(capsys, str(tmp_path), match="is a directory")


def test_empty_file(tmp_path, capsys):
    p = tmp_path / "e.onnx"
    p.write_bytes(b"")
    assert_one_error_line(capsys, str(p), match="empty")


def test_truncated_file(tmp_path, capsys):
    p = tmp_path / "t.onnx"
    p.write_bytes(mlp_model().SerializeToString()[:200])
    assert_one_error_line(capsys, str(p), match="t.onnx")


def test_random_bytes(tmp_path, capsys):
    p = tmp_path / "r.onnx"
    p.write_bytes(random.Random(1).randbytes(4096))
    assert_one_error_line(capsys, str(p), match="r.onnx")


def test_protobuf_that_is_not_a_model(tmp_path, capsys):
    p = tmp_path / "tensor.onnx"
    p.write_bytes(mlp_model().graph.initializer[0].SerializeToString())
    assert_one_error_line(capsys, str(p), match="ONNX")


def _external(tmp_path: Path, location: str) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    p = folder / "model.onnx"
    onnx.save_model(mlp_model(), str(p), save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    m = onnx.load(str(p), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    p.write_bytes(m.SerializeToString())
    return p


def test_missing_external_data(tmp_path, capsys):
    p = _external(tmp_path, "gone.bin")
    assert_one_error_line(capsys, str(p), match="missing")


@pytest.mark.parametrize("location", ["../w.bin", "/etc/passwd", "sub/../../w.bin"])
def test_external_data_outside_the_folder(tmp_path, capsys, location):
    p = _external(tmp_path, location)
    (tmp_path / "w.bin").write_bytes(b"\0" * 4096)
    assert_one_error_line(capsys, str(p), match="refused")


def test_external_data_symlink_outside(tmp_path, capsys):
    p = _external(tmp_path, "w.bin")
    outside = tmp_path / "outside.bin"
    os.replace(p.parent / "w.bin", outside)
    (p.parent / "w.bin").symlink_to(outside)
    assert_one_error_line(capsys, str(p), match="refused")


def test_ir_version_too_new(tmp_path, capsys):
    m = mlp_model()
    m.ir_version = onnx.IR_VERSION + 1
    p = tmp_path / "ir.onnx"
    p.write_bytes(m.SerializeToString())
    assert_one_error_line(capsys, str(p), match="IR version")


def test_opset_too_new(tmp_path, capsys):
    m = mlp_model()
    m.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    p = tmp_path / "opset.onnx"
    p.write_bytes(m.SerializeToString())
    assert_one_error_line(capsys, str(p), match="opset")


def test_graph_with_a_cycle(tmp_path, capsys):
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["b"], name="relu")]
    graph = helper.make_graph(
        nodes, "loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    p = tmp_path / "cycle.onnx"
    p.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                    ir_version=8).SerializeToString())
    assert_one_error_line(capsys, str(p), match="cycle")


def test_duplicate_names_are_listed_uniquely(tmp_path, capsys):
    m = mlp_model()
    for n in m.graph.node:
        n.name = "dup"
    m.graph.node[1].name = ""
    p = tmp_path / "dup.onnx"
    p.write_bytes(m.SerializeToString())
    code, out, _ = run(capsys, str(p), "--json", "-")
    assert code == 0
    names = [n["name"] for n in json.loads(out)["nodes"]]
    assert names == ["dup", "Relu_1", "dup__2"]


@pytest.mark.parametrize("flag", ["seq", "seq=abc", "seq=0"])
def test_bad_dim_flag(tmp_path, capsys, flag):
    p = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(p))
    assert_one_error_line(capsys, str(p), "--dim", flag, match="--dim")


def test_usage_error_exit_code_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect"])
    assert info.value.code == 2


def test_console_script_in_a_subprocess(tmp_path):
    p = tmp_path / "noise.onnx"
    p.write_bytes(b"\x08\x07garbage" * 10)
    proc = subprocess.run([sys.executable, "-m", "opstudio", "inspect", str(p)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert proc.stdout == ""


def test_inspect_reads_no_weight_data(tmp_path, capsys, monkeypatch) -> None:
    from onnx import external_data_helper

    from opstudio.core.model import model_io

    path = tmp_path / "model.onnx"
    onnx.save_model(mlp_model(), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)

    def refuse(*_args, **_kwargs):
        raise AssertionError("weight data was read")

    monkeypatch.setattr(model_io, "_read_range", refuse)
    monkeypatch.setattr(external_data_helper, "load_external_data_for_model", refuse)
    monkeypatch.setattr(np, "memmap", refuse)
    code, out, err = run(capsys, str(path), "--dim", "batch=2")
    assert code == 0, err
    assert "fc1" in out and "2.5 KiB of weights" in out
