"""``opstudio profile``: exit codes, table, JSON/CSV/trace outputs, input errors."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from opstudio.cli import main
from opstudio.core.model.model_io import save_model

FAST = ["--runs", "3", "--warmup", "1", "--threads", "1"]


@pytest.fixture
def model_path(tmp_path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((64,)).astype(np.float32), "B")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["t"], name="mm0"),
             helper.make_node("Add", ["t", "B"], ["u"], name="add0"),
             helper.make_node("Sigmoid", ["u"], ["y"], name="sig0")]
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 64])],
                          inits)
    path = tmp_path / "m.onnx"
    save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_table_and_all_outputs(model_path, tmp_path, capsys):
    out_json, out_csv, out_trace = tmp_path / "p.json", tmp_path / "p.csv", tmp_path / "t.json"
    code = main(["profile", str(model_path), *FAST, "--dim", "seq=16", "--json", str(out_json),
                 "--csv", str(out_csv), "--trace", str(out_trace)])
    assert code == 0
    text = capsys.readouterr().out
    assert "operator" in text and "mm0" in text and "total (profiled, model_run)" in text
    assert "total (plain, no profiler)" in text and "profiling overhead" in text
    assert "unattributed" in text

    data = json.loads(out_json.read_text())
    assert {"model", "settings", "total_ms", "overhead", "nodes", "op_types",
            "unattributed_ms"} <= set(data)
    assert set(data["total_ms"]) == {"mean", "p50", "p90", "min", "std"}
    assert data["settings"]["runs"] == 3 and data["settings"]["dims"] == {"seq": 16}
    node = data["nodes"][0]
    assert {"name", "op_type", "mean_ms", "p50_ms", "p90_ms", "share", "kernels",
            "group"} <= set(node)
    names = {n["name"] for n in data["nodes"]}
    assert "mm0" in names
    covered = [m for n in data["nodes"] for m in (n["group"] or [n["name"]])]
    assert sorted(covered) == ["add0", "mm0", "sig0"]  # each original node exactly once
    assert all(set(r) == {"op_type", "mean_ms", "count"} for r in data["op_types"])

    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert {r["name"] for r in rows} == names
    trace = json.loads(out_trace.read_text())
    assert any(e.get("name") == "model_run" for e in trace["traceEvents"])


def test_json_to_stdout_is_pure_json(model_path, capsys):
    assert main(["profile", str(model_path), *FAST, "--dim", "seq=8", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == str(model_path)


def test_unresolved_dim_is_one_error_line(tmp_path, capsys):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "width"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "width"])])
    path = tmp_path / "w.onnx"
    save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert main(["profile", str(path), *FAST]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: input 'x' dim 1 ('width') is unknown: pass --dim width=N "
                   "or --shape x=1,N")
    assert main(["profile", str(path), *FAST, "--shape", "x=1,5"]) == 0


def test_exit_codes(model_path, tmp_path, capsys):
    assert main(["profile", str(tmp_path / "missing.onnx")]) == 1
    assert "missing.onnx: no such file" in capsys.readouterr().err
    assert main(["profile", str(model_path), "--runs", "0"]) == 1
    assert "runs must be at least 1" in capsys.readouterr().err
    assert main(["profile", str(model_path), "--dim", "seq"]) == 1
    assert "expected NAME=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["profile", str(model_path), "--opt-level", "max"])
    assert info.value.code == 2


def test_unknown_custom_op_is_named_and_the_graph_still_inspects(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    from opstudio.cli import main

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="r0"),
         helper.make_node("FancyOp", ["a"], ["b"], name="fancy", domain="com.acme"),
         helper.make_node("Relu", ["b"], ["y"], name="r1")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.acme", 1)]), path)
    assert main(["inspect", str(path)]) == 0
    assert "com.acme:FancyOp" in capsys.readouterr().out
    assert main(["profile", str(path), "--runs", "1", "--warmup", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "com.acme:FancyOp" in err[0]


def test_roofline_places_the_operators_under_this_machines_ceilings(model_path, tmp_path,
                                                                     capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out_json = tmp_path / "p.json"
    code = main(["profile", str(model_path), *FAST, "--dim", "batch=2", "--dim", "seq=16",
                 "--roofline", "--json", str(out_json)])
    assert code == 0
    text = capsys.readouterr().out
    assert "roofline:" in text and "FLOP/byte" in text and "bound" in text
    roof = json.loads(out_json.read_text())["roofline"]
    assert roof["machine"]["peak_gflops"] > 0 and roof["machine"]["bandwidth_gbs"] > 0
    points = {p["name"]: p for p in roof["points"]}
    mm = next(p for name, p in points.items() if "mm0" in name)
    assert mm["flops"] >= 2 * 2 * 16 * 64 * 64  # the MatMul's FLOPs at batch 2, seq 16
    assert mm["bound"] in ("memory", "compute")
    assert mm["intensity"] == pytest.approx(mm["flops"] / mm["bytes_moved"])
    assert mm["achieved_gflops"] > 0


def test_until_stable_and_the_noise_line(model_path, capsys):
    code = main(["profile", str(model_path), "--runs", "6", "--warmup", "1", "--threads", "1",
                 "--dim", "seq=16", "--until-stable", "90", "--time-budget", "5"])
    # a target any machine reaches: what is checked is the line, not this machine's calm
    assert code == 0
    text = capsys.readouterr().out
    assert "until stable: ±" in text and "(target ±90 %" in text
    assert "noise: " in text and "median ms" in text.splitlines()[0]
    code = main(["profile", str(model_path), *FAST, "--dim", "seq=16", "--until-stable", "0"])
    assert code == 1 and "--until-stable takes a percentage" in capsys.readouterr().err
