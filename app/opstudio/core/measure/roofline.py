"""Roofline: is an operator limited by arithmetic or by memory traffic on this machine?

The machine's ceilings are measured once through onnxruntime itself (a large GEMM for peak
GFLOP/s, a large elementwise Add for memory bandwidth) and cached per machine, thread count and
onnxruntime version. For each profiled operator, arithmetic intensity (FLOPs per byte moved)
against the ridge point (peak / bandwidth) says which ceiling applies, and achieved GFLOP/s
against the attainable one says how close the kernel gets.

Integer kernels (MatMulInteger, ConvInteger, QLinear*, the fused DynamicQuantizeMatMul) have a
roof of their own, measured the same way with an INT8 GEMM: against the fp32 peak, an INT8
MatMul would sit at 300 % of "its" roof. A memory-bound operator above the DRAM roof is one whose
data came from cache (the bandwidth is measured on arrays far larger than any cache).

This is what the advice rests on: weight-only INT4 cuts the bytes of memory-bound MatMuls
(decode-style, few tokens), low-rank factorization cuts the FLOPs of compute-bound ones.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from opstudio.core.cache import cache_dir, machine_key
from opstudio.core.model.graph import GraphInfo
from opstudio.core.model.provenance import standing_for
from opstudio.core.model.runtime import session_options
from opstudio.core.progress import part

# Op types whose arithmetic runs on 8-bit integers (on the CPU provider).
INTEGER_OPS = frozenset({"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "QGemm",
                         "DynamicQuantizeMatMul", "MatMulIntegerToFloat"})


@dataclass(frozen=True)
class Machine:
    peak_gflops: float
    bandwidth_gbs: float
    threads: int
    onnxruntime: str
    measured_at: float
    peak_int8_gops: float = 0.0  # integer GEMM ops per second, 0 when not measured

    @property
    def ridge(self) -> float:
        """FLOPs per byte above which the compute ceiling, not memory, limits a kernel."""
        return self.peak_gflops / self.bandwidth_gbs

    def peak(self, precision: str) -> float:
        """The compute roof for ``precision`` ("fp32" or "int8")."""
        if precision == "int8" and self.peak_int8_gops > 0:
            return self.peak_int8_gops
        return self.peak_gflops


@dataclass(frozen=True)
class RooflinePoint:
    name: str
    op_type: str
    flops: int
    bytes_moved: int
    ms: float
    intensity: float  # FLOPs / byte
    achieved_gflops: float
    attainable_gflops: float
    bound: str  # "compute" | "memory"
    precision: str = "fp32"  # "int8" for integer kernels, against the INT8 roof

    @property
    def efficiency(self) -> float:
        return self.achieved_gflops / self.attainable_gflops if self.attainable_gflops else 0.0

    @property
    def from_cache(self) -> bool:
        """Memory-bound yet above the DRAM roof: its data was served from cache."""
        return self.bound == "memory" and self.efficiency > 1.0

    def describe_bound(self) -> str:
        return "memory (cache)" if self.from_cache else self.bound

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["efficiency"] = round(self.efficiency, 4)
        data["from_cache"] = self.from_cache
        return data


def cache_file() -> Path:
    return cache_dir() / "roofline.json"


def measure_machine(threads: int = 0, *, use_cache: bool = True, refresh: bool = False,
                    gemm_n: int = 1024, stream_mb: int = 128, repeats: int = 25) -> Machine:
    """Peak GEMM GFLOP/s and elementwise bandwidth through onnxruntime, cached on disk
    (``refresh`` measures again and replaces the cached figures)."""
    import onnxruntime as ort

    key = machine_key(threads)
    cache = cache_file()
    if use_cache and not refresh:
        known = cached_machine(threads)
        if known is not None:
            return known

    opts = session_options(threads=threads, log_severity=None)
    rng = np.random.default_rng(0)

    gemm = _single_op_model("MatMul", [gemm_n, gemm_n], [gemm_n, gemm_n])
    sess = ort.InferenceSession(gemm.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((gemm_n, gemm_n), dtype=np.float32)
    b = rng.standard_normal((gemm_n, gemm_n), dtype=np.float32)
    t = best_time(lambda: sess.run(None, {"a": a, "b": b}), repeats)
    peak = 2.0 * gemm_n**3 / t / 1e9

    # uint8 activations × int8 weights: what onnxruntime's dynamic quantization runs
    int8 = _single_op_model("MatMulInteger", [gemm_n, gemm_n], [gemm_n, gemm_n],
                            (TensorProto.UINT8, TensorProto.INT8), TensorProto.INT32)
    sess = ort.InferenceSession(int8.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    qa = rng.integers(0, 256, (gemm_n, gemm_n), dtype=np.uint8)
    qb = rng.integers(-128, 128, (gemm_n, gemm_n), dtype=np.int8)
    t = best_time(lambda: sess.run(None, {"a": qa, "b": qb}), repeats)
    peak_int8 = 2.0 * gemm_n**3 / t / 1e9

    n = stream_mb * 2**20 // 4
    add = _single_op_model("Add", [n], [n])
    sess = ort.InferenceSession(add.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = rng.standard_normal(n, dtype=np.float32)
    y = rng.standard_normal(n, dtype=np.float32)
    t = best_time(lambda: sess.run(None, {"a": x, "b": y}), repeats)
    bandwidth = 3.0 * n * 4 / t / 1e9  # two reads, one write

    machine = Machine(round(peak, 2), round(bandwidth, 2), threads, ort.__version__, time.time(),
                      round(peak_int8, 2))
    if use_cache:
        try:
            data = json.loads(cache.read_text()) if cache.is_file() else {}
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError):
            data = {}  # a broken cache is replaced, not kept
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            data[key] = asdict(machine)
            from opstudio.core.fileio import write_text_atomic

            write_text_atomic(cache, json.dumps(data, indent=2), overwrite=True)
        except (OSError, ValueError):
            pass  # caching is a convenience, never a failure
    return machine


def cached_machine(threads: int = 0) -> Machine | None:
    """This machine's ceilings if they were measured before, without measuring."""
    cache = cache_file()
    try:
        entry = json.loads(cache.read_text()).get(machine_key(threads)) if cache.is_file() else None
        machine = Machine(**entry) if entry else None
        # figures cached before the INT8 roof was measured are measured again, all of them
        return machine if machine is not None and machine.peak_int8_gops > 0 else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # a broken cache is simply measured again


