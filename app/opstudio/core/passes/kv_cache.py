"""Store the chosen layers' KV cache in int8 (or packed int4) instead of float.

A decoder's decode step reads the whole KV cache once per token: at a long past it is most of
the bytes the step moves. onnxruntime's ``GroupQueryAttention`` (com.microsoft, 1.27 and later)
keeps its cache quantized on the CPU: with ``k_quant_type``/``v_quant_type`` = ``PER_CHANNEL`` and
``kv_cache_bit_width`` 8 or 4 it reads past_key/past_value as int8 (or two 4-bit values per
uint8 byte, so the head axis halves), writes present_key/present_value the same way, and
dequantizes with one float scale per KV head channel (``k_scale``/``v_scale``, kv_heads × head
elements) that the model carries as initializers.

The scales are calibrated: the float model runs on the calibration samples (the prompt the
optimizer was given first, as for int8-static) and each channel's scale is its largest |key|
(|value|) over every cached position divided by the largest code (127, or 7 for int4). Keys are
measured from the present outputs, after the kernel's rotary embedding; a key channel's peak is
that of its rotary pair's norm, which no position exceeds, so the scales hold at positions the
prompt did not reach.

A layer's cache is its ``GroupQueryAttention`` node, fused by ``fuse`` or exported so by
onnxruntime-genai; any other node is refused (its attention is not one kernel yet). The node's
past inputs and present outputs must be the graph's own, since the caller feeds them: their
element type (and for int4 their head size) changes, which the step's notes say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.errors import OpstudioError
from opstudio.core.model.graph_utils import consumers, copy_model
from opstudio.core.passes._calibration import (
    calibration_params,
    calibration_samples,
    check_calibration,
)
from opstudio.core.passes.base import ParamSpec, Pass, PassContext, PassResult, ScanParams

_GQA = ("com.microsoft", "GroupQueryAttention")
_PAST = (3, 4)  # past_key, past_value
_PRESENT = (1, 2)  # present_key, present_value
_SCALES = (12, 13)  # k_scale, v_scale
_LARGEST_CODE = {8: 127.0, 4: 7.0}
_CACHE_TYPE = {8: TensorProto.INT8, 4: TensorProto.UINT8}
# what a zero key or value is stored as: int8 0, or int4 0 in both nibbles of a byte (the
# kernel stores a 4-bit code offset by 8)
ZERO_CODE = {TensorProto.INT8: 0, TensorProto.UINT8: 0x88}


class KvCachePass(Pass):
    technique = "kv-cache"
    label = "KV cache INT8/INT4"
    description = ("store the chosen attention layers' KV cache in int8 or packed int4 with "
                   "per-channel scales calibrated on the prompt (GroupQueryAttention)")
    params = (
        ParamSpec("bits", "choice", 8, "Bits", "8: int8 cache (half of fp16's bytes); 4: two "
                  "values per byte (a quarter)", choices=(8, 4)),
        *calibration_params(4),
    )
    # after every weight rewrite: it changes no weight, only the cache's type
    plan_order = 95
    scan_params: ClassVar[ScanParams | None] = None
    helps_when = "memory"
    because = "a decode step reads the whole KV cache once per token; int8 halves those bytes"
    colour = "#8e44ad"

    def validate_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        return check_calibration(self.technique, super().validate_params(params))

    def check(self, model: onnx.ModelProto, node: onnx.NodeProto,
              params: Mapping[str, Any] | None = None) -> str | None:
        if (node.domain, node.op_type) != _GQA:
            return ("not a GroupQueryAttention node: fuse the attention first (technique "
                    "'fuse'), then quantize its KV cache")
        attrs = {a.name: a for a in node.attribute}
        kind = attrs.get("k_quant_type")
        if kind is not None and kind.s.decode() != "NONE":
            return "its KV cache is already quantized"
        if len(node.input) <= max(_PAST) or not all(node.input[i] for i in _PAST):
            return "it keeps no KV cache (no past key/value inputs)"
        inputs = {i.name: i for i in model.graph.input}
        outputs = {o.name for o in model.graph.output}
        past = [node.input[i] for i in _PAST]
        if any(name not in inputs for name in past) or \
                any(len(node.output) <= i or node.output[i] not in outputs for i in _PRESENT):
            return "its past key/value are not the model's inputs and outputs"
        if any(inputs[n].type.tensor_type.elem_type != TensorProto.FLOAT for n in past):
            return "its KV cache is not float32"
        readers = consumers(model.graph)
        for name in past:
            if any(r is not node and r.op_type != "Shape" for r in readers.get(name, [])):
                return f"'{name}' is read by other nodes than this attention"
        return None

    def _rewrite(self, work: onnx.ModelProto, chosen: Sequence[str], params: Mapping[str, Any],
                 ctx: PassContext) -> PassResult:
        bits = int(params["bits"])
        by_name = {n.name: n for n in work.graph.node}
        nodes = [by_name[name] for name in chosen]
        samples = calibration_samples(work, params["calibration"], params["samples"], ctx)
        ctx.report(0.2, f"kv-cache: calibrating on {len(samples)} sample(s)")
        amax = _present_amax(work, nodes, samples, ctx)
        inputs = {i.name: i for i in work.graph.input}
        outputs = {o.name: o for o in work.graph.output}
        result = PassResult(model=work)
        before = after = 0.0
        for node in nodes:
            kv_heads = _attr_int(node, "kv_num_heads")
            for past, present, slot, kind in zip(_PAST, _PRESENT, _SCALES, ("k", "v")):
                peak = amax[node.output[present]]
                head = peak.size // kv_heads
                scale = (np.maximum(peak, 1e-6) / _LARGEST_CODE[bits]).astype(np.float32)
                scale_name = f"{node.name}/{kind}_scale"
                work.graph.initializer.append(numpy_helper.from_array(scale, scale_name))
                while len(node.input) <= slot:
                    node.input.append("")
                node.input[slot] = scale_name
                for info in (inputs[node.input[past]], outputs[node.output[present]]):
                    _to_cache_type(info, bits, head)
                before += 4 * kv_heads * head
                after += kv_heads * head * bits / 8
            for name, value in (("k_quant_type", "PER_CHANNEL"), ("v_quant_type", "PER_CHANNEL"),
                                ("kv_cache_bit_width", bits)):
                _set_attr(node, name, value)
            result.applied.append(node.name)
            result.details[node.name] = {"bits": bits, "kv_heads": kv_heads,
                                         "calibration_samples": len(samples)}
        dtype = "int8" if bits == 8 else "uint8 holding two int4 values (head size halved)"
        pasts = sorted({node.input[i] for node in nodes for i in _PAST})
        result.notes.append(
            f"the runtime now feeds {len(pasts)} past key/value input(s) as {dtype} and reads "
            f"the present outputs back as such; the dequantization scales are in the model "
            f"(per channel, calibrated on {len(samples)} sample(s))")
        result.notes.append(f"KV cache bytes per token: {before:.0f} → {after:.0f}")
        return result


def _present_amax(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto],
                  samples: Sequence[Mapping[str, np.ndarray]],
                  ctx: PassContext) -> dict[str, np.ndarray]:
    """Per present output of ``nodes``: the largest |x| per (KV head, channel), flattened."""
    from opstudio.core.measure.accuracy import run_outputs

    probe = copy_model(model)  # run_outputs reads every output; keep only what is measured
    wanted = {node.output[i] for node in nodes for i in _PRESENT}
    logits = [o for o in probe.graph.output if o.name not in wanted]
    for info in logits:
        probe.graph.output.remove(info)
    # the keys the kernel rotates itself (do_rotary) before it caches them
    rotated = {node.output[1]: bool(_attr_int(node, "rotary_interleaved", 0)) for node in nodes
               if _attr_int(node, "do_rotary", 0)}
    amax: dict[str, np.ndarray] = {}
    for k, feeds in enumerate(samples):
        ctx.check_cancelled()
        ctx.report(0.2 + 0.6 * k / len(samples), f"kv-cache: sample {k + 1}/{len(samples)}")
        try:
            values = run_outputs(probe, _completed(model, feeds), threads=0)
        except OpstudioError as exc:
            raise OpstudioError(f"kv-cache: running the model on calibration sample {k + 1} "
                                f"failed: {exc}") from None
        for name, value in values.items():
            # [batch, kv_heads, length, head] → the peak per (kv_head, channel)
            value = np.abs(value)
            if name in rotated:
                value = _pair_norms(value, rotated[name])
            peak = value.max(axis=(0, 2)).reshape(-1) if value.shape[2] else \
                np.zeros(value.shape[1] * value.shape[3], np.float32)
            amax[name] = np.maximum(amax[name], peak) if name in amax else peak
    return amax


def _pair_norms(keys: np.ndarray, interleaved: bool) -> np.ndarray:
    """Each channel replaced by the norm of its rotary pair: a rotation at another position
    moves a key's value between the two channels of a pair but never beyond that norm, so a
    scale from it holds at every position, not only the calibration prompt's."""
    head = keys.shape[-1]
    if interleaved:
        pairs = keys.reshape(*keys.shape[:-1], head // 2, 2)
        norm = np.sqrt((pairs.astype(np.float64) ** 2).sum(-1, keepdims=True))
        return np.broadcast_to(norm, pairs.shape).reshape(keys.shape)
    first, second = keys[..., :head // 2].astype(np.float64), keys[..., head // 2:]
    norm = np.sqrt(first ** 2 + second.astype(np.float64) ** 2)
    return np.concatenate([norm, norm], axis=-1)


def _completed(model: onnx.ModelProto,
               feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """A prompt saved as token ids and a mask (no past) with the rest of a prefill's inputs."""
    from opstudio.core.measure.inputs import build_inputs

    if all(i.name in feeds for i in model.graph.input):
        return feeds
    return build_inputs(model, {}, {}, dict(feeds), 0, 2**31, phase="prefill")


def _to_cache_type(info: onnx.ValueInfoProto, bits: int, head: int) -> None:
    tensor = info.type.tensor_type
    tensor.elem_type = _CACHE_TYPE[bits]
    if bits == 4 and len(tensor.shape.dim) == 4:
        tensor.shape.dim[3].Clear()
        tensor.shape.dim[3].dim_value = head // 2


def _attr_int(node: onnx.NodeProto, name: str, default: int | None = None) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    if default is not None:
        return default
    raise OpstudioError(f"{node.name}: GroupQueryAttention without '{name}'")


def _set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for k, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[k]
            break
    node.attribute.append(helper.make_attribute(name, value))


PASS = KvCachePass()
