"""Dynamic INT8 MatMuls of a lazily opened model, one weight at a time, in bands.

onnxruntime's ``quantize_dynamic`` loads the whole model and quantizes a weight from a float
copy of it, making a few more while it divides, rounds and clips: for a 2 GB lm_head that is
gigabytes per weight on top of the model. Its arithmetic is simple to split: the range (one
for the tensor, or one per output column with ``per_channel``) comes from the minimum and the
maximum, which a first pass over the weight's memory map gathers band by band; scale and zero
point then come from onnxruntime's own ``compute_data_quant_params`` given that range, and
each band of rows is quantized by its ``quantize_nparray`` (elementwise: the same bytes) into
a scratch file (``_stream``).

The nodes are built as onnxruntime's ``MatMulInteger`` rule builds them (a
``DynamicQuantizeLinear`` per activation, ``MatMulInteger``, ``Cast``, the two ``Mul``\\ s,
their names; a weight also read by a node left float keeps its float initializer for a reader
that comes before the first quantized one, such as the ``Transpose`` of an lm_head tied to the
embedding, and is fed to one after it through a ``DequantizeLinear`` under its own name, as
onnxruntime's node-by-node walk does), tested node by node and byte by byte against ``quantize_dynamic``. What
this path does not cover (weights that are not 2-D, or read by float nodes both before and
after; opsets before 11, where onnxruntime builds other nodes) goes through onnxruntime with the weights read in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from opstudio.core.model.graph_utils import node_reads
from opstudio.core.passes._stream import (
    ScratchFile,
    as_stored,
    drop_unread,
    rewrite_each,
    row_bands,
)
from opstudio.core.passes._weights import opset, replace_nodes

_INT8 = onnx.TensorProto.INT8
_FLOAT = onnx.TensorProto.FLOAT


def streamable(model: onnx.ModelProto, names: Sequence[str]) -> bool:
    """True when every node of ``names`` (MatMuls onnxruntime's dynamic quantizer would take)
    can be quantized here exactly as onnxruntime would."""
    if opset(model) < 11:
        return False
    wanted = set(names)
    inits = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or weight.data_type != _FLOAT or len(weight.dims) != 2:
            return False
        if weight.name in outputs:
            return False
    return all(len(kinds) < 2 for kinds in _float_readers(model, wanted).values())


def _float_readers(model: onnx.ModelProto, wanted: set[str]) -> dict[str, set[str]]:
    """Per weight of the chosen MatMuls that nodes left float read too: "before" when such a
    node comes before the first chosen reader (it keeps the float weight), "after" when after
    it (onnxruntime dequantizes the weight for it)."""
    first: dict[str, int] = {}
    for k, node in enumerate(model.graph.node):
        if node.name in wanted:
            first.setdefault(node.input[1], k)
    kinds: dict[str, set[str]] = {}
    for k, node in enumerate(model.graph.node):
        if node.name in wanted:
            continue
        for name in node_reads(node):
            if name in first:
                kinds.setdefault(name, set()).add("before" if k < first[name] else "after")
    return kinds


def _range(value: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """The minimum and maximum of ``value`` (per column with ``per_channel``), band by band."""
    low = high = None
    for band in row_bands(value):
        lo = band.min(axis=0) if per_channel else band.min()
        hi = band.max(axis=0) if per_channel else band.max()
        low = lo if low is None else np.minimum(low, lo)
        high = hi if high is None else np.maximum(high, hi)
    assert low is not None and high is not None
    return np.asarray(low), np.asarray(high)


def quantize_weight(weight: onnx.TensorProto, scratch: ScratchFile,
                    per_channel: bool) -> list[onnx.TensorProto]:
    """``<w>_quantized`` (into ``scratch``), ``<w>_scale`` and ``<w>_zero_point`` as
    onnxruntime's dynamic quantizer makes them for a MatMul weight (symmetric int8, no
    reduced range; per output column with ``per_channel``)."""
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_nparray

    value = as_stored(weight, _FLOAT)
    low, high = _range(value, per_channel)
    probe = np.zeros(1, np.float32)  # only its dtype is read when the range is given
    if per_channel:
        params = [compute_data_quant_params(probe, _INT8, True, False, None, lo, hi)
                  for lo, hi in zip(low, high)]
        zero = np.hstack([p[0] for p in params])
        scale = np.hstack([p[1] for p in params])
    else:
        zero, scale = compute_data_quant_params(probe, _INT8, True, False, None, low, high)
    start = scratch.begin()
    for band in row_bands(value):
        scratch.write(quantize_nparray(_INT8, band, scale, zero))
    dims = [len(scale)] if per_channel else []
    return [scratch.tensor(weight.name + "_quantized", _INT8, weight.dims, start),
            helper.make_tensor(weight.name + "_scale", weight.data_type, dims,
                               scale.reshape(-1).tolist()),
            helper.make_tensor(weight.name + "_zero_point", _INT8, dims,
                               zero.reshape(-1).tolist())]


def _nodes(node: onnx.NodeProto, weight: str, activation_done: bool) -> list[onnx.NodeProto]:
    """The nodes onnxruntime's ``MatMulInteger`` rule puts in place of ``node``."""
    x, out = node.input[0], node.output[0]
    made = [] if activation_done else [helper.make_node(
        "DynamicQuantizeLinear", [x], [x + "_quantized", x + "_scale", x + "_zero_point"],
        x + "_QuantizeLinear")]
    name = node.name + "_quant"
    product = out + "_output_quantized"
    made += [
        helper.make_node("Mul", [x + "_scale", weight + "_scale"], [name + "_scales_mul:0"],
                         name + "_scales_mul"),
        helper.make_node("MatMulInteger", [x + "_quantized", weight + "_quantized",
                                           x + "_zero_point", weight + "_zero_point"],
                         [product], name),
        helper.make_node("Cast", [product], [product + "_cast_output"], product + "_cast",
                         to=_FLOAT),  # the float32 weight's MatMul computes in float32
        helper.make_node("Mul", [product + "_cast_output", name + "_scales_mul:0"], [out],
                         name + "_output_scale_mul"),
    ]
    return made