def profile_with_machine(model_path: str | Path, settings: Any, *,
                         progress: Callable[[float, str], None] | None = None,
                         cancelled: Callable[[], bool] | None = None) -> tuple[Any, Machine]:
    """A profile plus this machine's ceilings (measured once, then read from the cache), so the
    operators can be placed on the roofline."""
    from opstudio.core.measure.profiler import profile_model

    machine = cached_machine(settings.threads)
    scale = 1.0 if machine is not None else 0.9

    profile = profile_model(model_path, settings, progress=part(progress, 0.0, scale),
                            cancelled=cancelled)
    if machine is None:
        if progress is not None:
            progress(0.9, "measuring this machine's peak GFLOP/s and memory bandwidth (once)")
        machine = measure_machine(settings.threads)
    return profile, machine


def profile_roofline(graph: GraphInfo, profile: Any, machine: Machine,
                     derived: Mapping[str, Sequence[str]] | None = None) -> list[RooflinePoint]:
    """Roofline figures per profiled operator (p50 times). A group of nodes that run as one
    fused kernel is one point: the FLOPs and bytes of all its members against their one time.

    The profile of an optimized model is reported per original node; ``derived``
    (``provenance.derived_nodes`` of the model ``graph`` was analysed from) leads each row to
    the nodes that stand for it now (``fc1`` → ``fc1_quant`` MatMulInteger and its scale Muls)."""
    by_name = {n.name: n for n in graph.nodes}
    points: list[RooflinePoint] = []
    for stats in profile.nodes:
        members = [by_name[n] for n in standing_for(derived or {}, stats.group or [stats.name])
                   if n in by_name]
        flops = sum(m.flops or 0 for m in members)
        moved = sum(m.bytes_moved or 0 for m in members)
        integer = any(m.op_type in INTEGER_OPS for m in members)
        point = _point(stats.name, stats.op_type, flops, moved, stats.p50_ms, machine,
                       "int8" if integer else "fp32")
        if point is not None:
            points.append(point)
    points.sort(key=lambda p: -p.ms)
    return points


def _point(name: str, op_type: str, flops: int, moved: int, ms: float,
           machine: Machine, precision: str = "fp32") -> RooflinePoint | None:
    if not ms or ms <= 0 or not flops or not moved:
        return None
    intensity = flops / moved
    peak = machine.peak(precision)
    return RooflinePoint(
        name=name, op_type=op_type, flops=flops, bytes_moved=moved, ms=ms,
        intensity=intensity, achieved_gflops=flops / (ms * 1e-3) / 1e9,
        attainable_gflops=min(peak, intensity * machine.bandwidth_gbs),
        bound="compute" if intensity >= peak / machine.bandwidth_gbs else "memory",
        precision="int8" if precision == "int8" and machine.peak_int8_gops > 0 else "fp32")


def analyze_roofline(graph: GraphInfo, node_ms: Mapping[str, float],
                     machine: Machine) -> list[RooflinePoint]:
    """Roofline figures for every node with known FLOPs, bytes and a measured time."""
    points: list[RooflinePoint] = []
    for node in graph.nodes:
        point = _point(node.name, node.op_type, node.flops or 0, node.bytes_moved or 0,
                       node_ms.get(node.name) or 0.0, machine,
                       "int8" if node.op_type in INTEGER_OPS else "fp32")
        if point is not None:
            points.append(point)
    points.sort(key=lambda p: -p.ms)
    return points


def dims_from_inputs(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Bind the model's symbolic input dims to the sizes of the arrays actually fed."""
    from opstudio.core.model.graph import input_specs

    dims: dict[str, int] = {}
    for spec in input_specs(model):
        arr = inputs.get(spec.name)
        if arr is None or spec.shape is None or len(spec.shape) != arr.ndim:
            continue
        for d, size in zip(spec.shape, arr.shape):
            if isinstance(d, str):
                dims.setdefault(d, int(size))
    return dims


def _single_op_model(op: str, a_shape: Sequence[int], b_shape: Sequence[int],
                     in_types: tuple[int, int] = (TensorProto.FLOAT, TensorProto.FLOAT),
                     out_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    out_shape = [a_shape[0], b_shape[1]] if op.startswith("MatMul") else list(a_shape)
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])], "roofline",
        [helper.make_tensor_value_info("a", in_types[0], list(a_shape)),
         helper.make_tensor_value_info("b", in_types[1], list(b_shape))],
        [helper.make_tensor_value_info("y", out_type, out_shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def best_time(fn, repeats: int) -> float:
    """The fastest of ``repeats`` runs: a ceiling is the best the machine does, and on a busy
    machine a median ceiling sat below what profiled kernels then reached."""
    fn()  # warm-up: allocations, thread pool start
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.min(times))
