"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before INT8.

LLM activations have a few input channels up to ~100× larger than the rest; one per-tensor
activation scale then spends the int8 range on them and rounds every other channel to a few
levels. For ``y = x·W`` the product is unchanged by ``x·diag(1/s) · diag(s)·W``, so per input
channel j the pass divides x by

    s_j = max|x_j|^α / max_k |W_jk|^(1−α)

and multiplies W's row j by s_j: both factors end up with milder outliers (α = 0.5 halves them
in the log domain). Nodes that read the same tensor (q/k/v, gate/up projections) share one
``Mul(x, 1/s)``, so s is taken over the largest weight row of the group. onnxruntime's own route
(``extra_options={"SmoothQuant": True}``) needs neural-compressor 2.x, which needs numpy < 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from opstudio.core import provenance
from opstudio.core.graph_utils import nodes_by_name, topo_sort
from opstudio.core.passes._weights import add_initializer, all_names, remove_unused, unique_name

S_RANGE = (1e-5, 1e5)


def smoothable(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, int]:
    """The nodes among ``names`` that can be smoothed, each with its weight's input-channel axis.

    A MatMul or Gemm whose weight (input 1) is a float32 initializer — ``fold_constant_inputs``
    has run — and whose activation (input 0) is not one; a Gemm with ``transA`` is left alone.
    """
    by_name = nodes_by_name(model.graph)
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, int] = {}
    for name in names:
        node = by_name[name]
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = inits.get(node.input[1])
        if weight is None or node.input[0] in inits \
                or weight.data_type != onnx.TensorProto.FLOAT or len(weight.dims) < 2:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm":
            if attrs.get("transA", 0) or len(weight.dims) != 2:
                continue
            out[name] = 1 if attrs.get("transB", 0) else 0
        else:
            out[name] = len(weight.dims) - 2
    return out


def smoothing_factors(abs_max_x: np.ndarray, abs_max_w: np.ndarray, alpha: float) -> np.ndarray:
    """s per input channel; channels the calibration never saw active keep s = 1."""
    x = np.asarray(abs_max_x, np.float64)
    w = np.asarray(abs_max_w, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(x, alpha) / np.power(w, 1.0 - alpha)
    s = np.where(np.isfinite(s), s, S_RANGE[1])
    s = np.clip(s, *S_RANGE)
    return np.where(x > 0, s, 1.0)


def smooth(model: onnx.ModelProto, axes: Mapping[str, int], alpha: float,
           abs_max: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
    """Rewrite ``model`` in place: per input tensor of the nodes in ``axes``, one
    ``Mul(x, 1/s)`` feeding them and their weights scaled by s.

    ``abs_max`` is max|x| per input channel of each node's input (``InputStats.abs_max``).
    Returns the created Mul's name → the nodes it serves. Nodes whose channel count does not
    match their weight's are left as they were.
    """
    graph = model.graph
    by_name = nodes_by_name(graph)
    inits = {i.name: i for i in graph.initializer}
    groups: dict[str, list[str]] = {}
    for name, axis in axes.items():
        node = by_name[name]
        k = inits[node.input[1]].dims[axis]
        if name in abs_max and np.asarray(abs_max[name]).shape == (k,):
            groups.setdefault(node.input[0], []).append(name)
    taken = all_names(graph)
    created: dict[str, list[str]] = {}
    old_weights: list[str] = []
    for tensor, members in groups.items():
        weights = {}
        for name in members:
            array = numpy_helper.to_array(inits[by_name[name].input[1]])
            weights[name] = np.moveaxis(array, axes[name], 0)  # input channels first
        w_max = np.max([np.abs(w).reshape(w.shape[0], -1).max(axis=1)
                        for w in weights.values()], axis=0)
        s = smoothing_factors(abs_max[members[0]], w_max, alpha)
        for name in members:
            node = by_name[name]
            w = weights[name]
            scaled = (w.astype(np.float64) * s.reshape(-1, *([1] * (w.ndim - 1))))
            scaled = np.moveaxis(scaled.astype(np.float32), 0, axes[name])
            old_weights.append(node.input[1])
            fresh = unique_name(taken, f"{node.input[1]}_smoothed")
            add_initializer(model, scaled, fresh)
            node.input[1] = fresh
        inverse = unique_name(taken, f"{tensor}_smooth_scale")
        add_initializer(model, (1.0 / s).astype(np.float32), inverse)
        smoothed = unique_name(taken, f"{tensor}_smoothed")
        mul = helper.make_node("Mul", [tensor, inverse], [smoothed],
                               name=unique_name(taken, f"{members[0]}_smooth"))
        provenance.set_origin(mul, [o for name in members
                                    for o in provenance.get_origin(by_name[name])])
        for name in members:
            by_name[name].input[0] = smoothed
        graph.node.append(mul)
        created[mul.name] = list(members)
    remove_unused(model, old_weights)
    topo_sort(graph)
    return created
