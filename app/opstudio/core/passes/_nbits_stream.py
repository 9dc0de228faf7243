"""Round-to-nearest MatMulNBits and GatherBlockQuantized one weight at a time, in chunks.

onnxruntime's ``MatMulNBitsQuantizer`` takes the whole model in memory and makes several float
copies of a weight (the proto's bytes, a numpy array, padding); for a 2 GB embedding or lm_head
that is gigabytes. Its arithmetic works on independent columns of a MatMul weight (blocks run
along K) and on independent rows of an embedding table (blocks run along a token's vector), so
the same library functions, called on a band of columns or rows at a time, give the same bytes:
``DefaultWeightOnlyQuantizer.qbits_block_quant`` (onnxruntime's C++ kernel) for MatMul weights,
``DefaultWeightOnlyQuantizer.quantize_ndarray`` for tables. A weight is read from its memory map
band by band and each quantized band is appended to a scratch file (``_stream``). Memory
holds one band and one weight's scales.

The nodes are built as onnxruntime builds them (names, inputs, attributes), so a model gets the
same result through either path (tested tensor by tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from opstudio.core.model.model_io import tensor_array
from opstudio.core.passes._stream import ScratchFile, band_size, drop_unread, rewrite_each


def _quantizer(bits: int, block: int, symmetric: bool) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    return DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=symmetric, bits=bits))


def matmul_nbits(node: onnx.NodeProto, weight: onnx.TensorProto, scratch: ScratchFile,
                 bits: int, block: int, symmetric: bool,
                 level: int) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """``node`` (a MatMul with the 2-D constant ``weight``) as MatMulNBits, the weight
    quantized band of columns by band of columns into ``scratch``."""
    value = tensor_array(weight)
    value = value.reshape(value.shape[-2], value.shape[-1])
    k, n = value.shape
    quantizer = _quantizer(bits, block, symmetric)
    step = band_size(k * value.dtype.itemsize)
    start = scratch.begin()
    scales: list[np.ndarray] = []
    zeros: list[np.ndarray] = []
    packed_shape: tuple[int, ...] = ()
    for n0 in range(0, n, step):
        band = np.ascontiguousarray(value[:, n0:n0 + step])
        packed, scale, zero = quantizer.qbits_block_quant(band)
        del band
        scratch.write(packed)
        packed_shape = packed.shape[1:]
        scales.append(scale)
        zeros.append(zero)
    quantized = scratch.tensor(f"{weight.name}_Q{bits}", onnx.TensorProto.UINT8,
                               (n, *packed_shape), start)
    scale_tensor = scratch.put(f"{weight.name}_scales", np.concatenate(scales))
    tensors = [quantized, scale_tensor]
    inputs = [node.input[0], quantized.name, scale_tensor.name]
    if not symmetric:
        tensors.append(scratch.put(f"{weight.name}_zero_points", np.concatenate(zeros),
                                   onnx.TensorProto.UINT8))
        inputs.append(tensors[-1].name)
    kwargs: dict[str, Any] = {"K": k, "N": n, "bits": bits, "block_size": block}
    if level:
        kwargs["accuracy_level"] = level
    created = helper.make_node("MatMulNBits", inputs, [node.output[0]],
                               name=node.name + f"_Q{bits}" if node.name else "",
                               domain="com.microsoft", **kwargs)
    return created, tensors


def gather_block_quantized(node: onnx.NodeProto, table: onnx.TensorProto,
                           scratch: ScratchFile, block: int,
                           symmetric: bool) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """``node`` (a Gather from the constant [vocab, hidden] ``table``) as 4-bit
    GatherBlockQuantized, the table quantized band of rows by band of rows into ``scratch``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    value = tensor_array(table)
    rows, width = value.shape
    step = band_size(width * value.dtype.itemsize, even=True)
    qtype = onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4
    start = scratch.begin()
    scales: list[np.ndarray] = []
    zeros: list[np.ndarray] = []
    for r0 in range(0, rows, step):
        band = np.asarray(value[r0:r0 + step])
        # its np.where divides by the zero scales of all-zero blocks before discarding them
        with np.errstate(divide="ignore", invalid="ignore"):
            packed, scale, zero = DefaultWeightOnlyQuantizer.quantize_ndarray(band, 1, block,
                                                                              symmetric)
        del band
        scratch.write(packed)
        scales.append(scale)
        if zero is not None:
            zeros.append(zero)
    quantized = scratch.tensor(f"{table.name}_Q4", qtype, (rows, width), start)
    scale_tensor = scratch.put(f"{table.name}_scales", np.concatenate(scales))
    tensors = [quantized, scale_tensor]
    inputs = [quantized.name, node.input[1], scale_tensor.name]
    if not symmetric:
        start = scratch.begin()
        for zero in zeros:
            scratch.write(zero)
        tensors.append(scratch.tensor(f"{table.name}_zero_points", qtype,
                                      list(scale_tensor.dims), start))
        inputs.append(tensors[-1].name)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    created = helper.make_node("GatherBlockQuantized", inputs, [node.output[0]],
                               name=node.name + "_Q4" if node.name else "",
                               domain="com.microsoft", gather_axis=axis, quantize_axis=1,
                               block_size=block)
    return created, tensors


def rewrite(model: onnx.ModelProto, names: Sequence[str], bits: int, block: int,
            symmetric: bool, level: int, workdir: str | None, technique: str,
            report: Callable[[float, str], None], check_cancelled: Callable[[], None]) -> None:
    """Quantize the weights of the nodes ``names`` of ``model`` in place, one after another
    (progress and cancel between them); weights no node reads any more are dropped."""
    wanted = set(names)
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    chosen = [k for k, node in enumerate(model.graph.node) if node.name in wanted]

    def step(index: int, scratch: ScratchFile) -> None:
        node = model.graph.node[index]
        gather = node.op_type == "Gather"
        weight = model.graph.initializer[inits[node.input[0 if gather else 1]]]
        if gather:
            created, tensors = gather_block_quantized(node, weight, scratch, block, symmetric)
        else:
            created, tensors = matmul_nbits(node, weight, scratch, bits, block, symmetric, level)
        model.graph.node[index].CopyFrom(created)
        model.graph.initializer.extend(tensors)

    rewrite_each(chosen, lambda k: model.graph.node[k].name, "quantizing", technique, workdir,
                 step, report, check_cancelled)
    drop_unread(model)
