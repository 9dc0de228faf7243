"""FLOPs per node, from shapes. A multiply-add counts as 2; unknown shapes give ``None``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opstudio.core.graph import NodeInfo, TensorInfo

# One FLOP per output element.
ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Mod", "Abs", "Neg", "Sqrt",
    "Reciprocal", "Exp", "Log", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid",
    "HardSigmoid", "HardSwish", "Tanh", "Softplus", "Softsign", "Clip", "Erf", "Floor", "Ceil",
    "Round", "Sign", "Sin", "Cos", "Where", "Equal", "Greater", "Less", "GreaterOrEqual",
    "LessOrEqual", "And", "Or", "Xor", "Not", "ThresholdedRelu", "Mish", "BitShift",
    "QuickGelu", "BiasAdd", "IsNaN", "IsInf",
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
    "Gelu": 8, "FastGelu": 8, "BiasGelu": 9, "Softmax": 5, "LogSoftmax": 5,
    "LayerNormalization": 8, "SimplifiedLayerNormalization": 6, "SkipLayerNormalization": 9,
    "SkipSimplifiedLayerNormalization": 7, "RMSNormalization": 6,
    "BatchNormalization": 2, "InstanceNormalization": 8, "GroupNormalization": 8,
    "LpNormalization": 3, "MeanVarianceNormalization": 8, "LRN": 6,
    "QuantizeLinear": 3, "DequantizeLinear": 2, "DynamicQuantizeLinear": 5,
}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
          "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp", "ReduceLogSum", "GlobalAveragePool",
          "GlobalMaxPool", "GlobalLpPool"}


def _numel_of(shape: list | None) -> int | None:
    from opstudio.core.graph import numel

    return numel(shape)


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


def node_flops(node: NodeInfo, ins: list[TensorInfo | None],
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
        k = a.get("K")
        return None if out_n is None or not isinstance(k, int) else 2 * out_n * k
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
        if w is None or w.shape is None or out_n is None or _numel_of(w.shape[1:]) is None:
            return None
        per_out = math.prod(w.shape[1:])  # (C_in / group) * prod(kernel)
        bias = out_n if op == "Conv" and len(ins) > 2 and node.inputs[2] else 0
        return 2 * out_n * per_out + bias
    if op == "ConvTranspose":
        w = ins[1] if len(ins) > 1 else None
        in_n = _numel(first_in)
        if w is None or w.shape is None or in_n is None or _numel_of(w.shape[1:]) is None:
            return None
        # each input element scatters into (C_out / group) * prod(kernel) outputs
        return 2 * in_n * math.prod(w.shape[1:])
    if op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = a.get("kernel_shape")
        if out_n is None or not kernel:
            return None
        return out_n * math.prod(kernel)
    if op in REDUCE:
        return _numel(first_in)
    if op in PER_ELEMENT:
        n = _numel(first_in) if op.endswith("Normalization") or op in ("Softmax", "LogSoftmax") else out_n
        return None if n is None else PER_ELEMENT[op] * n
    if op in ELEMENTWISE:
        return out_n
    return None

