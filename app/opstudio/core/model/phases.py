"""Prefill and decode: the two phases of a decoder with a KV cache, as dims and inputs.

A decoder exported with a KV cache (``past_key_values.N.key/value`` inputs, ``present.N.*``
outputs) is run by its users in two phases with very different costs:

- ``prefill``: the whole prompt at once (sequence = its length, 128 by default), empty past (0);
- ``decode``: one new token after a past of N tokens (512 by default).

The dims that follow from others are derived, never guessed: the total length is past +
sequence (``total_sequence_length``, the ``attention_mask`` length, a name such as
``past_sequence_length + 1``); the KV head size and KV head count come from the KV inputs' or
outputs' fixed dims, else the attention node's attributes (GroupQueryAttention,
MultiHeadAttention, Attention, with the query projection's width), else a
``genai_config.json`` beside the model. A dim that cannot be decided is an ``OpstudioError``
naming the input, the dim and the flag to pass.

``is_prompt`` tells whether supplied inputs are a real prompt (token ids and no past);
``opstudio.core.measure.inputs`` then runs that prompt once to decode after it (this module stays below
the input builder, which reads the layout and dims from here).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.model.graph import TensorInfo, input_specs

PHASES = ("prefill", "decode")
DEFAULT_SEQ = 128  # the prompt's length in prefill, and any sequence dim left unnamed
DEFAULT_DECODE_PAST = 512
GENAI_CONFIG = "genai_config.json"

_FLOAT = {"float16", "float32", "float64", "bfloat16"}
# a quantized cache (kv-cache pass): int8, or uint8 holding two int4 values
_CACHE_TYPES = _FLOAT | {"int8", "uint8"}
# A dim named like a size of the cache's tensors, not its length: "kv_cache_dim" is a head size.
_SIZE_WORDS = ("dim", "head", "size", "hidden", "embed", "width", "channel", "feature")
_WEIGHT_PATH = {"Cast", "Identity", "DequantizeLinear"}
_ACTIVATION_PATH = {"Add", "Cast", "Identity", "Mul", "Sub"}


def is_past_length_name(name: str) -> bool:
    """A dim name meaning how many tokens the cache holds (``past_sequence_length``, ``past``,
    ``cache_len``); not a size of the cached vectors (``kv_cache_dim``, ``head_size``)."""
    low = name.lower()
    if "+" in low:
        return False
    return ("past" in low or "cache" in low) and not any(w in low for w in _SIZE_WORDS)


def check_phase(phase: str | None, past: int | None) -> None:
    if phase is not None and phase not in PHASES:
        raise OpstudioError(f"phase {phase!r} is not one of {', '.join(PHASES)}")
    if past is not None and (isinstance(past, bool) or not isinstance(past, int) or past < 0):
        raise OpstudioError(f"--past must be a whole number of tokens, 0 or more, not {past!r}")
    if phase == "prefill" and past:
        raise OpstudioError(f"--past {past}: a prefill starts from an empty past; "
                            "use --phase decode to run one token after a past")


@dataclass
class KvLayout:
    """Which input dims play which part in a KV-cache decoder (empty sets for other models)."""
    kv_inputs: list[TensorInfo] = field(default_factory=list)
    past: dict[str, str] = field(default_factory=dict)  # dim name -> an input holding it
    seq: dict[str, str] = field(default_factory=dict)
    total: dict[str, str] = field(default_factory=dict)
    head: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (input, axis)
    kv_heads: dict[str, tuple[str, int]] = field(default_factory=dict)
    ids_input: str | None = None

    @property
    def has_cache(self) -> bool:
        return bool(self.kv_inputs)


def cache_zeros(shape: Any, dtype: Any) -> np.ndarray:
    """An empty-valued KV cache: zeros, but for a uint8 cache of two int4 codes per byte the
    code of zero in both nibbles (onnxruntime stores a 4-bit value offset by 8)."""
    dtype = np.dtype(dtype)
    return np.full(shape, 0x88 if dtype == np.uint8 else 0, dtype=dtype)


def fit_cache_feed(arg: Any, value: np.ndarray) -> np.ndarray:
    """``value`` as the session input ``arg`` (onnxruntime's NodeArg) takes it: a float past
    fed to a quantized KV cache input (int8, or uint8 of int4 pairs) becomes the same cache in
    that type. The before and after of a kv-cache step share one feed, whose past is empty or
    zeros (what synthetic inputs hold); a past of real values cannot be converted."""
    quantized = {"tensor(int8)": np.int8, "tensor(uint8)": np.uint8}.get(arg.type)
    value = np.asarray(value)
    low = arg.name.lower()
    if quantized is None or not np.issubdtype(value.dtype, np.floating) or value.ndim < 4 \
            or not ("past" in low or "cache" in low):
        return value
    if np.any(value):
        raise OpstudioError(f"'{arg.name}' is a quantized KV cache ({np.dtype(quantized).name}); "
                            "a float past of non-zero values cannot be fed to it")
    shape = list(value.shape)
    if isinstance(arg.shape[-1], int):
        shape[-1] = arg.shape[-1]
    return cache_zeros(shape, quantized)


def is_kv_input(spec: TensorInfo) -> bool:
    low = spec.name.lower()
    return (("past" in low or "cache" in low) and spec.dtype in _CACHE_TYPES
            and spec.shape is not None and len(spec.shape) >= 4)


def kv_layout(model: onnx.ModelProto) -> KvLayout:
    specs = input_specs(model)
    out = KvLayout(kv_inputs=[s for s in specs if is_kv_input(s)])
    for spec in out.kv_inputs:
        shape = spec.shape or []
        # [batch, kv_heads, past, head_size] (also the 5-d [2, batch, heads, past, head] of
        # com.microsoft Attention): the length is always second to last.
        if isinstance(shape[-2], str):
            out.past.setdefault(shape[-2], spec.name)
        if isinstance(shape[-1], str):
            out.head.setdefault(shape[-1], (spec.name, len(shape) - 1))
        d = shape[-3]
        if isinstance(d, str) and "batch" not in d.lower():
            out.kv_heads.setdefault(d, (spec.name, len(shape) - 3))
    ids = [s for s in specs if s.dtype in ("int32", "int64") and s.shape and len(s.shape) == 2
           and (s.name.lower() in ("input_ids", "ids", "tokens", "token_ids")
                or s.name.lower().endswith("input_ids"))]
    if ids:
        out.ids_input = ids[0].name
        seq = ids[0].shape[1] if ids[0].shape else None
        if isinstance(seq, str):
            out.seq.setdefault(seq, ids[0].name)
    for spec in specs:
        low = spec.name.lower()
        shape = spec.shape or []
        if "position_ids" in low and shape and isinstance(shape[-1], str):
            out.seq.setdefault(shape[-1], spec.name)
    for spec in specs:
        for d in spec.shape or []:
            if not isinstance(d, str):
                continue
            low = d.lower()
            if is_past_length_name(d):
                out.past.setdefault(d, spec.name)
            elif "+" in d or ("total" in low and ("seq" in low or "len" in low)):
                out.total.setdefault(d, spec.name)
    if out.has_cache:
        for spec in specs:
            shape = spec.shape or []
            if "mask" in spec.name.lower() and len(shape) >= 2 and isinstance(shape[-1], str) \
                    and shape[-1] not in out.seq and shape[-1] not in out.past:
                out.total.setdefault(shape[-1], spec.name)
    for name in list(out.seq):
        if name in out.past or name in out.total:
            del out.seq[name]
    return out


def derive_dims(model: onnx.ModelProto, dims: Mapping[str, int], *, phase: str | None = None,
                past: int | None = None, model_path: str | Path | None = None
                ) -> tuple[dict[str, int], list[str]]:
    """``dims`` completed with the values the phase implies and the dims that follow from
    others; given dims (``--dim``, or read off ``--inputs`` arrays) are kept. Also the notes
    saying how each derived value was chosen."""
    check_phase(phase, past)
    layout = kv_layout(model)
    out = dict(dims)
    notes: list[str] = []
    if phase is None and past is not None:
        phase = "decode"
    if phase == "decode" and not layout.past:
        raise OpstudioError(
            "--phase decode: the model has no past key/value (KV-cache) input, so it has no "
            "decode step to run; leave out --phase/--past or use --phase prefill")
    given_past = {k: out[k] for k in layout.past if k in out}
    if past is not None:
        for name, value in given_past.items():
            if value != past:
                raise OpstudioError(f"--past {past} disagrees with {name}={value} "
                                    "(from --dim or --inputs); give one of them")
    if phase == "prefill":
        for name, value in given_past.items():
            if value:
                raise OpstudioError(f"--phase prefill starts from an empty past, not "
                                    f"{name}={value}; use --phase decode --past {value}")
    if phase is not None:
        if given_past:
            p = next(iter(given_past.values()))
        elif phase == "decode":
            p = DEFAULT_DECODE_PAST if past is None else past
        else:
            p = 0
        for name in layout.past:
            if name not in out:
                out[name] = p
                notes.append(f"{name}={p} ({phase}: past length)")
        s = 1 if phase == "decode" else DEFAULT_SEQ
        for name in layout.seq:
            if name not in out:
                out[name] = s
                notes.append(f"{name}={s} ({phase}: " +
                             ("one new token)" if phase == "decode" else "prompt length)"))
    if phase is not None or (layout.has_cache and any(n in out for n in layout.past)):
        p = next((out[n] for n in layout.past if n in out), 0)
        s = next((out[n] for n in layout.seq if n in out), DEFAULT_SEQ)
        for name in layout.total:
            if name not in out and "+" not in name:
                out[name] = p + s
                notes.append(f"{name}={p + s} (past + sequence)")
    missing_head = [n for n in layout.head if n not in out]
    missing_heads = [n for n in layout.kv_heads if n not in out]
    if missing_head or missing_heads:
        head, heads, source = kv_geometry(model, model_path)
        for name in missing_head:
            if head is None:
                spec, axis = layout.head[name]
                raise OpstudioError(
                    f"input '{spec}' dim {axis} ('{name}') is the key/value head size, which "
                    "opstudio cannot derive (no fixed size on the KV inputs or outputs, no "
                    f"attention node giving head counts, no {GENAI_CONFIG} beside the model): "
                    f"pass --dim {name}=N")
            out[name] = head
            notes.append(f"{name}={head} (head size, {source['head']})")
        for name in missing_heads:
            if heads is None:
                spec, axis = layout.kv_heads[name]
                raise OpstudioError(
                    f"input '{spec}' dim {axis} ('{name}') is the number of key/value heads, "
                    f"which opstudio cannot derive: pass --dim {name}=N")
            out[name] = heads
            notes.append(f"{name}={heads} (key/value heads, {source['heads']})")
    return out, notes


def kv_geometry(model: onnx.ModelProto, model_path: str | Path | None = None
                ) -> tuple[int | None, int | None, dict[str, str]]:
    """(head size, key/value heads, where each came from), None where nothing says."""
    head: int | None = None
    heads: int | None = None
    source: dict[str, str] = {}

    def take(h: int | None, k: int | None, why: str) -> None:
        nonlocal head, heads
        if head is None and h and h > 0:
            head, source["head"] = int(h), why
        if heads is None and k and k > 0:
            heads, source["heads"] = int(k), why

    fixed = [s.shape for s in input_specs(model) if is_kv_input(s)]
    for vi in model.graph.output:
        if "present" in vi.name.lower() and vi.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape.dim
            if len(dims) >= 4:
                fixed.append([d.dim_value if d.HasField("dim_value") else None for d in dims])
    for shape in fixed:
        if shape:
            take(shape[-1] if isinstance(shape[-1], int) else None,
                 shape[-3] if isinstance(shape[-3], int) else None, "fixed on the KV tensors")
    if head is None or heads is None:
        h, k = _attention_geometry(model)
        take(h, k, "from the attention node")
    if (head is None or heads is None) and model_path is not None:
        h, k = _genai_config_geometry(Path(model_path).parent / GENAI_CONFIG)
        take(h, k, f"from {GENAI_CONFIG}")
    return head, heads, source


def _attr(node: onnx.NodeProto, name: str) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _attention_geometry(model: onnx.ModelProto) -> tuple[int | None, int | None]:
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output if o}
    inits = {t.name: list(t.dims) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            t = _attr(n, "value")
            if isinstance(t, onnx.TensorProto):
                inits[n.output[0]] = list(t.dims)
    known = {vi.name: vi for vi in list(graph.value_info) + list(graph.output)}

    def width(tensor: str, depth: int = 0) -> int | None:
        vi = known.get(tensor)
        if vi is not None and vi.type.tensor_type.shape.dim:
            last = vi.type.tensor_type.shape.dim[-1]
            if last.HasField("dim_value") and last.dim_value > 0:
                return int(last.dim_value)
        node = producers.get(tensor)
        if node is None or depth > 8:
            return None
        if node.op_type == "MatMulNBits":
            n = _attr(node, "N")
            return int(n) if isinstance(n, int) else None
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            w = weight_dims(node.input[1])
            if not w or len(w) < 2:
                return None
            if node.op_type == "Gemm" and _attr(node, "transB"):
                return w[-2]
            return w[-1]
        if node.op_type in _ACTIVATION_PATH:
            for i in node.input:
                if i and i not in inits:
                    return width(i, depth + 1)
        return None

    def weight_dims(tensor: str, depth: int = 0) -> list[int] | None:
        if tensor in inits:
            return inits[tensor]
        node = producers.get(tensor)
        if node is None or depth > 8 or not node.input:
            return None
        if node.op_type in _WEIGHT_PATH:
            return weight_dims(node.input[0], depth + 1)
        if node.op_type == "Transpose":
            d = weight_dims(node.input[0], depth + 1)
            perm = _attr(node, "perm")
            if d is None:
                return None
            return [d[p] for p in perm] if isinstance(perm, list) else d[::-1]
        return None

    for n in graph.node:
        num_heads = _attr(n, "num_heads")
        if not isinstance(num_heads, int) or num_heads <= 0:
            continue
        if n.op_type == "GroupQueryAttention":
            kv = _attr(n, "kv_num_heads")
            kv = kv if isinstance(kv, int) and kv > 0 else None
            key = n.input[1] if len(n.input) > 1 and n.input[1] else None
            k_w = width(key) if key else None
            if k_w and kv and k_w % kv == 0:
                return k_w // kv, kv
            q_w = width(n.input[0])
            if q_w and key is None and kv:  # packed QKV: num_heads + 2 × kv_num_heads heads
                parts = num_heads + 2 * kv
                if q_w % parts == 0:
                    return q_w // parts, kv
            elif q_w and q_w % num_heads == 0:
                return q_w // num_heads, kv
            return None, kv
        if n.op_type in ("MultiHeadAttention", "Attention"):
            sizes = _attr(n, "qkv_hidden_sizes")
            if isinstance(sizes, list) and sizes and sizes[0] % num_heads == 0:
                return sizes[0] // num_heads, num_heads
            if n.op_type == "Attention" and len(n.input) > 1:
                w = weight_dims(n.input[1])
                q_w = w[-1] // 3 if w else None
            else:
                q_w = width(n.input[0])
            if q_w and q_w % num_heads == 0:
                return q_w // num_heads, num_heads
            return None, num_heads
    return None, None


def _genai_config_geometry(path: Path) -> tuple[int | None, int | None]:
    if not path.is_file():
        return None, None
    try:
        decoder = json.loads(path.read_text(encoding="utf-8"))["model"]["decoder"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    if not isinstance(decoder, dict):
        return None, None

    def whole(key: str) -> int | None:
        v = decoder.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    head = whole("head_size")
    hidden, heads = whole("hidden_size"), whole("num_attention_heads")
    if head is None and hidden and heads and hidden % heads == 0:
        head = hidden // heads
    return head, whole("num_key_value_heads") or heads


# ---------------------------------------------------------------------------------------------
# Decode after a real prompt


def is_prompt(model: onnx.ModelProto, supplied: Mapping[str, np.ndarray]) -> bool:
    """``supplied`` holds a prompt's token ids and no past (or a past of length 0)."""
    layout = kv_layout(model)
    if not layout.has_cache or layout.ids_input not in supplied:
        return False
    return all(supplied[s.name].shape[-2] == 0 for s in layout.kv_inputs if s.name in supplied)


def check_request(prompt: Any, generate: Any) -> None:
    for flag, value in (("--prompt", prompt), ("--generate", generate)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OpstudioError(f"{flag} must be a whole number of tokens, 1 or more, "
                                f"not {value!r}")


def describe_step(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> str:
    """Which step of a decoder with a KV cache ``inputs`` run, in words: "prefill of 128
    tokens", "decode step after 512 tokens"; "" for a model without a KV cache."""
    layout = kv_layout(model)
    ids = layout.ids_input
    if not layout.has_cache or ids is None or ids not in inputs:
        return ""
    pasts = [int(inputs[s.name].shape[-2]) for s in layout.kv_inputs if s.name in inputs]
    past = max(pasts, default=0)
    seq = int(inputs[ids].shape[1])
    if past == 0:
        return f"prefill of {seq} tokens"
    if seq == 1:
        return f"decode step after {past} tokens"
    return f"{seq} tokens after {past}"
