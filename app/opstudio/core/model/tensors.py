"""Tensors as the analysis sees them (name, dtype, shape) and their sizes: element counts and
bytes, shared by the graph analysis and the FLOP counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

DTYPE_SIZES = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8,
    "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "bool": 1, "int4": 1, "uint4": 1,
    "float8e4m3fn": 1, "float8e4m3fnuz": 1, "float8e5m2": 1, "float8e5m2fnuz": 1,
    "complex64": 8, "complex128": 16,
}
# Element types ONNX stores two to a byte (DTYPE_SIZES rounds them up to 1 for an element alone).
PACKED_4BIT = {"int4", "uint4", "float4e2m1"}


def numel(shape: Sequence[object] | None) -> int | None:
    """Number of elements; None unless every dim is a known non-negative number."""
    if shape is None:
        return None
    total = 1
    for d in shape:
        if not isinstance(d, int) or d < 0:
            return None
        total *= d
    return total


def nbytes(dtype: str | None, count: int) -> int | None:
    """Bytes ``count`` elements of ``dtype`` take in a tensor; None for an unknown type."""
    if dtype in PACKED_4BIT:
        return (count + 1) // 2
    size = DTYPE_SIZES.get(dtype or "")
    return None if size is None else count * size


# a dim is a number, a symbolic name (``batch``), or None when neither is known
Dim = int | str | None
Shape = list[Dim] | None


@dataclass
class TensorInfo:
    name: str
    dtype: str | None = None  # numpy-style name: "float32", "int64", …
    shape: Shape = None
    is_constant: bool = False

    @property
    def itemsize(self) -> int | None:
        return DTYPE_SIZES.get(self.dtype or "")

    def numel(self) -> int | None:
        return numel(self.shape)

    def nbytes(self) -> int | None:
        n = self.numel()
        return None if n is None else nbytes(self.dtype, n)


def human_bytes(n: float | None) -> str:
    """``n`` may be a float: totals over a layer are summed as floats."""
    if n is None:
        return "?"
    for factor, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= factor:
            return f"{n / factor:.1f} {suffix}"
    return f"{n:.0f} B"

def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
