"""INT8 quantization of chosen nodes through ``onnxruntime.quantization``.

- ``int8-dynamic``: weights stored as int8, activations quantized at run time
  (``quantize_dynamic``: MatMul → DynamicQuantizeLinear + MatMulInteger, Conv → ConvInteger;
  a Gemm is first rewritten as MatMul + Add, since the dynamic quantizer has no Gemm rule).
- ``int8-static``: QuantizeLinear/DequantizeLinear pairs around the node with activation ranges
  measured on calibration inputs (``quantize_static``, QDQ format, uint8 activations, int8
  weights — onnxruntime's advice for x86 CPUs); onnxruntime fuses them into QLinear kernels.
  ``per_channel`` on a model below opset 13 raises its opset to 13 (DequantizeLinear's ``axis``).
  ``smooth_quant`` (α > 0) first applies SmoothQuant (``_smoothquant``) to the chosen
  MatMul/Gemm nodes: activation outliers move into the weights through a float ``Mul`` per
  input tensor, which stays float; only the chosen nodes are quantized.

Only the chosen nodes are touched: their names go to ``nodes_to_quantize``. Weights held in
``Constant`` nodes are moved to initializers first, since the quantizers require that. Random
calibration uses the samples the optimizer passes in ``PassContext.inputs`` and fills up to
``samples`` with synthetic inputs of the same shapes from ``opstudio.core.measure.inputs.make_inputs``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.model.graph_utils import nodes_by_name
from opstudio.core.model.model_io import (
    EXTERNAL_DATA_THRESHOLD,
    inline_bytes,
    is_lazy,
    load_weights,
)
from opstudio.core.passes import _int8_stream as int8_stream
from opstudio.core.passes import _ort_support as ort_support
from opstudio.core.passes import _smoothquant as smoothquant
from opstudio.core.passes._activations import calibrated_stats
from opstudio.core.passes._calibration import (
    calibration_params,
    calibration_samples,
    check_calibration,
)
from opstudio.core.passes._quiet_ort import quiet_onnxruntime_logs
from opstudio.core.passes._weights import opset
from opstudio.core.passes.base import (
    ParamSpec,
    Pass,
    PassContext,
    PassResult,
    RewriterFailed,
    ScanParams,
)

# What onnxruntime's registries can quantize per mode, restricted to the ops where quantizing one
# node on its own changes the arithmetic (IntegerOpsRegistry / QDQRegistry in
# onnxruntime/quantization/registry.py). The dynamic registry has no Gemm: a chosen Gemm is
# first rewritten as MatMul (+ Add for its bias), which it has.
DYNAMIC_OPS: dict[str, int] = {"MatMul": 1, "Conv": 1, "Gemm": 1}  # op -> weight input index
STATIC_OPS: dict[str, int] = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1}

METHODS = ("minmax", "entropy", "percentile")
# onnx shape inference knows no types past contrib ops (MatMulNBits from an earlier int4 step,
# fused ops from exporters); the quantizer then needs a default for tensors it cannot type.
_EXTRA = {"DefaultTensorType": onnx.TensorProto.FLOAT}


def _weight_reason(model: onnx.ModelProto, node: onnx.NodeProto, index: int,
                   need_constant: bool) -> str | None:
    if len(node.input) <= index or not node.input[index]:
        return f"{node.op_type} node has no weight input"
    value, why = ort_support.constant_value(model, node.input[index])
    if value is None:
        if need_constant:
            return f"{why}; onnxruntime's quantizer needs it as an initializer"
        return None
    if value.dtype != np.float32:
        return f"its weight is {value.dtype}, not float32"
    if node.op_type == "MatMul" and value.ndim < 2:
        return "its weight is a vector; MatMulInteger needs a 2-D weight"
    return None


class _Int8Pass(Pass):
    helps_when = "compute"
    because = "INT8 kernels do more arithmetic per cycle"
    ops: ClassVar[dict[str, int]] = {}
    dynamic = True

    def check(self, model: onnx.ModelProto, node: onnx.NodeProto,
              params: Mapping[str, Any] | None = None) -> str | None:
        if node.domain not in ("", "ai.onnx"):
            return f"{node.domain}:{node.op_type} is not a standard ONNX op"
        if node.op_type not in self.ops:
            supported = ", ".join(sorted(self.ops))
            return f"{self.technique} handles {supported}, not {node.op_type}"
        if self.dynamic and node.op_type == "Gemm":
            problem = ort_support.gemm_problem(model, node)
            if problem:
                return f"{problem}; int8-dynamic quantizes a Gemm as MatMul (int8-static takes it)"
        return _weight_reason(model, node, self.ops[node.op_type],
                              need_constant=self.dynamic or node.op_type != "MatMul")

    def _rewrite(self, work: onnx.ModelProto, chosen: Sequence[str], params: Mapping[str, Any],
                 ctx: PassContext) -> PassResult:
        folded = ort_support.fold_constant_inputs(work, chosen)
        ctx.report(0.1, f"{self.technique}: quantizing {len(chosen)} node(s)")
        ctx.check_cancelled()
        notes: list[str] = []
        if folded:
            notes.append(f"made {len(folded)} constant weight(s) initializers "
                         "(from Constant nodes or chains of constant ops: ConstantOfShape, Cast, "
                         "Transpose, DequantizeLinear…)")
        extra_details: dict[str, dict[str, Any]] = {}
        if not self.dynamic and params.get("smooth_quant"):
            extra_details = _smooth(work, chosen, params, ctx, notes)
        # the name each chosen node has in the model handed to onnxruntime
        target = {name: name for name in chosen}
        if self.dynamic:
            gemms = ort_support.gemm_to_matmul(work, chosen)
            target.update(gemms)
            if gemms:
                notes.append(f"rewrote {len(gemms)} Gemm(s) as MatMul + Add first "
                             "(the dynamic quantizer has no Gemm)")
        by_name = nodes_by_name(work.graph)
        work = self._prepare(work, params, notes)
        opset_before = opset(work)
        names = [target[n] for n in chosen]
        if self.dynamic and is_lazy(work) and int8_stream.streamable(work, names):
            before = ort_support.shape_only_copy(work)
            int8_stream.rewrite(work, names, params["per_channel"], ctx.workdir,
                                self.technique, ctx.report, ctx.check_cancelled)
            return self._settled(before, work, chosen, target, _dynamic_details(params),
                                 extra_details, notes)
        load_weights(work)  # onnxruntime's quantizers read every weight from the file
        with ort_support.private_workdir(ctx.workdir) as folder:
            src, dst = folder / "input.onnx", folder / "quantized.onnx"
            # protobuf caps one message at 2 GiB: big models go through external data
            large = inline_bytes(work) > EXTERNAL_DATA_THRESHOLD
            onnx.save_model(work, str(src), save_as_external_data=large,
                            all_tensors_to_one_file=True, location="input.onnx.data")
            op_types = sorted({by_name[n].op_type for n in names})
            with quiet_onnxruntime_logs():
                extra = self._run(src, dst, names, op_types, params, ctx, notes, large)
            result = onnx.load_model(str(dst))
        if self.dynamic:
            ort_support.restore_gemms(work, result, set(by_name) - set(names))
        if opset(result) > opset_before:
            notes.append(f"onnxruntime's quantizer raised the model's opset from {opset_before} "
                         f"to {opset(result)} (it converts older models before quantizing)")
        return self._settled(work, result, chosen, target, extra, extra_details, notes)

    def _settled(self, before: onnx.ModelProto, result: onnx.ModelProto, chosen: Sequence[str],
                 target: Mapping[str, str], extra: Mapping[str, Any],
                 extra_details: Mapping[str, Mapping[str, Any]], notes: list[str]) -> PassResult:
        """The pass's result once the chosen nodes of ``before`` are rewritten in ``result``."""
        applied = [n for n in chosen if self._rewritten(result, target[n])]
        skipped = {name: "onnxruntime's quantizer left it unchanged"
                   for name in chosen if name not in applied}
        rewritten = [target[n] for n in applied]
        by_target = ort_support.settle(before, result, rewritten)
        details = {}
        for name in applied:
            details[name] = {**by_target[target[name]], **extra, **extra_details.get(name, {})}
        return PassResult(model=result, applied=applied, skipped=skipped, details=details,
                          notes=notes)

    def _run(self, src: Path, dst: Path, chosen: list[str], op_types: list[str],
             params: Mapping[str, Any], ctx: PassContext, notes: list[str],
             large: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _rewritten(self, result: onnx.ModelProto, name: str) -> bool:
        raise NotImplementedError

    def _prepare(self, work: onnx.ModelProto, params: Mapping[str, Any],
                 notes: list[str]) -> onnx.ModelProto:
        return work


class Int8DynamicPass(_Int8Pass):
    technique = "int8-dynamic"
    plan_order = 60
    colour = "#2f7ed8"
    creates = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"})
    # Both variants run the same kernels at the same speed, but which one is more accurate
    # differs from node to node (measured on a GPT-2-sized block: per-channel was 1.7 dB better
    # on the second MLP projection and 3.9 dB worse on the QKV projection; on x86 without VNNI
    # the u8×s8 kernels saturate more often when every column uses the full int8 range), so
    # the advisor's plan picks per node.
    scan_params: ClassVar[ScanParams | None] = ({"per_channel": False}, {"per_channel": True})
    label = "INT8 dynamic"
    description = ("int8 weights, activations quantized at run time "
                   "(onnxruntime quantize_dynamic: MatMulInteger / ConvInteger)")
    params = (
        ParamSpec("per_channel", "bool", False, "Per channel",
                  "one scale per output channel instead of one per tensor"),
    )
    ops = DYNAMIC_OPS
    dynamic = True

    def _run(self, src, dst, chosen, op_types, params, ctx, notes, large):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with ort_support.ort_rewriter(
                "onnxruntime's dynamic quantizer",
                "leave these nodes out of the step (choose nodes by name or name_pattern) "
                "or try int8-static or fp16 on them"):
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=op_types,
                             per_channel=params["per_channel"], weight_type=QuantType.QInt8,
                             nodes_to_quantize=chosen, use_external_data_format=large,
                             extra_options={"MatMulConstBOnly": True, **_EXTRA})
        return _dynamic_details(params)

    def reads_lazy(self, params):
        # MatMul weights are quantized one at a time from their files (``_int8_stream``)
        return True

    def _rewritten(self, result, name):
        # quantize_dynamic replaces the node by `<name>_quant` (MatMulInteger / ConvInteger).
        names = {n.name for n in result.graph.node}
        return name not in names


