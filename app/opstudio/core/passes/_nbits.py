"""Which MatMulNBits accuracy level runs fastest on this machine.

onnxruntime's ``MatMulNBits`` (block-quantized 4/8-bit weights) computes at an ``accuracy_level``:
1 float32, 2 float16, 3 bfloat16, 4 int8 (the activations are quantized per block too), 0 unset
(float32). Which is fastest depends on the CPU and the onnxruntime build: measured here, 8-bit
weights run 50–70× slower at level 1 than at level 4, while 4-bit weights differ by ~10 %. So the
passes measure instead of assuming: a 2048×2048 weight at each level, as a decode GEMV (one row)
and a prefill GEMM (128 rows), timed in alternating rounds; the level with the lowest geometric
mean of the two medians wins. The figures are cached per machine, thread count and onnxruntime
version beside the roofline's.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.cache import cache_dir, machine_key
from opstudio.core.fileio import write_text_atomic
from opstudio.core.model.runtime import session_options
from opstudio.core.passes._quiet_ort import quiet_onnxruntime_logs

LEVEL_NAMES = {0: "unset (float32)", 1: "float32", 2: "float16", 3: "bfloat16", 4: "int8"}
_SIZE = 2048
_PREFILL_ROWS = 128
_ROUNDS = 15


@dataclass(frozen=True)
class LevelChoice:
    level: int
    bits: int
    block_size: int
    # level -> [decode ms, prefill ms], medians of the same interleaved rounds
    times_ms: dict[int, list[float]] = field(default_factory=dict)

    def describe(self) -> str:
        mine = self.times_ms.get(self.level)
        others = ", ".join(f"level {lv} {t[0]:.2f}/{t[1]:.1f} ms"
                           for lv, t in sorted(self.times_ms.items()) if lv != self.level)
        measured = (f" (decode/prefill of a {_SIZE}×{_SIZE} weight: {mine[0]:.2f}/{mine[1]:.1f} ms"
                    f"; {others})") if mine else ""
        return (f"accuracy level {self.level} ({LEVEL_NAMES[self.level]} compute), the fastest "
                f"on this machine{measured}")


def candidate_levels() -> tuple[int, ...]:
    # x86 onnxruntime builds have no float16/bfloat16 kernels for MatMulNBits: levels 2 and 3
    # fall back to float32 there and only add noise to the choice
    arm = platform.machine().lower() in ("arm64", "aarch64")
    return (1, 2, 4) if arm else (1, 4)


def fastest_level(bits: int, block_size: int, threads: int = 0, *,
                  use_cache: bool = True) -> LevelChoice:
    """The accuracy level to use by default for ``bits``-bit weights in blocks of ``block_size``."""
    key = f"nbits|{bits}|{block_size}|{machine_key(threads)}"
    path = cache_dir() / "nbits.json"
    if use_cache:
        known = _read(path).get(key)
        if isinstance(known, dict):
            try:
                return LevelChoice(level=int(known["level"]), bits=bits, block_size=block_size,
                                   times_ms={int(k): list(v) for k, v in known["times_ms"].items()})
            except (KeyError, TypeError, ValueError):
                pass  # a broken entry is measured again
    choice = measure_levels(bits, block_size, threads)
    if use_cache:
        data = _read(path)
        data[key] = asdict(choice)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(data, indent=2), overwrite=True)
        except OSError:
            pass  # caching is a convenience, never a failure
    return choice


def measure_levels(bits: int, block_size: int, threads: int = 0,
                   levels: tuple[int, ...] | None = None) -> LevelChoice:
    import onnxruntime as ort

    levels = levels or candidate_levels()
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((_SIZE, _SIZE)) * 0.02).astype(np.float32)
    options = session_options(threads=threads)
    sessions = {}
    for level in levels:
        model = quantized_matmul(weight, bits, block_size, level)
        sessions[level] = ort.InferenceSession(model.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
    feeds = {rows: rng.standard_normal((rows, _SIZE)).astype(np.float32)
             for rows in (1, _PREFILL_ROWS)}
    times: dict[int, dict[int, list[float]]] = {lv: {1: [], _PREFILL_ROWS: []} for lv in levels}
    for rows, x in feeds.items():
        for s in sessions.values():
            s.run(None, {"x": x})  # warm-up: packing, thread pool
        for r in range(_ROUNDS):
            order = levels if r % 2 == 0 else tuple(reversed(levels))
            for level in order:
                t0 = time.perf_counter()
                sessions[level].run(None, {"x": x})
                times[level][rows].append(time.perf_counter() - t0)
    medians = {lv: [float(np.median(t[1])) * 1e3, float(np.median(t[_PREFILL_ROWS])) * 1e3]
               for lv, t in times.items()}
    best = min(levels, key=lambda lv: math.prod(medians[lv]))
    return LevelChoice(level=best, bits=bits, block_size=block_size,
                       times_ms={lv: [round(v, 4) for v in m] for lv, m in medians.items()})


def quantized_matmul(weight: np.ndarray, bits: int, block_size: int,
                     level: int) -> onnx.ModelProto:
    """``x @ weight`` as one MatMulNBits node, made by onnxruntime's own quantizer."""
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "nbits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # imported inside: the module configures an unconfigured root logger when it loads
    with quiet_onnxruntime_logs():
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                              accuracy_level=level, bits=bits)
        quantizer = MatMulNBitsQuantizer(model, algo_config=config)
        quantizer.process()
    return quantizer.model.model


def _read(path: Any) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
