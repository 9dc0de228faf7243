"""FLOPs and bytes per node, from shapes. A multiply-add counts as 2; unknown shapes give ``None``.

onnxruntime's contrib ops (com.microsoft) are counted from their documented input layouts: the
fused attentions (GroupQueryAttention, MultiHeadAttention, Attention), rotary embeddings, the
fused normalisations and GELUs, and the block-quantized MatMulNBits and GatherBlockQuantized.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from opstudio.core.model.tensors import TensorInfo, numel


class OpNode(Protocol):
    """What a count reads of a node (``graph.NodeInfo`` has it; the graph module builds on this
    one, not the other way round)."""

    @property
    def op_type(self) -> str: ...
    @property
    def domain(self) -> str: ...
    @property
    def inputs(self) -> Sequence[str]: ...
    @property
    def attributes(self) -> Mapping[str, Any]: ...

# One FLOP per output element.
ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Mod", "Abs", "Neg", "Sqrt",
    "Reciprocal", "Exp", "Log", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid",
    "HardSigmoid", "HardSwish", "Tanh", "Softplus", "Softsign", "Clip", "Erf", "Floor", "Ceil",
    "Round", "Sign", "Sin", "Cos", "Where", "Equal", "Greater", "Less", "GreaterOrEqual",
    "LessOrEqual", "And", "Or", "Xor", "Not", "ThresholdedRelu", "Mish", "BitShift",
    "BiasAdd", "IsNaN", "IsInf",
}
# Ops that do no arithmetic worth counting. (If/Loop/Scan are not here: their work is in their
# bodies, which a static count cannot attribute, so they report None rather than 0.)
DATA_MOVEMENT = {
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice",
    "Gather", "GatherElements", "GatherND", "Scatter", "ScatterElements", "ScatterND", "Expand",
    "Tile", "Pad", "Shape", "Size", "Identity", "Cast", "CastLike", "Constant", "ConstantOfShape",
    "Range", "Dropout", "DepthToSpace", "SpaceToDepth", "NonZero", "OneHot", "Trilu",
    "EyeLike", "TopK", "ArgMax", "ArgMin", "SequenceConstruct",
    "SplitToSequence", "ConcatFromSequence", "SequenceAt", "Compress", "Resize", "Upsample",
}
# Approximate FLOPs per element for composite ops (as they are computed in practice).
PER_ELEMENT = {
    # x·Φ(x) through erf or tanh; QuickGelu is x·sigmoid(αx); a Bias… variant adds the bias first
    "Gelu": 8, "FastGelu": 8, "BiasGelu": 9, "BiasFastGelu": 9, "QuickGelu": 5,
    "Softmax": 5, "LogSoftmax": 5,
    "LayerNormalization": 8, "SimplifiedLayerNormalization": 6, "SkipLayerNormalization": 9,
    "SkipSimplifiedLayerNormalization": 7, "RMSNormalization": 6,
    "BatchNormalization": 2, "InstanceNormalization": 8, "GroupNormalization": 8,
    "LpNormalization": 3, "MeanVarianceNormalization": 8, "LRN": 6,
    "QuantizeLinear": 3, "DequantizeLinear": 2, "DynamicQuantizeLinear": 5,
}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
          "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp", "ReduceLogSum", "GlobalAveragePool",
          "GlobalMaxPool", "GlobalLpPool"}


def _numel(t: TensorInfo | None) -> int | None:
    return None if t is None else t.numel()


def _dim(t: TensorInfo | None, axis: int) -> int | None:
    if t is None or t.shape is None or not t.shape:
        return None
    try:
        d = t.shape[axis]
    except IndexError:
        return None
    return d if isinstance(d, int) and d >= 0 else None


def node_flops(node: OpNode, ins: list[TensorInfo | None],
               outs: list[TensorInfo | None]) -> int | None:
    op = node.op_type
    a = node.attributes
    first_in = ins[0] if ins else None
    first_out = outs[0] if outs else None
    out_n = _numel(first_out)

    if op in DATA_MOVEMENT:
        return 0
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"):
        k = _dim(first_in, -1)
        if k is None and len(ins) > 1 and ins[1] is not None and ins[1].shape and len(ins[1].shape) >= 2:
            k = _dim(ins[1], -2)
        if out_n is None or k is None:
            return None
        return 2 * out_n * k
    if op == "MatMulNBits":
        return _matmul_nbits(node, ins, out_n)
    if op == "GatherBlockQuantized":
        n = out_n if out_n is not None else _gathered_elements(node, ins)
        return None if n is None else 2 * n  # (code - zero point) * scale per element
    if op in ATTENTION:
        return ATTENTION[op](node, ins, outs)
    if op == "RotaryEmbedding":
        return _rotary_embedding(node, first_in)
    if op == "Gemm":
        if first_in is None or first_in.shape is None or len(first_in.shape) != 2:
            return None
        k = _dim(first_in, 0 if a.get("transA", 0) else 1)
        if out_n is None or k is None:
            return None
        bias = out_n if len(ins) > 2 and node.inputs[2] else 0
        return 2 * out_n * k + bias
    if op in ("Conv", "QLinearConv", "ConvInteger", "FusedConv"):
        w = ins[3] if op == "QLinearConv" and len(ins) > 3 else (ins[1] if len(ins) > 1 else None)
        per_out = None if w is None or w.shape is None else numel(w.shape[1:])
        if per_out is None or out_n is None:  # per_out: (C_in / group) * prod(kernel)
            return None
        bias = out_n if op == "Conv" and len(ins) > 2 and node.inputs[2] else 0
        return 2 * out_n * per_out + bias
    if op == "ConvTranspose":
        w = ins[1] if len(ins) > 1 else None
        in_n = _numel(first_in)
        # each input element scatters into (C_out / group) * prod(kernel) outputs
        per_in = None if w is None or w.shape is None else numel(w.shape[1:])
        if in_n is None or per_in is None:
            return None
        return 2 * in_n * per_in
    if op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = a.get("kernel_shape")
        if out_n is None or not kernel:
            return None
        return out_n * math.prod(kernel)
    if op in REDUCE:
        return _numel(first_in)
    if op in PER_ELEMENT:
        # contrib ops have no output shape unless the file declares one: the input has as many
        # elements (a bias or skip is broadcast to it)
        n = _numel(first_in) if op.endswith("Normalization") or op in ("Softmax", "LogSoftmax") \
            or out_n is None else out_n
        if n is None:
            return None
        per = PER_ELEMENT[op] + (1 if op == "FastGelu" and _given(node, 1) else 0)
        return per * n
    if op in ELEMENTWISE:
        return out_n
    return None



def _in(ins: list[TensorInfo | None], i: int) -> TensorInfo | None:
    return ins[i] if i < len(ins) else None


def _given(node: OpNode, i: int) -> bool:
    """Whether optional input ``i`` is wired (an empty name means left out)."""
    return i < len(node.inputs) and bool(node.inputs[i])


def _rank(t: TensorInfo | None) -> int | None:
    return None if t is None or t.shape is None else len(t.shape)


def _int_attr(a: Mapping[str, Any], name: str, default: int | None = None) -> int | None:
    v = a.get(name, default)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _positive(*values: int | None) -> tuple[int, ...] | None:
    """The values when every one is known and positive (counts a formula may divide by), else
    None."""
    known = tuple(v for v in values if v is not None and v > 0)
    return known if len(known) == len(values) else None


def _attention_core(b: int, h: int, s: int, t: int, d: int, dv: int) -> int:
    """Q·Kᵀ, the scaled masked softmax and ·V for ``h`` query heads of ``s`` tokens over ``t``
    keys. The kernels compute every score of the S×T block, masked or not, so a causal mask
    does not halve the count."""
    return 2 * b * h * s * t * d + 5 * b * h * s * t + 2 * b * h * s * t * dv


def _rotary(elements: int) -> int:
    return 3 * elements  # x1·cos − x2·sin: two multiplies and an add per rotated element


def _total_length(node: OpNode, ins: list[TensorInfo | None], outs: list[TensorInfo | None],
                  new: int | None, past_at: int, past_axis: int, present_axis: int) -> int | None:
    """Keys attended: the past cache plus the new ones, else the present cache's length."""
    if not _given(node, past_at):
        return new
    past = _dim(_in(ins, past_at), past_axis)
    if past is not None and new is not None:
        return past + new
    return _dim(_in(outs, 1), present_axis)


