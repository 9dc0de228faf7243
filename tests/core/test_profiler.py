"""Profiling in a child process: statistics, attribution, control flow, overhead, files."""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.errors import Cancelled, OpstudioError
from opstudio.core.measure.profiler import (
    NodeStats,
    Profile,
    ProfileSettings,
    build_profile,
    profile_model,
)
from opstudio.core.model.model_io import load_model, save_model

RNG = np.random.default_rng(0)
FAST = dict(runs=5, warmup=1, threads=1)


def _w(name, shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def mlp(width=256, rows=64, layers=3):
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits += [_w(f"W{i}", (width, width)), _w(f"B{i}", (width,))]
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"], name=f"add{i}"),
                  helper.make_node("Tanh", [f"a{i}"], [f"h{i}"], name=f"tanh{i}")]
        x = f"h{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    return _model(nodes, [_vi("x", ["batch", width])], [_vi("y", ["batch", width])], inits)


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """opstudio's temp folder inside the test's, to check nothing is left behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "sys-tmp"))
    (tmp_path / "sys-tmp").mkdir()
    yield tmp_path / "sys-tmp"


def test_nodes_are_original_names_and_add_up_to_the_run(tmp_path, private_tmp):
    path = tmp_path / "mlp.onnx"
    save_model(mlp(), path)
    p = profile_model(path, ProfileSettings(**FAST, dims={"batch": 64}))
    assert p.runs == 5 and p.attribution == "optimized graph"
    names = {n.name for n in p.nodes}
    assert {"mm0", "mm1", "mm2"} <= names
    mm0 = p.node("mm0")
    assert mm0.op_type == "MatMul" and "add0" in mm0.group
    assert p.node("add0") is mm0  # a group member finds its row
    # every original node appears at most once
    members = [m for n in p.nodes for m in (n.group or [n.name])]
    assert len(members) == len(set(members))
    traced = sum(n.mean_ms for n in p.nodes) + p.unattributed_ms
    assert traced <= p.total_ms["mean"] * 1.001
    assert traced >= 0.6 * p.total_ms["mean"]  # the executor between kernels is the rest
    assert abs(traced + p.untraced_ms - p.total_ms["mean"]) < 1e-6
    assert p.nodes == sorted(p.nodes, key=lambda n: -n.p50_ms)  # one outlier moves no median
    assert all(n.min_ms <= n.p50_ms <= n.p90_ms for n in p.nodes)
    assert abs(sum(n.share for n in p.nodes) - sum(n.mean_ms for n in p.nodes)
               / p.total_ms["mean"]) < 1e-6
    # plain runs measured and compared
    assert p.plain_ms and p.plain_ms["mean"] > 0
    lo, hi = p.overhead["ratio_ci"]
    assert lo <= hi and p.overhead["note"]
    # an overhead is stated only when profiling measurably slows the runs down
    assert p.overhead["ratio"] is None or (p.overhead["ratio"] > 1 and lo > 1)
    # nothing left in opstudio's temp folder (trace JSON, optimized graph, model copies)
    assert not any((private_tmp / "opstudio").iterdir())


def test_disable_level_reports_every_node():
    p = profile_model(mlp(layers=2), ProfileSettings(**FAST, opt_level="disable",
                                                     measure_plain=False))
    assert {n.name for n in p.nodes} == {"mm0", "add0", "tanh0", "mm1", "add1", "tanh1", "out"}
    assert all(n.group == [] and n.kernels == [n.name] for n in p.nodes)
    assert p.plain_ms is None and p.overhead["ratio"] is None


def test_if_branch_kernels_are_not_double_counted():
    w = _w("W", (256, 256))
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["t"], name="then_mm"),
         helper.make_node("Relu", ["t"], ["ty"], name="then_relu")],
        "then", [], [_vi("ty", [128, 256])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["ey"], name="else_neg")],
                               "else", [], [_vi("ey", [128, 256])])
    nodes = [helper.make_node("If", ["c"], ["y"], name="if0", then_branch=then_g,
                              else_branch=else_g)]
    m = _model(nodes, [_vi("x", [128, 256]), _vi("c", [], TensorProto.BOOL)],
               [_vi("y", [128, 256])], [w])
    inputs = {"x": RNG.standard_normal((128, 256)).astype(np.float32), "c": np.array(True)}
    p = profile_model(m, ProfileSettings(**FAST, measure_plain=False), inputs=inputs)
    (node,) = p.nodes
    assert node.name == "if0" and node.op_type == "If"
    assert {"then_mm", "then_relu"} <= set(node.kernels)
    assert node.calls == 1
    assert node.mean_ms <= p.total_ms["mean"]  # branch time counted once
    assert node.share > 0.5
    inner = [e for e in p.kernel_events if e["inner"]]
    assert {e["name"] for e in inner} == {"then_mm", "then_relu"}
    assert all(e["node"] == "if0" for e in p.kernel_events)


def test_loop_body_kernels_count_as_calls():
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4,64] x, int64 n) => (float[4,64] y) {
      cond = Constant<value=bool {1}>()
      y = Loop(n, cond, x) <body = b (int64 i, bool ci, float[4,64] xi) => (bool co, float[4,64] xo) {
        co = Identity(ci)
        xo = Sin(xi)
      }>
    }""")
    m.graph.node[1].name = "loop0"
    inputs = {"x": np.ones((4, 64), np.float32), "n": np.array(4, np.int64)}
    p = profile_model(m, ProfileSettings(**FAST, measure_plain=False), inputs=inputs)
    loop = p.node("loop0")
    assert loop.op_type == "Loop" and loop.calls == 4  # the body ran 4 times per run
    assert {"Sin_1", "Identity_0"} <= set(loop.kernels)
    assert sum(n.mean_ms for n in p.nodes) <= p.total_ms["mean"]


