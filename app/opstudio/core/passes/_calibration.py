"""Calibration inputs for the techniques that look at activations.

int8-static calibrates activation ranges, GPTQ and SVD-LLM need the inputs' second moments,
Wanda-style pruning their norms. All take the same two parameters: ``calibration`` (``"random"``
for synthetic inputs, or an ``.npz`` with one array per model input, first axis = samples) and
``samples``; samples the optimizer was given (``PassContext.inputs``, e.g. a real prompt) come first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.measure.inputs import make_inputs
from opstudio.core.passes.base import ParamSpec, PassContext


def calibration_params(samples: int) -> tuple[ParamSpec, ParamSpec]:
    return (
        ParamSpec("calibration", "path", "random", "Calibration data",
                  "'random' for synthetic inputs, or an .npz file with one array per input "
                  "(first axis = samples)"),
        ParamSpec("samples", "int", samples, "Samples", "calibration samples to use",
                  minimum=1, maximum=10000),
    )


def check_calibration(technique: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` as given, once its ``calibration`` source is known to be usable."""
    source = params["calibration"]
    if source != "random":
        path = Path(source)
        if path.suffix.lower() != ".npz":
            raise OpstudioError(
                f"{technique}: parameter 'calibration' must be 'random' or an .npz file, "
                f"not {source!r}")
        if not path.is_file():
            raise OpstudioError(f"{technique}: calibration file {source} does not exist")
    return params


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def calibration_samples(model: onnx.ModelProto, source: str, count: int,
                        ctx: PassContext) -> list[dict[str, np.ndarray]]:
    """Up to ``count`` feeds: from an .npz file, or the context's samples topped up at random."""
    if source != "random":
        return load_npz_samples(model, Path(source), count)
    samples = [dict(s) for s in ctx.inputs][:count]
    if len(samples) < count:
        shapes = {k: list(v.shape) for k, v in samples[0].items()} if samples else {}
        for seed in range(len(samples), count):
            samples.append(dict(make_inputs(model, {}, shapes, None, seed)))
    return samples


def load_npz_samples(model: onnx.ModelProto, path: Path, count: int) -> list[dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise OpstudioError(f"{path}: not a readable .npz file ({exc})") from None
    per_input: dict[str, list[np.ndarray]] = {}
    for info in model_inputs(model):
        if info.name not in arrays:
            raise OpstudioError(f"{path}: no array for model input '{info.name}'")
        array = arrays[info.name]
        rank = len(info.type.tensor_type.shape.dim) if info.type.tensor_type.HasField("shape") else None
        if rank is not None and array.ndim == rank + 1:
            per_input[info.name] = [array[k] for k in range(array.shape[0])]
        else:
            per_input[info.name] = [array]
    n = min(count, *(len(v) for v in per_input.values())) if per_input else 0
    if n == 0:
        raise OpstudioError(f"{path}: holds no calibration samples")
    return [{name: values[k] for name, values in per_input.items()} for k in range(n)]