class Int8StaticPass(_Int8Pass):
    technique = "int8-static"
    plan_order = 50
    colour = "#1b5fa8"
    creates = frozenset({"QuantizeLinear", "DequantizeLinear"})
    label = "INT8 static"
    description = ("int8 weights and activations with ranges calibrated on sample inputs "
                   "(onnxruntime quantize_static, QDQ format)")
    params = (
        *calibration_params(16),
        ParamSpec("method", "choice", "minmax", "Method", "how activation ranges are chosen",
                  choices=METHODS),
        ParamSpec("per_channel", "bool", False, "Per channel",
                  "one weight scale per output channel instead of one per tensor"),
        ParamSpec("smooth_quant", "float", 0.0, "SmoothQuant α",
                  "move activation outliers into the weights first (SmoothQuant; 0 = off, "
                  "0.5 usual for LLMs): x/s · s·W with s = max|x|^α / max|W|^(1−α)",
                  minimum=0.0, maximum=1.0),
    )
    ops = STATIC_OPS
    dynamic = False

    def validate_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        return check_calibration(self.technique, super().validate_params(params))

    def _run(self, src, dst, chosen, op_types, params, ctx, notes, large):
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        model = onnx.load_model(str(src), load_external_data=False)
        samples = calibration_samples(model, params["calibration"], params["samples"], ctx)
        ctx.report(0.3, f"int8-static: calibrating on {len(samples)} sample(s)")
        ctx.check_cancelled()
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[params["method"]]
        try:
            quantize_static(str(src), str(dst), _Reader(samples), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=op_types, per_channel=params["per_channel"],
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=chosen, calibrate_method=method,
                            use_external_data_format=large,
                            extra_options=dict(_EXTRA))
        except Exception as exc:  # calibration runs the model: bad inputs surface here
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RewriterFailed(
                f"onnxruntime's static quantizer failed while calibrating ({first[:200]}); "
                "give calibration inputs the model runs on (--inputs, or an .npz as "
                "'calibration'), or leave these nodes out of the step") from exc
        if params["calibration"] == "random":
            given = min(len(ctx.inputs), len(samples))
            origin = f"{given} given, {len(samples) - given} synthetic"
        else:
            origin = f"from {params['calibration']}"
        notes.append(f"calibrated on {len(samples)} sample(s) ({origin}; {params['method']})")
        return {"weight_type": "int8", "activation_type": "uint8",
                "per_channel": params["per_channel"], "calibration_samples": len(samples),
                "method": params["method"]}

    def _prepare(self, work, params, notes):
        # per-channel scales need DequantizeLinear's `axis`, which exists from opset 13 on;
        # onnxruntime's quantizer does not raise the opset itself for it
        version = next((o.version for o in work.opset_import if o.domain in ("", "ai.onnx")), 0)
        if not params["per_channel"] or version >= 13:
            return work
        from onnx import version_converter

        try:
            converted = version_converter.convert_version(work, 13)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OpstudioError(
                f"int8-static: per_channel needs opset 13 and converting this opset {version} "
                f"model failed ({first[:150]}); use per_channel=false") from exc
        notes.append(f"raised the model's opset from {version} to 13 (per-channel "
                     "DequantizeLinear needs it)")
        return converted

    def _rewritten(self, result, name):
        # The QDQ quantizer keeps the node and feeds it from DequantizeLinear outputs.
        producers = {out: n for n in result.graph.node for out in n.output}
        for node in result.graph.node:
            if node.name == name:
                return any(producers.get(i) is not None
                           and producers[i].op_type == "DequantizeLinear" for i in node.input)
        return False


