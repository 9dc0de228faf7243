"""What flows into the weights: statistics of a node's input activations on calibration samples.

Activation-aware techniques weigh a weight's columns by the inputs they multiply: SVD-LLM whitens
by the Gram matrix XᵀX before truncating, ASVD and AWQ scale by mean |x|, Wanda scores a weight by
|W|·‖x‖, SmoothQuant divides by max |x|. All of them need the same few statistics of the input of
each chosen MatMul/Gemm, taken over every position of every calibration sample. The model is run
once with those inputs added as graph outputs; nodes that read the same tensor (q/k/v, gate/up
projections) share its statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from opstudio.core.errors import OpstudioError
from opstudio.core.model.graph_utils import copy_model
from opstudio.core.model.runtime import create_session, session_options
from opstudio.core.passes.base import PassContext
from opstudio.core.progress import part


@dataclass
class InputStats:
    """Statistics of one activation tensor, flattened to rows of its last axis (K features)."""

    rows: int
    sq_norm: np.ndarray  # [K] Σ x² over rows (‖x_j‖² per input feature)
    abs_mean: np.ndarray  # [K] mean |x| per input feature
    abs_max: np.ndarray  # [K] max |x| per input feature (SmoothQuant's outlier measure)
    gram: np.ndarray | None = None  # [K, K] Σ xᵀx (float64), when asked for

    @property
    def norm(self) -> np.ndarray:
        return np.sqrt(self.sq_norm)


def input_stats(model: onnx.ModelProto, node_names: Sequence[str],
                samples: Sequence[Mapping[str, np.ndarray]], *, gram: bool = False,
                ctx: PassContext | None = None) -> dict[str, InputStats]:
    """Per named node: statistics of its first input over ``samples``."""
    if not samples:
        raise OpstudioError("no calibration samples to measure activations on")
    by_name = {n.name: n for n in model.graph.node}
    tensor_of = {name: by_name[name].input[0] for name in node_names}
    tensors = list(dict.fromkeys(tensor_of.values()))
    probe = copy_model(model)
    present = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in present:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = session_options()
    try:
        session = create_session(probe, options)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise OpstudioError(f"cannot run the model to measure activations "
                            f"({str(exc).splitlines()[0][:200]})") from exc
    del probe
    stats: dict[str, InputStats] = {}
    for i, feeds in enumerate(samples):
        if ctx is not None:
            ctx.check_cancelled()
            ctx.report(i / len(samples), f"measuring activations on sample {i + 1}/{len(samples)}")
        try:
            values = session.run(tensors, dict(feeds))
        except Exception as exc:  # bad calibration inputs surface here
            raise OpstudioError(f"running the model on calibration sample {i + 1} failed "
                                f"({str(exc).splitlines()[0][:200]})") from exc
        for name, value in zip(tensors, values):
            x = np.asarray(value, dtype=np.float64)
            x = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
            _accumulate(stats, name, x, gram)
    for entry in stats.values():
        entry.abs_mean = entry.abs_mean / max(entry.rows, 1)
    return {node: stats[tensor] for node, tensor in tensor_of.items()}


def calibrated_stats(model: onnx.ModelProto, node_names: Sequence[str],
                     params: Mapping[str, Any], ctx: PassContext, what: str, *,
                     gram: bool = False) -> tuple[dict[str, InputStats], int]:
    """``input_stats`` on the samples a step's ``calibration``/``samples`` params name, with
    progress reported as ``what`` between 10 % and 30 % of the step; and the sample count."""
    from opstudio.core.passes._calibration import calibration_samples

    samples = calibration_samples(model, params["calibration"], params["samples"], ctx)

    measuring = PassContext(progress=part(ctx.report, 0.1, 0.3, what), cancelled=ctx.cancelled)
    return input_stats(model, node_names, samples, gram=gram, ctx=measuring), len(samples)


def _accumulate(stats: dict[str, InputStats], name: str, x: np.ndarray, gram: bool) -> None:
    entry = stats.get(name)
    if entry is None:
        k = x.shape[1]
        entry = stats[name] = InputStats(rows=0, sq_norm=np.zeros(k), abs_mean=np.zeros(k),
                                         abs_max=np.zeros(k),
                                         gram=np.zeros((k, k)) if gram else None)
    entry.rows += x.shape[0]
    entry.sq_norm += np.einsum("ij,ij->j", x, x)
    magnitude = np.abs(x)
    entry.abs_mean += magnitude.sum(axis=0)  # a sum until input_stats divides by the rows
    if x.shape[0]:
        np.maximum(entry.abs_max, magnitude.max(axis=0), out=entry.abs_max)
    if entry.gram is not None:
        entry.gram += x.T @ x
