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

from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from opstudio.core.model import provenance
from opstudio.core.model.graph_utils import consumers, nodes_by_name, producers, topo_sort
from opstudio.core.passes._weights import (
    add_initializer,
    all_names,
    constant_array,
    remove_unused,
    unique_name,
)

S_RANGE = (1e-5, 1e5)
# readers of a tensor that see only its shape, never its values (HF exports reshape heads by it)
_SHAPE_ONLY = {"Shape", "Size"}


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
    """SmoothQuant on ``model`` in place: per input tensor of the nodes in ``axes``, one
    ``Mul(x, 1/s)`` feeding them and their weights scaled by s.

    ``abs_max`` is max|x| per input channel of each node's input (``InputStats.abs_max``).
    Returns the created Mul's name → the nodes it serves. Nodes whose channel count does not
    match their weight's are left as they were.
    """
    def factors(members: Sequence[str], weights: Sequence[np.ndarray]) -> np.ndarray | None:
        x_max = np.asarray(abs_max[members[0]])
        if any(x_max.shape != (w.shape[0],) for w in weights):
            return None
        w_max = np.max([np.abs(w).reshape(w.shape[0], -1).max(axis=1) for w in weights], axis=0)
        return smoothing_factors(x_max, w_max, alpha)

    return scale_inputs(model, axes, factors, set(abs_max), "smooth")


ScaleRule = Callable[[Sequence[str], Sequence[np.ndarray]], "np.ndarray | None"]


def scale_inputs(model: onnx.ModelProto, axes: Mapping[str, int], rule: ScaleRule,
                 measured: Collection[str], tag: str,
                 compensate: bool = False) -> dict[str, list[str]]:
    """Per input tensor x of the nodes in ``axes``: weights' input channels times s and x
    divided by s (``y = x·diag(1/s) · diag(s)·W`` is unchanged), with s = ``rule(members,
    weights)`` (weights with input channels first; ``None`` leaves the group as it was).

    The division is folded into the constant of a ``Mul`` that produces x and feeds only the
    group (an RMSNorm's weight); otherwise one ``Mul(x, 1/s)`` is inserted. With
    ``compensate``, x's other readers that are MatMul/Gemm with a constant float weight get
    their weight rows times s as well, so the fold still applies when a plan rounds q_proj in
    INT4 and k/v_proj in INT8 (an inserted Mul costs a pass over x in every layer). Only nodes
    named in ``measured`` take part. Returns the created or rewritten Mul's name → the nodes
    whose weights it scaled.
    """
    graph = model.graph
    by_name = nodes_by_name(graph)
    inits = {i.name: i for i in graph.initializer}
    groups: dict[str, list[str]] = {}
    for name in axes:
        if name in measured:
            groups.setdefault(by_name[name].input[0], []).append(name)
    taken = all_names(graph)
    readers, producer_of = consumers(graph), producers(graph)
    created: dict[str, list[str]] = {}
    old_weights: list[str] = []
    for tensor, members in groups.items():
        weights = [np.moveaxis(numpy_helper.to_array(inits[by_name[name].input[1]]),
                               axes[name], 0) for name in members]
        s = rule(members, weights)
        if s is None:
            continue
        for name, w in zip(members, weights):
            node = by_name[name]
            scaled = (w.astype(np.float64) * s.reshape(-1, *([1] * (w.ndim - 1))))
            scaled = np.moveaxis(scaled.astype(np.float32), 0, axes[name])
            old_weights.append(node.input[1])
            fresh = unique_name(taken, f"{node.input[1]}_{tag}ed")
            add_initializer(model, scaled, fresh)
            node.input[1] = fresh
        inverse = (1.0 / s).astype(np.float32)
        folded = None
        others = [n for n in readers.get(tensor, []) if n.name not in set(members)
                  and n.op_type not in _SHAPE_ONLY]
        plans = [_row_axis(model, n, tensor, s.size) for n in others] if compensate else []
        if not others or (plans and all(a is not None for a in plans)):
            folded = _fold_into_producer(model, producer_of.get(tensor), tensor, inverse,
                                         taken, tag)
        if folded is not None:
            old_weights.extend(folded[1])
            for node, axis in zip(others, plans):
                assert axis is not None
                old_weights.append(node.input[1])
                node.input[1] = _scaled_weight(model, node.input[1], s, axis, taken, tag,
                                               _cast_source(node.input[1], producer_of, inits))
            created[folded[0]] = list(members) + [n.name for n in others]
            continue
        scale_name = unique_name(taken, f"{tensor}_{tag}_scale")
        add_initializer(model, inverse, scale_name)
        scaled_x = unique_name(taken, f"{tensor}_{tag}ed")
        mul = helper.make_node("Mul", [tensor, scale_name], [scaled_x],
                               name=unique_name(taken, f"{members[0]}_{tag}"))
        provenance.set_origin(mul, [o for name in members
                                    for o in provenance.get_origin(by_name[name])])
        for name in members:
            by_name[name].input[0] = scaled_x
        graph.node.append(mul)
        created[mul.name] = list(members)
    remove_unused(model, old_weights)
    topo_sort(graph)
    return created