def rewrite(model: onnx.ModelProto, names: Sequence[str], per_channel: bool,
            workdir: str | None, technique: str,
            report: Callable[[float, str], None], check_cancelled: Callable[[], None]) -> None:
    """Quantize the MatMuls ``names`` of ``model`` in place (``streamable`` said they can be),
    one weight after another (progress and cancel between them)."""
    from onnxruntime.quantization.quant_utils import __producer__, __version__

    wanted = set(names)
    inits = {t.name: t for t in model.graph.initializer}
    shared = [w for w, kinds in _float_readers(model, wanted).items() if kinds == {"after"}]
    weights = list(dict.fromkeys(n.input[1] for n in model.graph.node if n.name in wanted))
    made: list[onnx.TensorProto] = []

    def quantize(name: str, scratch: ScratchFile) -> None:
        made.extend(quantize_weight(inits[name], scratch, per_channel))

    rewrite_each(weights, str, "quantizing", technique, workdir, quantize, report,
                 check_cancelled)
    quantized: set[str] = set()
    replacements: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.name in wanted:
            replacements[node.name] = _nodes(node, node.input[1], node.input[0] in quantized)
            quantized.add(node.input[0])
    replace_nodes(model.graph, replacements)
    axis: dict[str, Any] = {"axis": -1} if per_channel else {}
    dequantized = [helper.make_node("DequantizeLinear", [w + "_quantized", w + "_scale",
                                                         w + "_zero_point"], [w],
                                    name=w + "_DequantizeLinear", **axis)
                   for w in shared]
    if dequantized:  # first, as onnxruntime puts them; the float weight itself goes
        rest = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend([*dequantized, *rest])
        gone = [k for k, t in enumerate(model.graph.initializer) if t.name in set(shared)]
        for k in reversed(gone):
            del model.graph.initializer[k]
    model.graph.initializer.extend(made)
    model.producer_name, model.producer_version = __producer__, __version__  # as onnxruntime
    drop_unread(model)
