"""Inputs for running a model: which shape each input gets, and what values.

Shapes, in order of precedence:

1. ``shapes`` (``--shape x=1,3,224,224``) gives an input's whole shape;
2. ``dims`` (``--dim seq=128``) binds a named (symbolic) dim wherever it appears;
3. defaults for the obvious cases:
   - a dim named like a batch (``batch``, ``batch_size``, ``N``, ``B``, ``bs``, anything
     containing "batch") = 1;
   - a dim named like a past/cache length (containing "past" or "cache", but not a size of the
     cached vectors such as ``kv_cache_dim``) = 0;
   - a dim named like a sequence (``seq``, ``sequence``, ``seq_len``, ``sequence_length``,
     ``tokens``, ``T``, anything containing "seq" or "token", ``src_len``, ``*_length``) = 128;
   - a total length (``total_sequence_length``, …: contains "total" and "seq"/"len"; or a sum
     such as ``past_sequence_length + 1``) = past + sequence, i.e. 128 with the defaults above;
   - a leading dim with no name (``?``, ``-1``, or a name an exporter made up: ``unk__12``,
     ``p2o.DynamicDimension.0``) = 1 (the batch);
4. anything still unknown is an ``OpstudioError`` naming the input, the dim and the flag to pass.

A KV-cache decoder can be run in a ``phase`` (``opstudio.core.model.phases``): ``prefill`` (past 0,
sequence = the prompt's length) or ``decode`` (one token after a past of ``past`` tokens, 512 by
default). With or without a phase, the KV head size and head count are derived from the model,
never defaulted, and a total length is past + sequence.

Real tensors can come from an ``.npz`` (``--inputs``), loaded with ``allow_pickle=False``; each
array must be named after a model input and match its dtype, rank and fixed dims. Inputs the
file does not hold are generated, with named dims taken from the supplied arrays first.

Values (deterministic for a given ``seed``; each input has its own generator, so adding an input
never changes another's values):

- an integer input that reaches the indices of a ``Gather`` on a weight table (directly or
  through Cast/Unsqueeze/Squeeze/Reshape/Flatten/Identity/Expand) gets values in ``[0, rows)``;
  ``input_ids``-like inputs (``*ids``, ``*token*``) with no table found get ``[0, 100)``;
- ``attention_mask``/``*mask*`` ones; ``position_ids`` past…past+seq−1; ``token_type_ids``,
  ``segment_ids`` and ``past_*``/``*cache*``/``past_key_values.*`` zeros; bool inputs False;
- scalars (rank 0): a sample rate (``sr``, ``sample_rate``, ``sampling_rate``) = 16000, any other
  number 1;
- other integer tensors: a ``*len*``/``*length*`` input holds the longest non-batch dim of the
  other inputs (a sequence length), ``uint8`` uniform in [0, 256) (images), the rest zeros;
- floating-point tensors: standard normal, in the declared precision.

An input whose size exceeds ``max_bytes`` is refused before anything is allocated.

Decoding after a real prompt (``--inputs`` holding ``input_ids`` and no past, or a past of
length 0) runs the prompt through the model once, in this process: its ``present.N.*`` outputs
become the past and the argmax of its last logits the new token, so the decode step is timed on
the cache a user's generation loop would hand it.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.model.graph import TensorInfo, input_specs
from opstudio.core.model.phases import (
    DEFAULT_SEQ,
    KvLayout,
    cache_zeros,
    derive_dims,
    is_past_length_name,
    is_prompt,
    kv_layout,
)
from opstudio.core.model.tensor_groups import name_list

DEFAULT_BATCH = 1
DEFAULT_PAST = 0
SAMPLE_RATE = 16000
DEFAULT_ID_RANGE = 100

_BATCH_NAMES = {"batch", "batch_size", "batchsize", "n", "b", "bs", "num_batches"}
_SEQ_NAMES = {"seq", "sequence", "seq_len", "seqlen", "sequence_length", "tokens", "num_tokens",
              "t", "token", "seq_length", "sequence_len"}
_PASS_THROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand"}


class NeedsInputs(OpstudioError):
    """The model's inputs cannot be made without more from the user (a dim's value, a shape,
    real tensors): ``why`` says what is missing, ``remedy`` the flag that supplies it. Work
    that only needs the inputs to measure (the accuracy after optimizing) goes on without
    them."""

    def __init__(self, why: str, remedy: str) -> None:
        super().__init__(f"{why}: {remedy}")
        self.why, self.remedy = why, remedy


@dataclass(frozen=True)
class ResolvedInput:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    notes: tuple[str, ...] = field(default=())  # how defaulted dims were chosen

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def numpy_dtype(spec_dtype: str | None, input_name: str) -> np.dtype:
    if spec_dtype is None:
        raise NeedsInputs(f"input '{input_name}' declares no element type",
                          "pass real values with --inputs")
    if spec_dtype == "string":
        raise NeedsInputs(f"input '{input_name}' is a string tensor",
                          "pass real values with --inputs")
    if spec_dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(spec_dtype)
    except TypeError:
        raise NeedsInputs(
            f"input '{input_name}' has element type {spec_dtype}, which opstudio cannot "
            "generate", "pass real values with --inputs") from None


def default_dim(dim_name: str, dims: Mapping[str, int]) -> tuple[int | None, str]:
    """The documented default for a named dim (None if there is none) and why."""
    low = dim_name.lower()
    if "+" in dim_name:  # e.g. optimum's "past_sequence_length + sequence_length"
        total = 0
        for part in (p.strip() for p in dim_name.split("+")):
            value = int(part) if part.isdigit() else (
                dims[part] if part in dims else default_dim(part, dims)[0])
            if value is None:
                return None, ""
            total += value
        return total, f"{dim_name}={total} (sum)"
    if low in _BATCH_NAMES or "batch" in low:
        return DEFAULT_BATCH, f"{dim_name}={DEFAULT_BATCH} (batch)"
    if is_past_length_name(dim_name):
        return DEFAULT_PAST, f"{dim_name}={DEFAULT_PAST} (past length)"
    if "past" in low or "cache" in low:
        return None, ""  # a size of the cached vectors (kv_cache_dim): derived, never guessed
    if "total" in low and ("seq" in low or "len" in low):
        past = next((v for k, v in dims.items() if is_past_length_name(k)), DEFAULT_PAST)
        seq = next((v for k, v in dims.items() if _is_seq_name(k)), DEFAULT_SEQ)
        return past + seq, f"{dim_name}={past + seq} (past + sequence)"
    if _is_seq_name(dim_name):
        return DEFAULT_SEQ, f"{dim_name}={DEFAULT_SEQ} (sequence)"
    return None, ""


def _is_seq_name(name: str) -> bool:
    low = name.lower()
    if "past" in low or "total" in low:
        return False
    return (low in _SEQ_NAMES or "seq" in low or "token" in low
            or low.endswith(("_len", "_length")))


_AUTO_DIM = re.compile(r"^(\?|-1|none|unk__\d+|unknown.*|p2o\.dynamicdimension\.\d+|"
                       r"dynamicdimension.*|dim_?\d+|d\d+|s\d+|[a-z]*_dynamic_axes_\d+)$")


def is_auto_dim_name(name: str) -> bool:
    """Names exporters make up for a dim they know nothing about (``unk__12``,
    ``p2o.DynamicDimension.0``, ``?``): treated like unnamed dims."""
    return bool(_AUTO_DIM.match(name.strip().lower()))


def _example_shape(shape: list, name_for_unknown: str = "N") -> str:
    out = []
    for d in shape:
        out.append(str(d) if isinstance(d, int) and d >= 0 else name_for_unknown)
    return ",".join(out)


def _resolve_one(spec: TensorInfo, dims: Mapping[str, int],
                 shapes: Mapping[str, list[int]]) -> ResolvedInput:
    dtype = numpy_dtype(spec.dtype, spec.name)
    declared = spec.shape
    if spec.name in shapes:
        given = [int(d) for d in shapes[spec.name]]
        if declared is not None:
            if len(given) != len(declared):
                raise OpstudioError(
                    f"--shape {spec.name}: gives {len(given)} dims, the model declares "
                    f"{len(declared)} ([{_example_shape(declared, '?')}])")
            for i, (g, d) in enumerate(zip(given, declared)):
                if isinstance(d, int) and d > 0 and g != d:
                    raise OpstudioError(
                        f"--shape {spec.name}: dim {i} is fixed at {d} in the model, not {g}")
        return ResolvedInput(spec.name, dtype, tuple(given), ("from --shape",))
    if declared is None:
        raise NeedsInputs(f"input '{spec.name}' declares no shape",
                          f"pass --shape {spec.name}=D0,D1,...")
    out: list[int] = []
    notes: list[str] = []
    for i, d in enumerate(declared):
        if isinstance(d, int) and d >= 0:
            out.append(d)
            continue
        if isinstance(d, str) and d in dims:
            out.append(int(dims[d]))
            continue
        if isinstance(d, str) and d and not is_auto_dim_name(d):
            value, why = default_dim(d, dims)
            if value is not None:
                out.append(value)
                notes.append(why)
                continue
            example = _example_shape([*out, *declared[i:]])
            raise NeedsInputs(f"input '{spec.name}' dim {i} ('{d}') is unknown",
                              f"pass --dim {d}=N or --shape {spec.name}={example}")
        if i == 0:
            out.append(DEFAULT_BATCH)
            notes.append(f"dim 0={DEFAULT_BATCH} (batch)")
            continue
        example = _example_shape([*out, *declared[i:]])
        label = f"unnamed, '{d}'" if isinstance(d, str) and d else "unnamed"
        raise NeedsInputs(f"input '{spec.name}' dim {i} ({label}) is unknown",
                          f"pass --shape {spec.name}={example}")
    return ResolvedInput(spec.name, dtype, tuple(out), tuple(notes))


def resolve_input_specs(model: onnx.ModelProto, dims: Mapping[str, int] | None = None,
                        shapes: Mapping[str, list[int]] | None = None, *,
                        phase: str | None = None, past: int | None = None,
                        model_path: str | Path | None = None) -> list[ResolvedInput]:
    """Concrete dtype and shape of every model input (see the module docstring for the rules)."""
    dims, _ = derive_dims(model, dict(dims or {}), phase=phase, past=past, model_path=model_path)
    shapes = dict(shapes or {})
    specs = input_specs(model)
    known = {s.name for s in specs}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise OpstudioError(
            f"--shape {unknown[0]}: the model has no input of that name "
            f"(inputs: {name_list(s.name for s in specs)})")
    return [_resolve_one(spec, dims, shapes) for spec in specs]


def decode_step_dims(model: onnx.ModelProto,
                     model_path: str | Path | None = None) -> dict[str, int] | None:
    """Every named input dim of one decode step at the default past
    (``phases.DEFAULT_DECODE_PAST``), as a run with ``--phase decode`` would choose them: what
    a decoder with a KV cache is shown at when no dims are given. None for a model without a
    KV cache, or whose dims cannot all be derived."""
    if not kv_layout(model).has_cache:
        return None
    try:
        return run_dims(model, phase="decode", model_path=model_path)
    except OpstudioError:
        return None


def run_dims(model: onnx.ModelProto, dims: Mapping[str, int] | None = None, *,
             phase: str | None = None, past: int | None = None,
             model_path: str | Path | None = None) -> dict[str, int]:
    """Every named input dim as a run with these settings sizes it (the rules of
    ``resolve_input_specs``, whose errors it raises)."""
    resolved = resolve_input_specs(model, dims, phase=phase, past=past, model_path=model_path)
    out: dict[str, int] = {}
    for spec, r in zip(input_specs(model), resolved, strict=True):
        for d, size in zip(spec.shape or [], r.shape, strict=False):
            if isinstance(d, str):
                out.setdefault(d, int(size))
    return out


def make_inputs(model: onnx.ModelProto, dims: Mapping[str, int] | None = None,
                shapes: Mapping[str, list[int]] | None = None,
                npz_path: str | Path | None = None, seed: int = 0,
                max_bytes: int = 2**31, *, phase: str | None = None, past: int | None = None,
                model_path: str | Path | None = None) -> dict[str, np.ndarray]:
    """One array per model input, in the model's input order.

    ``phase``/``past`` choose the step of a KV-cache decoder to run (``opstudio.core.model.phases``);
    ``model_path`` lets the KV geometry be read from a ``genai_config.json`` beside the model
    and lets a decode after a prompt in ``npz_path`` run the prompt first."""
    supplied = load_npz(model, npz_path) if npz_path is not None else {}
    if phase == "decode" and supplied and is_prompt(model, supplied):
        return decode_after_prompt(model, supplied, model_path=model_path, dims=dict(dims or {}),
                                   shapes=dict(shapes or {}), seed=seed, max_bytes=max_bytes,
                                   past=past)
    return build_inputs(model, dims, shapes, supplied, seed, max_bytes, phase=phase, past=past,
                        model_path=model_path)


def build_inputs(model: onnx.ModelProto, dims: Mapping[str, int] | None,
                 shapes: Mapping[str, list[int]] | None, supplied: Mapping[str, np.ndarray],
                 seed: int = 0, max_bytes: int = 2**31, *, phase: str | None = None,
                 past: int | None = None,
                 model_path: str | Path | None = None) -> dict[str, np.ndarray]:
    """``make_inputs`` on arrays already loaded: ``supplied`` are used as they are."""
    dims = dict(dims or {})
    shapes = dict(shapes or {})
    specs = input_specs(model)
    supplied = dict(supplied)
    if supplied:
        # Named dims seen in the real tensors size the inputs still to generate.
        for spec in specs:
            arr = supplied.get(spec.name)
            if arr is None or spec.shape is None:
                continue
            for d, n in zip(spec.shape, arr.shape):
                if isinstance(d, str) and d:
                    dims.setdefault(d, int(n))
    todo = [s for s in specs if s.name not in supplied]
    unknown = sorted(set(shapes) - {s.name for s in specs})
    if unknown:
        raise OpstudioError(
            f"--shape {unknown[0]}: the model has no input of that name "
            f"(inputs: {name_list(s.name for s in specs)})")
    if todo:
        dims, _ = derive_dims(model, dims, phase=phase, past=past, model_path=model_path)
    resolved = [_resolve_one(spec, dims, shapes) for spec in todo]
    total = 0
    for r in resolved:
        if r.nbytes > max_bytes:
            raise OpstudioError(
                f"input '{r.name}' would take {_gib(r.nbytes)} ({r.dtype.name} "
                f"[{','.join(map(str, r.shape))}]), over the {_gib(max_bytes)} limit; "
                "choose smaller --dim/--shape values")
        total += r.nbytes
    if total > max_bytes:
        raise OpstudioError(
            f"the generated inputs would take {_gib(total)} together, over the "
            f"{_gib(max_bytes)} limit; choose smaller --dim/--shape values")
    bounds = index_bounds(model)
    seq_guess = max((d for r in resolved for d in r.shape[1:]), default=DEFAULT_SEQ)
    layout = kv_layout(model)
    # New tokens sit after the past: their positions count on from its length.
    kv_shapes = [r.shape for r in resolved if r.name in {s.name for s in layout.kv_inputs}]
    kv_shapes += [supplied[s.name].shape for s in layout.kv_inputs if s.name in supplied]
    offset = int(kv_shapes[0][-2]) if kv_shapes else 0
    generated = {r.name: _values(r, seed, bounds.get(r.name), seq_guess, offset)
                 for r in resolved}
    return {s.name: supplied[s.name] if s.name in supplied else generated[s.name] for s in specs}


def load_npz(model: onnx.ModelProto, npz_path: str | Path) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz``, checked against the model's inputs."""
    p = Path(npz_path)
    if not p.is_file():
        raise OpstudioError(f"{p}: no such file")
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as exc:
        raise OpstudioError(f"{p}: cannot read as .npz ({_first_line(exc)})") from None
    except (OSError, EOFError) as exc:
        raise OpstudioError(f"{p}: not a valid .npz file ({_first_line(exc)})") from None
    if not isinstance(arrays, dict):
        raise OpstudioError(f"{p}: expected an .npz archive of named arrays")
    specs = {s.name: s for s in input_specs(model)}
    for name, arr in arrays.items():
        spec = specs.get(name)
        if spec is None:
            raise OpstudioError(
                f"{p}: array '{name}' is not an input of the model "
                f"(inputs: {name_list(specs)})")
        want = numpy_dtype(spec.dtype, name)
        if arr.dtype != want:
            raise OpstudioError(
                f"{p}: input '{name}' is {arr.dtype.name}, the model expects {want.name}")
        if spec.shape is not None:
            if arr.ndim != len(spec.shape):
                raise OpstudioError(
                    f"{p}: input '{name}' has {arr.ndim} dims, the model expects "
                    f"{len(spec.shape)} ([{_example_shape(spec.shape, '?')}])")
            for i, (d, n) in enumerate(zip(spec.shape, arr.shape)):
                if isinstance(d, int) and d > 0 and d != n:
                    raise OpstudioError(
                        f"{p}: input '{name}' dim {i} is {n}, the model fixes it at {d}")
    return arrays