def _row_axis(model: onnx.ModelProto, node: onnx.NodeProto, tensor: str,
              channels: int) -> int | None:
    """The axis of ``node``'s weight that ``tensor``'s channels multiply, when ``node`` is a
    MatMul/Gemm reading ``tensor`` as its activation and a constant float weight."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") \
            or len(node.input) < 2 or node.input[0] != tensor or node.input[1] == tensor:
        return None
    weight, _ = constant_array(model, node.input[1])
    if weight is None or weight.dtype not in (np.float32, np.float16) or weight.ndim < 2:
        return None
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or weight.ndim != 2:
            return None
        axis = 1 if attrs.get("transB", 0) else 0
    else:
        axis = weight.ndim - 2
    return axis if weight.shape[axis] == channels else None


def _scaled_weight(model: onnx.ModelProto, tensor: str, s: np.ndarray, axis: int,
                   taken: set[str], tag: str, source: onnx.NodeProto | None) -> str:
    """A new constant: ``tensor``'s value with its ``axis`` times s, stored as the weight was
    (a float16 weight behind a Cast, ``source``, stays float16 behind a Cast, so the file does
    not grow)."""
    weight, _ = constant_array(model, tensor)
    assert weight is not None
    shape = [1] * weight.ndim
    shape[axis] = -1
    scaled = weight.astype(np.float64) * s.reshape(shape)
    fresh = unique_name(taken, f"{tensor}_{tag}ed")
    if source is None:
        add_initializer(model, scaled.astype(weight.dtype), fresh)
        return fresh
    stored = unique_name(taken, f"{source.input[0]}_{tag}ed")
    add_initializer(model, scaled.astype(np.float16), stored)
    cast = helper.make_node("Cast", [stored], [fresh], name=unique_name(taken, f"{fresh}_cast"),
                            to=onnx.TensorProto.FLOAT)
    provenance.set_origin(cast, provenance.get_origin(source))
    model.graph.node.append(cast)
    return fresh


def _cast_source(tensor: str, producer_of: Mapping[str, onnx.NodeProto],
                 inits: Mapping[str, onnx.TensorProto]) -> onnx.NodeProto | None:
    """The ``Cast`` to float32 writing ``tensor`` from a float16 initializer, if that is what
    it is (how HF exports store fp16 weights)."""
    producer = producer_of.get(tensor)
    if producer is None or producer.op_type != "Cast" or not producer.input:
        return None
    to = next((helper.get_attribute_value(a) for a in producer.attribute if a.name == "to"), None)
    init = inits.get(producer.input[0])
    if to != onnx.TensorProto.FLOAT or init is None:
        return None
    return producer if init.data_type == onnx.TensorProto.FLOAT16 else None


# normalisations whose output 0 is (normalised x) · γ (+ β): dividing γ and β by s divides
# the output by s. Which inputs are γ and β, by (op, domain).
_NORM_SCALES = {
    ("SimplifiedLayerNormalization", ""): (1,),
    ("SimplifiedLayerNormalization", "com.microsoft"): (1,),
    ("RMSNormalization", ""): (1,),
    ("LayerNormalization", ""): (1, 2),
    ("SkipSimplifiedLayerNormalization", "com.microsoft"): (2,),
    ("SkipLayerNormalization", "com.microsoft"): (2, 3),
}


def _fold_into_producer(model: onnx.ModelProto, producer: onnx.NodeProto | None, tensor: str,
                        inverse: np.ndarray, taken: set[str],
                        tag: str) -> tuple[str, list[str]] | None:
    """Multiply 1/s into the per-channel constant(s) of ``producer`` (the node writing
    ``tensor``, which only the scaled nodes read) when it is a ``Mul`` by a constant (an HF
    export's RMSNorm weight) or a normalisation op's γ/β (onnxruntime-genai exports):
    (the producer's name, the constants it no longer reads)."""
    if any(o.name == tensor for o in model.graph.output) or producer is None:
        return None
    domain = "" if producer.domain == "ai.onnx" else producer.domain
    if producer.op_type == "Mul" and domain == "":
        for slot in (1, 0):
            const = _channel_constant(model, producer.input[slot], inverse.size)
            if const is None:
                continue
            if constant_array(model, producer.input[1 - slot])[0] is not None:
                return None
            return producer.name, [_divide(model, producer, slot, const, inverse, taken, tag)]
        return None
    slots = _NORM_SCALES.get((producer.op_type, domain))
    # only output 0 carries γ: the mean, inverse deviation and residual-sum outputs stay as
    # they were
    if slots is None or producer.output[0] != tensor:
        return None
    present = [k for k in slots if k < len(producer.input) and producer.input[k]]
    consts = [_channel_constant(model, producer.input[k], inverse.size) for k in present]
    if not present or any(c is None for c in consts):
        return None
    return producer.name, [_divide(model, producer, k, c, inverse, taken, tag)
                           for k, c in zip(present, consts) if c is not None]


def _channel_constant(model: onnx.ModelProto, tensor: str, channels: int) -> np.ndarray | None:
    """``tensor``'s value when it is a float constant with one value per channel."""
    const, _ = constant_array(model, tensor)
    if const is None or const.dtype not in (np.float32, np.float16):
        return None
    if const.shape[-1:] != (channels,) or any(d != 1 for d in const.shape[:-1]):
        return None
    return const


def _divide(model: onnx.ModelProto, node: onnx.NodeProto, slot: int, const: np.ndarray,
            inverse: np.ndarray, taken: set[str], tag: str) -> str:
    """``node``'s input ``slot`` replaced by ``const · inverse``; the name it no longer reads."""
    old = node.input[slot]
    fresh = unique_name(taken, f"{old}_{tag}ed")
    scaled = (const.astype(np.float64) * inverse).astype(const.dtype).reshape(const.shape)
    add_initializer(model, scaled, fresh)
    node.input[slot] = fresh
    return old