def test_unnamed_nodes_get_opstudio_names(tmp_path):
    m = mlp(layers=1)
    for node in m.graph.node:
        node.name = ""
    path = tmp_path / "unnamed.onnx"
    onnx.save(m, str(path))
    expected = {n.name for n in load_model(path).graph.node}
    p = profile_model(path, ProfileSettings(**FAST, opt_level="disable", measure_plain=False))
    assert {n.name for n in p.nodes} == expected == {"MatMul_0", "Add_1", "Tanh_2", "Identity_3"}


def test_time_budget_stops_early_but_runs_once():
    s = ProfileSettings(runs=100000, warmup=0, threads=1, time_budget_s=0.3, measure_plain=False)
    t0 = time.monotonic()
    p = profile_model(mlp(), s)
    assert 1 <= p.runs < 100000
    assert time.monotonic() - t0 < 20


def test_cancel_and_errors():
    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        profile_model(mlp(), ProfileSettings(runs=10**6, warmup=0, threads=1),
                      cancelled=lambda: time.monotonic() - t0 > 1.0)
    assert time.monotonic() - t0 < 4
    with pytest.raises(OpstudioError, match="execution provider 'NopeExecutionProvider' is not"):
        profile_model(mlp(), ProfileSettings(provider="NopeExecutionProvider"))
    with pytest.raises(OpstudioError, match=r"onnxruntime failed to run the model: \S"):
        profile_model(mlp(), ProfileSettings(**FAST),
                      inputs={"x": np.zeros((2, 7), np.float32)})
    with pytest.raises(OpstudioError, match=r"input 'x' dim 0 \('width'\) is unknown"):
        bad = mlp()
        bad.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "width"
        profile_model(bad, ProfileSettings(**FAST))
    with pytest.raises(OpstudioError, match="optimization level 'max'"):
        ProfileSettings(opt_level="max").validate()


def test_exports_round_trip():
    p = profile_model(mlp(layers=1), ProfileSettings(**FAST))
    data = json.loads(json.dumps(p.to_json()))
    for key in ("model", "settings", "total_ms", "plain_ms", "overhead", "nodes", "op_types",
                "unattributed_ms"):
        assert key in data
    assert set(data["total_ms"]) == {"mean", "p50", "p90", "min", "std"}
    again = Profile.from_json(data)
    assert [n.name for n in again.nodes] == [n.name for n in p.nodes]
    assert again.settings == p.settings
    csv_lines = p.to_csv().splitlines()
    assert csv_lines[0].startswith("name,op_type,mean_ms,p50_ms,p90_ms")
    assert len(csv_lines) == 1 + len(p.nodes)
    trace = json.loads(json.dumps(p.to_chrome_trace()))
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["name"] for e in spans} >= {"model_run", "mm0"}
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)