def index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Graph input -> rows of the smallest weight table it indexes through a Gather."""
    graph = model.graph
    tables: dict[str, list[int]] = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tables[node.output[0]] = list(attr.t.dims)
    # A table stored in fp16 and cast to float (or transposed, for a tied lm_head) is still
    # the table the ids index.
    for node in graph.node:
        if node.input and node.output and node.input[0] in tables:
            dims = tables[node.input[0]]
            if node.op_type in ("Cast", "Identity", "DequantizeLinear"):
                tables[node.output[0]] = dims
            elif node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"),
                            list(range(len(dims)))[::-1])
                if sorted(perm) == list(range(len(dims))):
                    tables[node.output[0]] = [dims[p] for p in perm]
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            if i:
                users.setdefault(i, []).append(node)
    bounds: dict[str, int] = {}
    inits = {t.name for t in graph.initializer}
    for vi in graph.input:
        if vi.name in inits:
            continue
        best: int | None = None
        frontier, seen = [vi.name], {vi.name}
        while frontier:
            tensor = frontier.pop()
            for node in users.get(tensor, []):
                if node.op_type in _PASS_THROUGH and node.input and node.input[0] == tensor:
                    for o in node.output:
                        if o and o not in seen:
                            seen.add(o)
                            frontier.append(o)
                elif (node.op_type == "Gather" and len(node.input) > 1
                      and node.input[1] == tensor and node.input[0] in tables):
                    shape = tables[node.input[0]]
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if shape and -len(shape) <= axis < len(shape) and shape[axis] > 0:
                        rows = int(shape[axis])
                        best = rows if best is None else min(best, rows)
        if best is not None:
            bounds[vi.name] = best
    return bounds


def _values(r: ResolvedInput, seed: int, bound: int | None, seq_guess: int,
            past: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(r.name.encode("utf-8"))])
    low = r.name.lower()
    words = set(re.split(r"[^a-z0-9]+", low))
    shape, dtype = r.shape, r.dtype
    if dtype == np.bool_:
        return np.zeros(shape, dtype=np.bool_)
    is_int = np.issubdtype(dtype, np.integer)
    if "past" in low or "cache" in low:
        return cache_zeros(shape, dtype) if len(shape) >= 4 else np.zeros(shape, dtype=dtype)
    if "token_type" in low or "segment" in low:
        return np.zeros(shape, dtype=dtype)
    if "mask" in low:
        return np.ones(shape, dtype=dtype)
    if "position_ids" in low or low in ("position", "positions", "pos_ids"):
        if not shape:
            return np.zeros(shape, dtype=dtype)
        return np.ascontiguousarray(
            np.broadcast_to(past + np.arange(shape[-1]), shape).astype(dtype))
    if not shape:  # scalars
        if words & {"sr", "sample_rate", "samplerate", "sampling_rate"} or "sample_rate" in low \
                or "sampling_rate" in low:
            return np.array(SAMPLE_RATE, dtype=dtype)
        return np.array(1, dtype=dtype)
    if is_int:
        if bound is not None:
            return rng.integers(0, bound, size=shape).astype(dtype)
        if low.endswith("ids") or "token" in low or "input_id" in low:
            return rng.integers(0, DEFAULT_ID_RANGE, size=shape).astype(dtype)
        if "len" in low:
            return np.full(shape, seq_guess, dtype=dtype)
        if dtype == np.uint8:
            return rng.integers(0, 256, size=shape).astype(dtype)
        return np.zeros(shape, dtype=dtype)
    if np.issubdtype(dtype, np.complexfloating):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def _gib(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n} bytes"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Decode after a real prompt


def decode_after_prompt(model: onnx.ModelProto, prompt: Mapping[str, np.ndarray], *,
                        model_path: str | Path | None, dims: Mapping[str, int],
                        shapes: Mapping[str, list[int]], seed: int, max_bytes: int,
                        past: int | None = None) -> dict[str, np.ndarray]:
    """Inputs of the decode step that follows ``prompt``: a prefill run gives the past (its
    ``present.*`` outputs) and the new token (the argmax of its last logits)."""
    from opstudio.core.measure.accuracy import run_outputs
    from opstudio.core.measure.inputs import build_inputs

    layout = kv_layout(model)
    ids_name = layout.ids_input
    assert ids_name is not None
    ids = prompt[ids_name]
    length = int(ids.shape[1])
    if length < 1:
        raise OpstudioError(f"--inputs: '{ids_name}' holds no tokens; a prompt needs at least one")
    if past is not None and past != length:
        raise OpstudioError(f"--past {past}: with a prompt in --inputs the past is the prompt "
                            f"itself ({length} tokens); leave out --past")
    source = _runnable(model, model_path)
    prefill = build_inputs(model, dims, shapes, dict(prompt), seed, max_bytes,
                           phase="prefill", model_path=model_path)
    outputs = run_outputs(source, prefill, threads=0)
    logits = logits_output(outputs)
    presents = present_outputs(layout, outputs)

    fixed = {k: v for k, v in dims.items() if k not in layout.past and k not in layout.seq
             and k not in layout.total}
    feeds = build_inputs(model, fixed, shapes, {}, seed, max_bytes, phase="decode",
                         past=length, model_path=model_path)
    feeds[ids_name] = logits[:, -1, :].argmax(axis=-1).reshape(-1, 1).astype(ids.dtype)
    for name, value in presents.items():
        feeds[name] = value.astype(feeds[name].dtype, copy=False)
    mask_name = next((n for n in feeds if "mask" in n.lower()), None)
    mask = prompt.get(mask_name) if mask_name else None
    if mask is not None and mask_name is not None:
        ones = np.ones((mask.shape[0], 1), dtype=mask.dtype)
        feeds[mask_name] = np.concatenate([mask, ones], axis=1)
        for name in feeds:
            if "position_ids" in name.lower():
                # HF counts positions over the unmasked tokens: the new one is the count so far
                pos = mask.astype(np.int64).sum(axis=1, keepdims=True)
                feeds[name] = pos.astype(feeds[name].dtype)
    return feeds


def _runnable(model: onnx.ModelProto, model_path: str | Path | None) -> onnx.ModelProto | str:
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if model_path is not None and Path(model_path).is_file():
        return str(model_path)
    if external:
        raise OpstudioError("decoding after a prompt runs the prompt through the model first, "
                            "which needs the model file with its weights")
    return model


def logits_output(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    value: np.ndarray | None
    if "logits" in outputs:
        value = outputs["logits"]
    else:
        value = next((v for k, v in outputs.items()
                      if "present" not in k.lower() and np.ndim(v) == 3), None)
    if value is None or np.ndim(value) != 3:
        raise OpstudioError("decoding after a prompt needs the model's logits "
                            "[batch, sequence, vocabulary] to pick the next token; "
                            "no output of that shape was found")
    return np.asarray(value)


def present_outputs(layout: KvLayout, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each past input's value: the output of the prefill that continues it."""
    present_names = [k for k in outputs if "present" in k.lower()]
    found: dict[str, np.ndarray] = {}
    for i, spec in enumerate(layout.kv_inputs):
        name = spec.name
        candidates = [name.replace("past_key_values", "present"),
                      name.replace("past_key_values", "present_key_values"),
                      name.replace("past", "present")]
        hit = next((c for c in candidates if c in outputs and c != name), None)
        if hit is None and len(present_names) == len(layout.kv_inputs):
            hit = present_names[i]  # same order, as exporters write them
        if hit is None:
            raise OpstudioError(f"decoding after a prompt: no output of the model continues "
                                f"'{name}' (looked for {candidates[0]!r})")
        found[name] = np.asarray(outputs[hit])
    return found