def _group_query_attention(node: OpNode, ins: list[TensorInfo | None],
                           outs: list[TensorInfo | None]) -> int | None:
    # query [B, S, H·D], or Q, K and V packed as [B, S, (H + 2·KV)·D] when key is left out;
    # past_key [B, KV, P, D]; rotary (do_rotary) turns Q and K inside the op
    a = node.attributes
    h, kv = _int_attr(a, "num_heads"), _int_attr(a, "kv_num_heads")
    q = _in(ins, 0)
    dims = _positive(h, kv, _dim(q, 0), _dim(q, 1), _dim(q, 2))
    if dims is None or _rank(q) != 3:
        return None
    h, kv, b, s, width = dims
    dt = _positive(width // (h + 2 * kv) if not _given(node, 1) else width // h,
                   _total_length(node, ins, outs, s, past_at=3, past_axis=2, present_axis=2))
    if dt is None:
        return None
    d, t = dt
    rotary = _rotary(b * s * (h + kv) * d) if a.get("do_rotary") else 0
    return _attention_core(b, h, s, t, d, d) + rotary


def _multi_head_attention(node: OpNode, ins: list[TensorInfo | None],
                          outs: list[TensorInfo | None]) -> int | None:
    # query [B, S, H·D] or packed QKV [B, S, H, 3, D]; key [B, L, H·D], packed KV
    # [B, L, H, 2, D] or already split into heads [B, H, L, D]; value likewise with its own
    # head size; past_key [B, H, P, D]
    h = _int_attr(node.attributes, "num_heads")
    q, key, value = _in(ins, 0), _in(ins, 1), _in(ins, 2)
    hbs = _positive(h, _dim(q, 0), _dim(q, 1))
    if hbs is None:
        return None
    h, b, s = hbs
    d: int | None
    length: int | None
    if _rank(q) == 5:
        d, length = _dim(q, 4), s
    else:
        width = _dim(q, 2)
        d, length = (None if width is None else width // h), s
    if _given(node, 1):
        rank = _rank(key)
        length = _dim(key, 2) if rank == 4 else _dim(key, 1)
        if rank in (4, 5):
            d = _dim(key, -1)
    dv = d
    if _given(node, 2):
        value_width = _dim(value, 2)
        dv = _dim(value, 3) if _rank(value) == 4 else (
            None if value_width is None else value_width // h)
    t = _total_length(node, ins, outs, length, past_at=6, past_axis=2, present_axis=2)
    known = _positive(d, dv, length, t)
    if known is None:
        return None
    d, dv, length, t = known
    bias = b * (s * h * d + length * h * (d + dv)) if _given(node, 3) else 0
    return _attention_core(b, h, s, t, d, dv) + bias


def _contrib_attention(node: OpNode, ins: list[TensorInfo | None],
                       outs: list[TensorInfo | None]) -> int | None:
    # com.microsoft Attention projects Q, K and V itself: input [B, S, C] times weights
    # [C, Hq + Hk + Hv]; past [2, B, H, P, D]
    a = node.attributes
    h = _int_attr(a, "num_heads")
    x, w = _in(ins, 0), _in(ins, 1)
    dims = _positive(h, _dim(x, 0), _dim(x, 1), _dim(x, 2), _dim(w, 1))
    if dims is None:
        return None
    h, b, s, c, cols = dims
    sizes = a.get("qkv_hidden_sizes")
    if not (isinstance(sizes, list) and len(sizes) == 3 and all(isinstance(x, int) for x in sizes)):
        sizes = [cols // 3] * 3
    hq, _, hv = sizes
    known = _positive(hq // h, hv // h,
                      _total_length(node, ins, outs, s, past_at=4, past_axis=3, present_axis=3))
    if known is None:
        return None
    d, dv, t = known
    projection = 2 * b * s * c * cols + (b * s * cols if _given(node, 2) else 0)
    rotary = _rotary(b * s * 2 * hq) if a.get("do_rotary") else 0
    return projection + _attention_core(b, h, s, t, d, dv) + rotary


def _onnx_attention(node: OpNode, ins: list[TensorInfo | None],
                    outs: list[TensorInfo | None]) -> int | None:
    # ONNX Attention (opset 23): Q [B, Hq, S, D] or [B, S, Hq·D] with q_num_heads; K and V
    # [B, KV, L, D] or [B, L, KV·D] with kv_num_heads; past_key [B, KV, P, D]
    a = node.attributes
    q, k, v = _in(ins, 0), _in(ins, 1), _in(ins, 2)
    h: int | None
    d: int | None
    dv: int | None
    if _rank(q) == 4:
        b, h, s, d = _dim(q, 0), _dim(q, 1), _dim(q, 2), _dim(q, 3)
        length, dv = _dim(k, 2), _dim(v, 3)
    else:
        heads = _positive(_int_attr(a, "q_num_heads"), _int_attr(a, "kv_num_heads"),
                          _dim(q, 2), _dim(v, 2))
        if heads is None:
            return None
        h, kv, width, vwidth = heads
        b, s = _dim(q, 0), _dim(q, 1)
        d, dv, length = width // h, vwidth // kv, _dim(k, 1)
    t = _total_length(node, ins, outs, length, past_at=4, past_axis=2, present_axis=2)
    known = _positive(b, h, s, t, d, dv)
    if known is None:
        return None
    b, h, s, t, d, dv = known
    return _attention_core(b, h, s, t, d, dv)


def _attention(node: OpNode, ins: list[TensorInfo | None],
               outs: list[TensorInfo | None]) -> int | None:
    if node.domain == "com.microsoft":
        return _contrib_attention(node, ins, outs)
    return _onnx_attention(node, ins, outs)


ATTENTION = {
    "GroupQueryAttention": _group_query_attention,
    "MultiHeadAttention": _multi_head_attention,
    "Attention": _attention,
}


def _rotary_embedding(node: OpNode, x: TensorInfo | None) -> int | None:
    # input [B, S, H·D] or [B, H, S, D]; rotary_embedding_dim > 0 turns only the first
    # that many values of each head (the rest are copied)
    n = _numel(x)
    if n is None:
        return None
    part = _int_attr(node.attributes, "rotary_embedding_dim", 0) or 0
    if part <= 0:
        return _rotary(n)
    if _rank(x) == 4:
        d = _dim(x, 3)
    else:
        h, width = _int_attr(node.attributes, "num_heads", 0), _dim(x, -1)
        d = None if not h or width is None else width // h
    return None if not d else _rotary(n // d * min(part, d))


def _matmul_nbits(node: OpNode, ins: list[TensorInfo | None], out_n: int | None) -> int | None:
    # A [..., K] times a [K, N] weight held block-quantized; the rows come from A when the file
    # declares no output shape (onnx's inference does not know the op)
    kn = _positive(_int_attr(node.attributes, "K"), _int_attr(node.attributes, "N"))
    if kn is None:
        return None
    k, n = kn
    in_n = _numel(_in(ins, 0))
    rows = in_n // k if in_n is not None else (None if out_n is None else out_n // n)
    if rows is None:
        return None
    bias = rows * n if _given(node, 5) else 0
    return 2 * rows * n * k + bias


def _gathered_elements(node: OpNode, ins: list[TensorInfo | None]) -> int | None:
    """Elements GatherBlockQuantized writes: the indices times one unpacked slice of data."""
    data, indices = _in(ins, 0), _in(ins, 1)
    n, picks = _numel(data), _numel(indices)
    axis = _int_attr(node.attributes, "gather_axis", 0) or 0
    rows = _dim(data, axis)
    if n is None or picks is None or not rows:
        return None
    bits = _int_attr(node.attributes, "bits", 4)
    per_byte = 8 // bits if bits in (2, 4, 8) and data is not None and data.dtype == "uint8" else 1
    return picks * (n // rows) * per_byte


def _gather_axis(node: OpNode) -> int:
    name = "gather_axis" if node.op_type == "GatherBlockQuantized" else "axis"
    return _int_attr(node.attributes, name, 0) or 0


def _partial_reads(node: OpNode, ins: list[TensorInfo | None]) -> dict[int, float]:
    """Inputs an op reads only part of, as input position → fraction read.

    A Gather reads the rows its indices pick, not the table (an embedding is read a few rows
    per token); rotary cos/sin caches are read at the positions of the new tokens only.
    """
    op = node.op_type
    if op in ("Gather", "GatherBlockQuantized"):
        data, picks = _in(ins, 0), _numel(_in(ins, 1))
        rows = _dim(data, _gather_axis(node))
        if picks is None or not rows:
            return {}
        share = min(1.0, picks / rows)
        tables = (0, 2, 3) if op == "GatherBlockQuantized" else (0,)
        return {i: share for i in tables if _given(node, i)}
    caches = {"GroupQueryAttention": (7, 8), "RotaryEmbedding":
              (2, 3) if node.domain == "com.microsoft" else (1, 2)}.get(op)
    if caches is None:
        return {}
    x = _in(ins, 0)
    b, s = _dim(x, 0), _dim(x, 2 if op == "RotaryEmbedding" and _rank(x) == 4 else 1)
    out: dict[int, float] = {}
    for i in caches:
        rows = _dim(_in(ins, i), 0)
        if _given(node, i) and b is not None and s is not None and rows:
            out[i] = min(1.0, b * s / rows)
    return out


def node_bytes(node: OpNode, ins: list[TensorInfo | None],
               outs: list[TensorInfo | None]) -> int | None:
    """Bytes read and written: every input and output in full, but only the part of a table
    that a Gather or a rotary cache really reads; None when a size is unknown."""
    partial = _partial_reads(node, ins)
    total = 0
    for i, t in enumerate(ins + outs):
        if t is None:
            continue
        b = t.nbytes()
        if b is None:
            return None
        total += math.ceil(b * partial[i]) if i in partial and i < len(ins) else b
    return total
