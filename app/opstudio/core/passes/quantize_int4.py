"""Weight-only INT4 for MatMul/Gemm with a constant weight, through onnxruntime's MatMulNBits quantizer.

``MatMul(x, W)`` becomes ``MatMulNBits`` (com.microsoft) holding W as 4-bit blocks along K with
one float scale per block (and a 4-bit zero point when not symmetric). Activations stay float.
The quantizer pads K up to a multiple of the block size, so any K works; a K smaller than the
block wastes most of the block and is refused. The ``accuracy_level`` (compute precision) is by
default the one measured fastest on this machine (``_nbits``): on x86 that is 4, int8 activations,
as onnxruntime-genai's builder writes. Only the chosen nodes are quantized: every other
node goes to ``nodes_to_exclude``. A model whose weights stay in their files (``load_model(...,
lazy=True)``) is quantized by round to nearest one weight at a time instead (``_nbits_stream``:
the same library arithmetic on bands of the weight's memory map, written to a scratch file),
so an 8B export never has all its weights in memory. A Gemm (``nn.Linear`` on 2-D inputs) is first rewritten as
MatMul with ``alpha·op(B)`` plus an Add of ``beta·C``, since the quantizer only knows MatMul.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from opstudio.core.errors import OpstudioError
from opstudio.core.model.model_io import is_lazy, load_weights, tensor_array
from opstudio.core.passes import _awq as awq
from opstudio.core.passes import _nbits_stream as nbits_stream
from opstudio.core.passes import _ort_support as ort_support
from opstudio.core.passes._activations import calibrated_stats
from opstudio.core.passes._calibration import (
    calibration_params,
    calibration_samples,
    check_calibration,
)
from opstudio.core.passes._nbits import fastest_level
from opstudio.core.passes._quiet_ort import quiet_onnxruntime_logs
from opstudio.core.passes._smoothquant import scale_inputs, smoothable
from opstudio.core.passes._weights import append_initializer
from opstudio.core.passes.base import ParamSpec, Pass, PassContext, PassResult, ScanParams

BLOCK_SIZES = (32, 16, 64, 128, 256)
ACCURACY_LEVELS = ("auto", 0, 1, 2, 3, 4)
ALGORITHMS = ("rtn", "awq", "k_quant", "gptq", "hqq")
LEVEL_PARAMS = (
    ParamSpec("block_size", "choice", 32, "Block size",
              "weights along K sharing one scale", choices=BLOCK_SIZES),
    ParamSpec("symmetric", "bool", True, "Symmetric",
              "no zero point (symmetric range around 0)"),
    ParamSpec("accuracy_level", "choice", "auto", "Accuracy level",
              "MatMulNBits compute precision: 1 float32, 2 float16, 3 bfloat16, 4 int8 "
              "activations; auto = the level measured fastest on this machine",
              choices=ACCURACY_LEVELS),
)


class Int4WeightPass(Pass):
    technique = "int4-weight"
    plan_order = 40
    helps_when = "memory"
    because = "weight-only INT4 cuts the bytes read 8×"
    colour = "#8e44ad"
    creates = frozenset({"MatMulNBits", "GatherBlockQuantized"})
    scan_params: ClassVar[ScanParams | None] = {"block_size": 32, "symmetric": True}
    bits = 4
    label = "INT4 weights"
    description = ("4-bit block-quantized weights for MatMuls with a constant weight and "
                   "embedding tables (GatherBlockQuantized) "
                   "(onnxruntime MatMulNBits), activations stay float")
    params: tuple[ParamSpec, ...] = (
        *LEVEL_PARAMS,
        ParamSpec("algorithm", "choice", "rtn", "Algorithm",
                  "rtn: round to nearest; awq: input channels scaled by their calibration "
                  "activations before rounding (activation-aware); k_quant: per-block scale "
                  "and minimum searched for the least weighted error (llama.cpp's k-quants, "
                  "asymmetric); gptq: error-compensating rounding on calibration inputs; hqq: "
                  "half-quadratic, calibration-free (gptq and hqq need torch: opstudio[llm])",
                  choices=ALGORITHMS),
        *calibration_params(8),
    )

    def validate_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        out = super().validate_params(params)
        if "calibration" in out:
            check_calibration(self.technique, out)
        algorithm = out.get("algorithm", "rtn")
        if algorithm in ("gptq", "hqq") and importlib.util.find_spec("torch") is None:
            # onnxruntime's HQQ and GPTQ quantizers compute with torch
            raise OpstudioError(f"{self.technique}: algorithm '{algorithm}' needs PyTorch, which "
                                "is not installed: pip install 'opstudio[llm]'")
        return out

    def reads_lazy(self, params: Mapping[str, Any]) -> bool:
        return params.get("algorithm", "rtn") == "rtn"

    def check(self, model: onnx.ModelProto, node: onnx.NodeProto,
              params: Mapping[str, Any] | None = None) -> str | None:
        given = self.given_params(params)
        block_size = int(given["block_size"])
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm", "Gather"):
            return f"{self.technique} handles MatMul, Gemm and embedding Gathers, not {node.op_type}"
        if node.op_type == "Gather":
            algorithm = given.get("algorithm", "rtn")
            if algorithm != "rtn":
                return f"only round-to-nearest quantizes embeddings, not {algorithm}"
            return self._check_embedding(model, node, block_size)
        if len(node.input) < 2:
            return f"{node.op_type} node has no weight input"
        if node.op_type == "Gemm":
            problem = ort_support.gemm_problem(model, node)
            if problem:
                return f"{problem}; {self.technique} quantizes a Gemm as MatMul"
        value, why = ort_support.constant_value(model, node.input[1])
        if value is None:
            return f"{why}; MatMulNBits needs a constant weight"
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            value = value.T
        if value.dtype != np.float32 and value.dtype != np.float16:
            return f"its weight is {value.dtype}, not float32/float16"
        if value.ndim < 2:
            return "its weight is a vector; MatMulNBits needs a 2-D weight [K, N]"
        if any(d != 1 for d in value.shape[:-2]):
            return f"its weight has batch dims {list(value.shape[:-2])}; MatMulNBits needs [K, N]"
        k = value.shape[-2]
        if k < block_size:
            return f"K={k} is smaller than the block size {block_size}"
        return None

    def _check_embedding(self, model: onnx.ModelProto, node: onnx.NodeProto,
                         block_size: int) -> str | None:
        """A Gather from a constant [vocab, hidden] table becomes GatherBlockQuantized: the
        embedding of an LLM, often the biggest tensor it has (tied to the lm_head or not)."""
        if any(a.name == "axis" and a.i != 0 for a in node.attribute):
            return "it gathers along an axis other than 0; only a table of rows can be quantized"
        value, why = ort_support.constant_value(model, node.input[0])
        if value is None:
            return f"{why}; GatherBlockQuantized needs a constant table"
        if value.dtype not in (np.float32, np.float16) or value.ndim != 2:
            return f"its table is {value.dtype} of rank {value.ndim}, not a 2-D float table"
        if value.shape[1] < block_size:
            return f"rows of {value.shape[1]} are shorter than the block size {block_size}"
        return None

    def _rewrite(self, work: onnx.ModelProto, chosen: Sequence[str], params: Mapping[str, Any],
                 ctx: PassContext) -> PassResult:
        block = int(params["block_size"])
        algorithm = params.get("algorithm", "rtn")
        skipped: dict[str, str] = {}
        notes: list[str] = []
        folded = ort_support.fold_constant_inputs(work, chosen)
        if folded:
            notes.append(f"made {len(folded)} constant weight(s) initializers "
                         "(from Constant nodes or Cast/Transpose/DequantizeLinear chains)")
        # MatMulNBits replaces a MatMul: a chosen Gemm becomes MatMul (+ Add) first
        target = {name: name for name in chosen}
        gemms = ort_support.gemm_to_matmul(work, chosen)
        target.update(gemms)
        if gemms:
            notes.append(f"rewrote {len(gemms)} Gemm(s) as MatMul + Add first")
        _unshare_weights(work, [target[n] for n in chosen])
        ctx.report(0.1, f"{self.technique}: quantizing {len(chosen)} node(s)")
        ctx.check_cancelled()
        level = params["accuracy_level"]
        if level == "auto":
            choice = fastest_level(self.bits, block)
            level = choice.level
            notes.append(choice.describe())
        names = [target[n] for n in chosen]
        scaled: dict[str, dict[str, Any]] = {}
        if algorithm == "awq":
            scaled = _awq_scale(work, names, params, ctx, notes)
        before = ort_support.shape_only_copy(work)
        # before IR 4 every initializer is also a declared input, which the streamed path
        # does not keep in step; such (old, small) models take the whole-model path
        streamed = (algorithm == "rtn" and work.ir_version >= 4 and is_lazy(work)
                    and _all_2d(work, names))
        if not streamed:
            load_weights(work)  # onnxruntime's quantizers read every weight from the proto
        with quiet_onnxruntime_logs():
            if streamed:
                nbits_stream.rewrite(work, names, self.bits, block, params["symmetric"], level,
                                     ctx.workdir, self.technique, ctx.report,
                                     ctx.check_cancelled)
                result = work
            elif algorithm == "gptq":
                samples = calibration_samples(work, params["calibration"], params["samples"], ctx)
                notes.append(f"GPTQ calibrated on {len(samples)} sample(s)")
                result = _gptq(work, names, samples, block, params["symmetric"], level)
            elif algorithm == "k_quant":
                result = _k_quant(work, names, block, level)
            else:
                result = _nbits_quantizer(work, names, self.bits, block, params["symmetric"],
                                          level, "rtn" if algorithm == "awq" else algorithm)
        _set_accuracy_level(result, level)
        _import_contrib_domain(result)
        remaining = {n.name for n in result.graph.node}
        applied = [n for n in chosen if target[n] not in remaining]
        for name in chosen:
            if name not in applied:
                skipped[name] = "onnxruntime's MatMulNBits quantizer left it unchanged"
        rewritten = [target[n] for n in applied]
        by_target = ort_support.settle(before, result, rewritten)
        details = {name: {**by_target[target[name]], "bits": self.bits, "block_size": block,
                          "symmetric": params["symmetric"] and algorithm != "k_quant",
                          "accuracy_level": level,
                          "algorithm": algorithm, **scaled.get(target[name], {})}
                   for name in applied}
        return PassResult(model=result, applied=applied, skipped=skipped, details=details,
                          notes=notes)


def _awq_scale(work: onnx.ModelProto, names: Sequence[str], params: Mapping[str, Any],
               ctx: PassContext, notes: list[str]) -> dict[str, dict[str, Any]]:
    """Activation-aware scaling (``_awq``) of the weights of ``names`` in place, before they
    are rounded; per scaled node the α chosen and the predicted output errors."""
    axes = smoothable(work, names)
    if not axes:
        notes.append("AWQ: none of the nodes has a float32 weight to scale; plain rounding")
        return {}
    stats, count = calibrated_stats(work, list(axes), params, ctx, "int4-weight AWQ",
                                    gram=True)
    block, symmetric = int(params["block_size"]), bool(params["symmetric"])
    found: dict[str, awq.Search] = {}

    def rule(members: Sequence[str], weights: Sequence[np.ndarray]) -> np.ndarray | None:
        ctx.check_cancelled()
        entry = stats[members[0]]
        if entry.gram is None or entry.gram.shape[0] != weights[0].shape[0]:
            return None
        result = awq.search(weights, entry.abs_mean, entry.gram, block, symmetric)
        for name in members:
            found[name] = result
        return None if result.alpha == 0 else result.scale

    created = scale_inputs(work, axes, rule, set(stats), "awq", compensate=True)
    touched = {name for members in created.values() for name in members}
    groups = {id(r): r for r in found.values()}.values()
    plain = sum(r.plain for r in groups)
    error = sum(r.error for r in groups)
    notes.append(f"AWQ scaled the inputs of {len(touched & set(found))} of {len(found)} node(s) "
                 f"on {count} calibration sample(s); predicted output error "
                 f"{error / plain if plain else 1:.0%} of plain rounding's")
    others = sorted(touched - set(found))
    if others:
        notes.append(f"AWQ: {len(others)} other reader(s) of the scaled inputs (e.g. "
                     f"'{others[0]}') keep their output: their weight rows were scaled too, "
                     "so the scale folds into the norm before them")
    return {name: {"awq_alpha": r.alpha, "awq_error_ratio": round(r.error / r.plain, 4)
                   if r.plain else 1.0} for name, r in found.items()}


def _nbits_quantizer(work: onnx.ModelProto, names: Sequence[str], bits: int, block: int,
                     symmetric: bool, level: int, algorithm: str) -> onnx.ModelProto:
    """Round-to-nearest or HQQ through onnxruntime's MatMulNBits quantizer, on ``names`` only."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config: Any
    wanted = set(names)
    ops = ("MatMul", "Gather") if any(n.op_type == "Gather" and n.name in wanted
                                      for n in work.graph.node) else ("MatMul",)
    if algorithm == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=block, bits=bits, op_types_to_quantize=ops)
    else:
        # a table is quantized along its rows (axis 1): one scale per block of a token's vector
        config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric,
                                              accuracy_level=level, bits=bits,
                                              op_types_to_quantize=ops,
                                              quant_axes=(("MatMul", 0), ("Gather", 1)))
    others = [n.name for n in work.graph.node if n.name not in wanted]
    opset = next((o.version for o in work.opset_import if o.domain in ("", "ai.onnx")), None)
    with ort_support.ort_rewriter("onnxruntime's MatMulNBits quantizer",
                                  "leave these nodes out of the step (choose nodes by name or "
                                  "name_pattern) or try another algorithm"):
        quantizer = MatMulNBitsQuantizer(work, nodes_to_exclude=others, algo_config=config)
        quantizer.process()
    result = quantizer.model.model
    # For a quantized Gather the quantizer raises the default domain to opset 21 "because INT4
    # needs it", which breaks the model's own ops (ReduceMean's `axes` attribute is gone from
    # opset 18 on). INT4 tensors need IR version 10, which it also sets; the only reader of
    # them is the contrib op GatherBlockQuantized, so the model keeps its own opset.
    for entry in result.opset_import:
        if entry.domain in ("", "ai.onnx") and opset is not None:
            entry.version = opset
    return result


