"""Roofline figures: intensity and bound per operator, fused groups as one point, the cache."""

from __future__ import annotations

import json

import pytest
from onnx import TensorProto, helper

from opstudio.core.measure.roofline import (
    Machine,
    analyze_roofline,
    cached_machine,
    measure_machine,
    profile_roofline,
)
from opstudio.core.model.graph import analyze
from profile_builders import node_stats, profile_of

MACHINE = Machine(peak_gflops=100.0, bandwidth_gbs=10.0, threads=1, onnxruntime="x",
                  measured_at=0.0, peak_int8_gops=400.0)  # ridge at 10 FLOP/byte (INT8: 40)


def matmul_relu(m: int, k: int, n: int):
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Relu", ["h"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [helper.make_tensor("w", TensorProto.FLOAT, [k, n], [0.0] * (k * n))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def stats(name, op, ms, group=()):
    return node_stats(name, ms, op, group, share=0.5)


def test_a_big_matmul_is_compute_bound_and_a_relu_memory_bound():
    graph = analyze(matmul_relu(256, 256, 256))
    points = {p.name: p for p in analyze_roofline(graph, {"mm": 1.0, "relu": 0.1}, MACHINE)}
    mm, relu = points["mm"], points["relu"]
    # 2·256³ FLOPs over (3 · 256² floats · 4 bytes)
    assert mm.flops == 2 * 256**3
    assert mm.bytes_moved == 3 * 256 * 256 * 4
    assert mm.intensity == pytest.approx(2 * 256**3 / (3 * 256 * 256 * 4))
    assert mm.bound == "compute" and relu.bound == "memory"
    assert mm.achieved_gflops == pytest.approx(2 * 256**3 / 1e-3 / 1e9)
    assert mm.attainable_gflops == MACHINE.peak_gflops
    assert relu.attainable_gflops == pytest.approx(relu.intensity * MACHINE.bandwidth_gbs)
    assert mm.efficiency > 0


def test_a_thin_matmul_is_memory_bound():
    graph = analyze(matmul_relu(1, 1024, 1024))  # decode-style: one token
    (mm,) = [p for p in analyze_roofline(graph, {"mm": 0.5}, MACHINE)]
    assert mm.intensity < MACHINE.ridge and mm.bound == "memory"


def test_a_fused_group_is_one_point_with_the_work_of_all_its_members():
    graph = analyze(matmul_relu(64, 64, 64))
    prof = profile_of(stats("mm", "MatMul", 0.2, group=["mm", "relu"]))
    (point,) = profile_roofline(graph, prof, MACHINE)
    mm, relu = graph.node("mm"), graph.node("relu")
    assert point.flops == mm.flops + relu.flops
    assert point.bytes_moved == mm.bytes_moved + relu.bytes_moved
    assert point.ms == 0.2


def test_operators_without_flops_or_time_get_no_point():
    graph = analyze(matmul_relu(8, 8, 8))
    assert analyze_roofline(graph, {"mm": 0.0}, MACHINE) == []


def test_the_machine_is_measured_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cached_machine(1) is None
    first = measure_machine(1, gemm_n=128, stream_mb=4, repeats=2)
    assert first.peak_gflops > 0 and first.bandwidth_gbs > 0 and first.ridge > 0
    assert first.peak_int8_gops > 0
    assert cached_machine(1) == first
    assert measure_machine(1, gemm_n=128, stream_mb=4, repeats=2) == first  # no new measure
    again = measure_machine(1, refresh=True, gemm_n=128, stream_mb=4, repeats=2)
    assert again.measured_at >= first.measured_at and cached_machine(1) == again
    assert cached_machine(2) is None  # per thread count
    # a broken cache is measured again, never an error
    (tmp_path / "opstudio" / "roofline.json").write_text("{not json")
    assert cached_machine(1) is None
    assert measure_machine(1, gemm_n=128, stream_mb=4, repeats=2).peak_gflops > 0
    assert json.loads((tmp_path / "opstudio" / "roofline.json").read_text())
    # figures cached before the INT8 roof existed are measured again
    cache = tmp_path / "opstudio" / "roofline.json"
    data = json.loads(cache.read_text())
    for entry in data.values():
        del entry["peak_int8_gops"]
    cache.write_text(json.dumps(data))
    assert cached_machine(1) is None


def test_an_int8_model_is_placed_per_original_node_under_the_int8_roof():
    from opstudio.core.model.provenance import derived_nodes
    from opstudio.core.plan.optimize import optimize
    from opstudio.core.plan.recipe import Recipe, Step

    model = matmul_relu(64, 256, 256)
    model.graph.initializer[0].CopyFrom(helper.make_tensor(
        "w", TensorProto.FLOAT, [256, 256], [((i * 7) % 13 - 6) / 6.0 for i in range(256 * 256)]))
    quantized = optimize(model, Recipe([Step("int8-dynamic", {}, nodes=["mm"])])).model
    graph = analyze(quantized)
    assert "mm" not in {n.name for n in graph.nodes}  # the MatMul is now other nodes
    prof = profile_of(stats("mm", "MatMulInteger", 0.05), stats("relu", "Relu", 0.01))
    points = {p.name: p for p in profile_roofline(graph, prof, MACHINE, derived_nodes(quantized))}
    mm = points["mm"]
    integer = [n for n in graph.nodes if n.op_type == "MatMulInteger"]
    assert len(integer) == 1 and mm.flops >= integer[0].flops == 2 * 64 * 256 * 256
    assert mm.precision == "int8"
    assert mm.attainable_gflops == pytest.approx(min(400.0, mm.intensity * 10.0))
    assert points["relu"].precision == "fp32"
    assert integer[0].name in derived_nodes(quantized)["mm"]
    assert "relu" not in derived_nodes(quantized)  # untouched nodes stand for themselves
    # without the provenance the row finds none of the nodes that stand for it
    assert "mm" not in {p.name for p in profile_roofline(graph, prof, MACHINE)}


def test_a_memory_bound_point_above_the_dram_roof_is_read_from_cache():
    graph = analyze(matmul_relu(256, 256, 256))
    fast = {p.name: p for p in analyze_roofline(graph, {"relu": 1e-4}, MACHINE)}["relu"]
    slow = {p.name: p for p in analyze_roofline(graph, {"relu": 1.0}, MACHINE)}["relu"]
    assert fast.from_cache and fast.describe_bound() == "memory (cache)"
    assert not slow.from_cache and slow.describe_bound() == "memory"