def test_build_profile_skips_warmup_and_nests_control_flow():
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c) => (float[2] y) {
      a = Relu(x)
      y = If(c) <then_branch = t () => (float[2] o) { o = Neg(a) },
                 else_branch = e () => (float[2] o2) { o2 = Abs(a) }>
    }""")
    m.graph.node[0].name, m.graph.node[1].name = "relu", "if0"

    def run(ts, relu, inner, outer):
        return [{"cat": "Session", "name": "model_run", "ts": ts, "dur": 100},
                {"cat": "Node", "name": "relu_kernel_time", "ts": ts + 1, "dur": relu,
                 "args": {"op_name": "Relu"}},
                {"cat": "Node", "name": "Neg_0_kernel_time", "ts": ts + 30, "dur": inner,
                 "args": {"op_name": "Neg"}},
                {"cat": "Node", "name": "if0_kernel_time", "ts": ts + 20, "dur": outer,
                 "args": {"op_name": "If"}}]

    trace = run(0, 90, 5, 8) + run(1000, 10, 20, 40) + run(2000, 30, 20, 60)
    p = build_profile(m, trace, warmup=1, timed=2)
    assert p.runs == 2
    assert p.node("relu").mean_ms == pytest.approx(0.020)
    assert p.node("if0").mean_ms == pytest.approx(0.050)  # inner Neg not added again
    assert p.node("if0").calls == 1
    assert p.total_ms["mean"] == pytest.approx(0.1)
    assert p.untraced_ms == pytest.approx(0.1 - 0.07)
    assert p.notes == []

    # onnxruntime stops tracing at a million events: the runs it dropped are said, not hidden.
    short = build_profile(m, trace, warmup=1, timed=5)
    assert short.runs == 2
    assert len(short.notes) == 1 and "3 of the 6 runs" in short.notes[0]
    assert Profile.from_json(short.to_json()).notes == short.notes


def test_nodestats_json_keys():
    n = NodeStats("mm0", "MatMul", 1, 1, 1, 1, 0, 1, 0.5, ["k"], ["mm0", "add0"])
    assert set(n.to_json()) >= {"name", "op_type", "mean_ms", "p50_ms", "p90_ms", "share",
                                "kernels", "group"}


def test_int8_pass_output_is_reported_per_original_node():
    from opstudio.core.passes.base import PassContext
    from opstudio.core.passes.quantize_int8 import Int8DynamicPass

    result = Int8DynamicPass().apply(mlp(layers=2), ["mm0"], {}, PassContext())
    p = profile_model(result.model, ProfileSettings(**FAST, dims={"batch": 64},
                                                    measure_plain=False))
    mm0 = p.node("mm0")
    assert mm0 is not None and mm0.name == "mm0"
    assert any("mm0_quant" in k for k in mm0.kernels)
    names = {n.name for n in p.nodes}
    assert "mm1" in names
    assert not names & {"x_QuantizeLinear", "mm0_quant", "mm0_quant_scales_mul"}
    assert p.unattributed_ms == 0


def test_folders_of_dead_processes_are_swept(private_tmp):
    import subprocess

    from opstudio.core import tempdir

    dead = subprocess.Popen(["true"])
    dead.wait()
    root = private_tmp / "opstudio"
    root.mkdir(exist_ok=True)
    stale = root / f"profile-{dead.pid}-abc"
    stale.mkdir()
    (stale / "optimized.onnx").write_bytes(b"x")
    mine = root / f"profile-{os.getpid()}-def"
    mine.mkdir()
    assert tempdir.sweep_stale(root) == 1
    assert not stale.exists() and mine.exists()
    mine.rmdir()


def test_trace_is_read_a_line_at_a_time_keeping_only_runs_and_kernels(tmp_path):
    import json as _json

    from opstudio.core.measure.profiler import read_trace

    events = [
        {"cat": "Session", "pid": 1, "tid": 1, "dur": 5, "ts": 0, "ph": "X",
         "name": "session_initialization", "args": {}},
        {"cat": "Node", "pid": 1, "tid": 1, "dur": 0, "ts": 10, "ph": "X",
         "name": "mm0_fence_before", "args": {"op_name": "MatMul"}},
        {"cat": "Node", "pid": 1, "tid": 1, "dur": 7, "ts": 11, "ph": "X",
         "name": "mm0_kernel_time",
         "args": {"op_name": "MatMul", "provider": "CPUExecutionProvider",
                  "input_type_shape": [{"float": [1, 64]}], "thread_scheduling_stats": {}}},
        {"cat": "Session", "pid": 1, "tid": 1, "dur": 20, "ts": 9, "ph": "X",
         "name": "model_run", "args": {}},
    ]
    per_line = tmp_path / "lines.json"
    per_line.write_text("[\n" + ",\n".join(_json.dumps(e) for e in events) + "\n]\n")
    one_line = tmp_path / "whole.json"
    one_line.write_text(_json.dumps(events, indent=2))
    got = read_trace(per_line)
    assert got == read_trace(one_line)
    assert [e["name"] for e in got] == ["mm0_kernel_time", "model_run"]
    assert got[0] == {"cat": "Node", "tid": 1, "dur": 7, "ts": 11, "name": "mm0_kernel_time",
                      "args": {"op_name": "MatMul", "provider": "CPUExecutionProvider"}}


def test_fast_trace_reading_gives_what_the_json_parser_gives(tmp_path):
    """On a real onnxruntime trace (fused MatMul+Add kernels, Tanh), the regular-expression
    reader and the JSON parser agree event for event."""
    import glob

    import onnxruntime as ort

    from opstudio.core.measure.profiler import read_trace

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "trace")
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(mlp().SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.zeros((2, 256), np.float32)
    for _ in range(3):
        sess.run(None, {"x": x})
    path = sess.end_profiling()
    assert glob.glob(str(tmp_path / "trace*.json"))
    fast, slow = read_trace(path), read_trace(path, fast=False)
    assert fast == slow
    assert sum(e["name"] == "model_run" for e in fast) == 3
    assert any(e["args"].get("op_name") for e in fast if e["name"] != "model_run")