def _gptq(work: onnx.ModelProto, names: Sequence[str], samples: Sequence[Mapping[str, Any]],
          block: int, symmetric: bool, level: int) -> onnx.ModelProto:
    """GPTQ (onnxruntime's port of Intel Neural Compressor's) on ``names`` only.

    Called directly: through ``MatMulNBitsQuantizer`` every MatMul with a constant weight would
    be quantized, whatever ``nodes_to_exclude`` says.
    """
    from onnxruntime.quantization.neural_compressor import gptq_quantize

    scheme = "sym" if symmetric else "asym"
    config = _weight_config(work, names, {"bits": 4, "group_size": block, "scheme": scheme,
                                          "algorithm": "GPTQ"})
    loader = ((dict(feeds), None) for feeds in samples)
    result = gptq_quantize(work, loader, weight_config=config, num_bits=4, group_size=block,
                           scheme=scheme, n_samples=-1, accuracy_level=level)
    return result.model if hasattr(result, "model") else result


def _k_quant(work: onnx.ModelProto, names: Sequence[str], block: int,
             level: int) -> onnx.ModelProto:
    """k-quant (onnxruntime's port of llama.cpp's per-block scale/minimum search) on ``names``.

    Always asymmetric: the searched minimum becomes a 4-bit zero point, so the result keeps the
    uint8 zero points MatMulNBits' fast kernels read (HQQ's float zero points do not).
    """
    from onnxruntime.quantization.neural_compressor import rtn_quantize

    config = _weight_config(work, names, {"bits": 4, "group_size": block, "scheme": "asym"})
    result = rtn_quantize(work, weight_config=config, num_bits=4, group_size=block,
                          scheme="asym", accuracy_level=level, algorithm="k_quant")
    return result.model if hasattr(result, "model") else result