def _dynamic_details(params: Mapping[str, Any]) -> dict[str, Any]:
    return {"weight_type": "int8", "per_channel": params["per_channel"]}


def _smooth(work: onnx.ModelProto, chosen: Sequence[str], params: Mapping[str, Any],
            ctx: PassContext, notes: list[str]) -> dict[str, dict[str, Any]]:
    """SmoothQuant on ``work`` in place, before quantizing; per smoothed node its details."""
    alpha = params["smooth_quant"]
    axes = smoothquant.smoothable(work, chosen)
    if not axes:
        notes.append("SmoothQuant: none of the nodes has a constant float32 weight to scale")
        return {}
    stats, _ = calibrated_stats(work, list(axes), params, ctx, "int8-static SmoothQuant")
    created = smoothquant.smooth(work, axes, alpha, {n: s.abs_max for n, s in stats.items()})
    served = [name for members in created.values() for name in members]
    notes.append(f"SmoothQuant (α={alpha:g}) scaled {len(created)} input tensor(s) of "
                 f"{len(served)} node(s) before quantizing")
    return {name: {"smooth_quant": alpha} for name in served}


class _Reader:
    """The CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, samples: Sequence[Mapping[str, np.ndarray]]) -> None:
        self._samples = list(samples)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._samples):
            return None
        self._next += 1
        return dict(self._samples[self._next - 1])

    def __len__(self) -> int:
        return len(self._samples)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._samples = self._samples[start_index:end_index]
        self._next = 0


PASSES = {"int8-dynamic": Int8DynamicPass(), "int8-static": Int8StaticPass()}
