"""Weight-only INT8 for MatMul/Gemm: onnxruntime's MatMulNBits with ``bits=8``.

The LLM answer to INT8 where activations have outliers: per-tensor dynamic INT8 quantizes the
activations too and loses next-token agreement on trained decoders (the LLM.int8()/SmoothQuant
finding), while 8-bit block-quantized weights with float activations keep it and still halve or
quarter the bytes a memory-bound decode step reads. The rewrite is int4-weight's with 8-bit
blocks; the accuracy level matters far more here: at level 4 (int8 compute) it is the fast path,
at level 1 it runs many times slower than float32 (measured in ``_nbits``), so ``auto`` measures.
"""

from __future__ import annotations

from typing import ClassVar

import onnx

from opstudio.core.passes.base import ScanParams
from opstudio.core.passes.quantize_int4 import LEVEL_PARAMS, Int4WeightPass


class Int8WeightPass(Int4WeightPass):
    technique = "int8-weight"
    bits = 8
    plan_order = 45
    because = "weight-only INT8 cuts the bytes read 4×"
    colour = "#b07cc6"
    scan_params: ClassVar[ScanParams | None] = None  # planned for LLM decode steps, not in the generic scan
    label = "INT8 weights"
    description = ("8-bit block-quantized weights for MatMuls with a constant weight "
                   "(onnxruntime MatMulNBits, bits=8), activations stay float")
    params = LEVEL_PARAMS  # round to nearest: at 8 bits it loses next to nothing

    def _check_embedding(self, model: onnx.ModelProto, node: onnx.NodeProto,
                         block_size: int) -> str | None:
        return "onnxruntime block-quantizes embedding tables to 4 bits only (use int4-weight)"


PASS = Int8WeightPass()