def _weight_config(work: onnx.ModelProto, names: Sequence[str],
                   entry: Mapping[str, Any]) -> dict[str, Any]:
    """The per-node config of onnxruntime's neural-compressor quantizers: ``entry`` for the
    chosen MatMuls, "fp32" (left alone) for every other one, since they quantize every MatMul
    they are not told to skip."""
    wanted = set(names)
    return {n.name: (dict(entry) if n.name in wanted else "fp32")
            for n in work.graph.node if n.op_type == "MatMul"}


def _set_accuracy_level(model: onnx.ModelProto, level: int) -> None:
    """Every MatMulNBits computes at ``level`` (HQQ's quantizer does not write the attribute)."""
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or not level:
            continue
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(helper.make_attribute("accuracy_level", level))


def _import_contrib_domain(model: onnx.ModelProto) -> None:
    """Declare com.microsoft when the result uses it: onnxruntime's GPTQ writes MatMulNBits
    without importing the domain, and onnx's checker refuses such a model."""
    if any(o.domain == "com.microsoft" for o in model.opset_import):
        return
    if any(n.domain == "com.microsoft" for n in model.graph.node):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _all_2d(model: onnx.ModelProto, names: Sequence[str]) -> bool:
    """True when every MatMul of ``names`` has a 2-D weight initializer (the streamed path
    writes no Reshape for a weight with leading 1s; onnxruntime's quantizer does)."""
    inits = {t.name: t for t in model.graph.initializer}
    wanted = set(names)
    for node in model.graph.node:
        if node.name in wanted:
            weight = inits.get(node.input[0 if node.op_type == "Gather" else 1])
            if weight is None or len(weight.dims) != 2:
                return False
    return True


def _unshare_weights(model: onnx.ModelProto, chosen: Sequence[str]) -> None:
    """Give each chosen MatMul its own weight when several chosen ones share one.

    The quantizer names the 4-bit tensor after the weight, so two MatMuls quantized from one
    weight would produce two initializers with the same name.
    """
    inits = {i.name: i for i in model.graph.initializer}
    seen: set[str] = set()
    wanted = set(chosen)
    for node in model.graph.node:
        if node.name not in wanted or node.input[1] not in inits:
            continue
        weight = node.input[1]
        if weight in seen:
            if external_data_helper.uses_external_data(inits[weight]):  # a lazy one: the file
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[weight])
                copy.name = f"{weight}_{node.name}"
            else:
                copy = numpy_helper.from_array(tensor_array(inits[weight]),
                                               f"{weight}_{node.name}")
            append_initializer(model, copy)
            node.input[1] = copy.name
        seen.add(weight)


PASS = Int4WeightPass()
