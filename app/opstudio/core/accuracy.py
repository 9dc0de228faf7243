"""How far an optimized model's outputs are from the original's on the same inputs.

Per output: max and mean absolute error, cosine similarity and SNR (computed on the flattened
arrays in float64), the rate of exactly equal elements, and top-1 agreement for classifier-like
outputs (a float output whose last dim has ≥ 2 entries: ``[batch, classes]`` or
``[batch, seq, vocab]``; the share of rows whose argmax is the same).

``snr_db = 10·log10(Σ ref² / Σ (new − ref)²)`` is ``inf`` when the outputs are identical; JSON has
no infinity, so ``to_json`` writes ``null`` there (and ``"identical": true`` says why). Outputs
that are not floating point (ids, masks, counts) get only the absolute errors and the equality
rate; their cosine, SNR and top-1 are ``null``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError


@dataclass
class OutputAccuracy:
    name: str
    shape: list[int]
    max_abs_err: float
    mean_abs_err: float
    cosine: float | None
    snr_db: float | None  # inf when identical
    top1_agreement: float | None
    equal_rate: float = 1.0  # share of elements exactly equal

    @property
    def identical(self) -> bool:
        return self.equal_rate == 1.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape),
                "max_abs_err": _finite(self.max_abs_err), "mean_abs_err": _finite(self.mean_abs_err),
                "cosine": _finite(self.cosine), "snr_db": _finite(self.snr_db),
                "top1_agreement": self.top1_agreement, "equal_rate": self.equal_rate,
                "identical": self.identical}


@dataclass
class AccuracyReport:
    outputs: list[OutputAccuracy] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"outputs": [o.to_json() for o in self.outputs]}

    def worst_cosine(self) -> float | None:
        values = [o.cosine for o in self.outputs if o.cosine is not None]
        return min(values) if values else None


def compare_outputs(ref: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> AccuracyReport:
    """Metrics for every output of ``ref`` (in its order); ``new`` must have the same outputs."""
    outputs: list[OutputAccuracy] = []
    for name, a in ref.items():
        if name not in new:
            raise OpstudioError(f"output '{name}' is missing from the optimized model")
        outputs.append(_compare_one(name, np.asarray(a), np.asarray(new[name])))
    return AccuracyReport(outputs)


def _compare_one(name: str, a: np.ndarray, b: np.ndarray) -> OutputAccuracy:
    if a.shape != b.shape:
        raise OpstudioError(f"output '{name}': shape {list(b.shape)} differs from the "
                            f"original's {list(a.shape)}")
    shape = [int(d) for d in a.shape]
    if a.size == 0:
        return OutputAccuracy(name, shape, 0.0, 0.0, None, None, None, 1.0)
    is_float = np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating)
    equal_rate = float(np.mean(a == b)) if not is_float else float(
        np.mean((a == b) | (np.isnan(a) & np.isnan(b))))
    numeric = np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_
    if not numeric:
        return OutputAccuracy(name, shape, math.nan, math.nan, None, None, None, equal_rate)
    x = a.astype(np.float64).ravel()
    y = b.astype(np.float64).ravel()
    err = y - x
    abs_err = np.abs(err)
    max_abs, mean_abs = float(abs_err.max()), float(abs_err.mean())
    if not is_float:
        return OutputAccuracy(name, shape, max_abs, mean_abs, None, None, None, equal_rate)
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 and ny == 0.0:
        cosine = 1.0
    elif nx == 0.0 or ny == 0.0 or not (math.isfinite(nx) and math.isfinite(ny)):
        cosine = 0.0 if math.isfinite(nx) and math.isfinite(ny) else math.nan
    else:
        cosine = float(np.dot(x, y) / (nx * ny))
    signal, noise = float(np.sum(x * x)), float(np.sum(err * err))
    if noise == 0.0:
        snr = math.inf
    elif signal == 0.0:
        snr = -math.inf
    else:
        snr = 10.0 * math.log10(signal / noise)
    top1 = None
    if a.ndim >= 1 and a.shape[-1] >= 2:
        rows_a = a.reshape(-1, a.shape[-1])
        rows_b = b.reshape(-1, b.shape[-1])
        top1 = float(np.mean(np.argmax(rows_a, axis=-1) == np.argmax(rows_b, axis=-1)))
    return OutputAccuracy(name, shape, max_abs, mean_abs, cosine, snr, top1, equal_rate)


def run_outputs(model_or_path: onnx.ModelProto | str | os.PathLike[str],
                inputs: Mapping[str, np.ndarray], threads: int = 1,
                opt_level: str = "all") -> dict[str, np.ndarray]:
    """All outputs of one onnxruntime run on the CPU, by name, in the model's order."""
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if opt_level not in levels:
        raise OpstudioError(f"unknown optimization level {opt_level!r}; "
                            f"expected one of {', '.join(levels)}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = levels[opt_level]
    options.log_severity_level = 3
    source = (model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto)
              else str(model_or_path))
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        feeds = {i.name: inputs[i.name] for i in session.get_inputs() if i.name in inputs}
        values = session.run(names, feeds)
    except Exception as exc:  # onnxruntime's own exception types
        text = str(exc).strip().splitlines()
        raise OpstudioError(f"onnxruntime could not run the model "
                            f"({text[0][:300] if text else type(exc).__name__})") from None
    return dict(zip(names, values))


def evaluate(before: onnx.ModelProto | str | os.PathLike[str],
             after: onnx.ModelProto | str | os.PathLike[str],
             inputs: Mapping[str, np.ndarray], threads: int = 1) -> AccuracyReport:
    """Run both models on ``inputs`` and compare their outputs."""
    return compare_outputs(run_outputs(before, inputs, threads), run_outputs(after, inputs, threads))


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return value
