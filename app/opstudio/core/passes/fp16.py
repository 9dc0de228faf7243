"""The chosen nodes in float16, with casts at their borders.

Through onnxruntime's float16 converter (``convert_float_to_float16``) with every other node in
``node_block_list`` and the model's inputs/outputs kept float32. The converter surrounds each
blocked node with a float16→float32 cast before and a float32→float16 cast after, even between
two blocked nodes; those round trips would round float32 values that were never meant to change,
so they are removed again and only the casts at the borders of the chosen nodes stay.

Before converting, each chosen node's constants are checked: a value beyond float16's range
(|x| > 65504) would be clamped — a BatchNorm variance of 1e8 clamped that way ruins a model —
and a tensor that loses more than 1% of its magnitude to rounding/underflow is refused too.

onnxruntime's CPU provider has float16 kernels for few compute ops (LayerNormalization, Transpose,
data movement); for the rest (MatMul, Conv, Gemm, Add, Relu, Softmax, …) it inserts casts back to
float32 itself, so the node still runs, with float16 rounding and extra casts but no speed-up. The
pass says so per node (``cpu_fp16_kernel``) instead of refusing.

A model whose weights stay in their files (``load_model(lazy=True)``) goes through the same
converter as it is: a weight it leaves in its file has no data in the proto, so the converter
only retypes it. Each weight it retyped is then cast tensor by tensor, band by band, as the
converter's ``convert_np_to_float16`` casts (elementwise: the same bytes, tested against it),
into a scratch file (``_stream``); the range check reads a weight in bands too.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx

from opstudio.core.model.graph_utils import nodes_by_name, topo_sort
from opstudio.core.model.model_io import is_lazy_tensor
from opstudio.core.passes import _ort_support as ort_support
from opstudio.core.passes import _stream as stream
from opstudio.core.passes._quiet_ort import quiet_onnxruntime_logs
from opstudio.core.passes._weights import (
    append_initializer,
    declare_initializers,
    undeclare_initializers,
)
from opstudio.core.passes.base import Pass, PassContext, PassResult, ScanParams

FP16_MAX = 65504.0
FP16_MIN_POSITIVE = 5.96e-08
MAX_REL_ERROR = 1e-2


@functools.lru_cache(maxsize=1)
def cpu_fp16_ops() -> frozenset[tuple[str, str]]:
    """(domain, op type) pairs with a float16 kernel in onnxruntime's CPU provider."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        defs = ort_c.get_all_opkernel_def()
    except (ImportError, AttributeError):
        return frozenset()
    found = set()
    for kernel in defs:
        if kernel.provider != "CPUExecutionProvider":
            continue
        if any("tensor(float16)" in types for types in kernel.type_constraints.values()):
            found.add(("" if kernel.domain == "ai.onnx" else kernel.domain, kernel.op_name))
    return frozenset(found)


class Fp16Pass(Pass):
    technique = "fp16"
    plan_order = 30
    helps_when = "memory"
    because = "FP16 halves the bytes read where the CPU has FP16 kernels"
    colour = "#c0392b"
    scan_params: ClassVar[ScanParams | None] = {}
    label = "FP16"
    description = "run the chosen nodes in float16 with casts at their borders"
    params = ()

    def reads_lazy(self, params: Mapping[str, Any]) -> bool:
        return True

    def check(self, model: onnx.ModelProto, node: onnx.NodeProto,
              params: Mapping[str, Any] | None = None) -> str | None:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

        if node.domain not in ("", "ai.onnx"):
            return f"{node.domain}:{node.op_type} is not a standard ONNX op"
        if node.op_type in DEFAULT_OP_BLOCK_LIST:
            return f"onnxruntime's float16 converter keeps {node.op_type} in float32"
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            return f"{node.op_type} holds subgraphs; choose the nodes inside instead"
        tensors = list(node.input)
        if node.op_type == "Constant":
            tensors = list(node.output)
        for name in dict.fromkeys(t for t in tensors if t):
            value, _ = ort_support.constant_value(model, name)
            if value is None or value.dtype != np.float32 or value.size == 0:
                continue
            reason = range_problem(value)
            if reason:
                return f"constant '{name}' {reason}"
        return None

    def _rewrite(self, work: onnx.ModelProto, chosen: Sequence[str], params: Mapping[str, Any],
                 ctx: PassContext) -> PassResult:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        skipped: dict[str, str] = {}
        by_name = nodes_by_name(work.graph)
        ctx.report(0.1, f"fp16: converting {len(chosen)} node(s)")
        ctx.check_cancelled()
        notes: list[str] = []
        # weights in Constant nodes (Paddle exports) would stay float32 behind a Cast
        folded = ort_support.fold_constant_inputs(work, chosen)
        if folded:
            notes.append(f"made {len(folded)} constant weight(s) initializers "
                         "(from Constant nodes or chains of constant ops: ConstantOfShape, Cast, "
                         "Transpose, DequantizeLinear…)")
        _unshare_initializers(work, chosen)
        declared = undeclare_initializers(work)
        before = ort_support.shape_only_copy(work)  # names, shapes, dims: no weight data
        chosen_set = set(chosen)
        blocked = [n.name for n in work.graph.node if n.name not in chosen_set]
        typed = _annotate_types(work)
        with quiet_onnxruntime_logs(), _shapes_from_dims(), ort_support.ort_rewriter(
                "onnxruntime's float16 converter",
                "leave these nodes out of the step (choose nodes by name or name_pattern)"):
            result = convert_float_to_float16(typed or work, keep_io_types=True,
                                              node_block_list=blocked,
                                              max_finite_val=FP16_MAX,
                                              min_positive_val=FP16_MIN_POSITIVE,
                                              disable_shape_infer=typed is not None)
        _cast_lazy_weights(result, before, ctx)
        _remove_round_trips(result, set(by_name))
        _restore_value_info(before, result, chosen_set)
        declare_initializers(result, declared)
        topo_sort(result.graph)
        types = _elem_types(result)
        converted = {n.name for n in result.graph.node
                     if any(types.get(o) == onnx.TensorProto.FLOAT16 for o in n.output)}
        applied = [n for n in chosen if n in converted]
        for name in chosen:
            if name not in applied:
                skipped[name] = "has no float32 output to convert"
        created = ort_support.record_provenance(before, result, applied)
        details: dict[str, dict[str, Any]] = {}
        kernels = cpu_fp16_ops()
        slow: list[str] = []
        bytes_by_node = ort_support.weight_bytes(before, result, created, applied)
        for name in applied:
            op = by_name[name].op_type
            has_kernel = ("", op) in kernels if kernels else None
            casts = sum(1 for n, owners in created.items() if name in owners)
            details[name] = {**bytes_by_node[name], "casts": casts, "cpu_fp16_kernel": has_kernel}
            if has_kernel is False:
                slow.append(op)
        if slow:
            notes.append("onnxruntime's CPU provider has no float16 kernel for "
                         f"{', '.join(sorted(set(slow)))}: it casts back to float32 around them "
                         "(float16 rounding, extra casts, no speed-up on CPU)")
        return PassResult(model=result, applied=applied, skipped=skipped, details=details,
                          notes=notes)


@contextlib.contextmanager
def _shapes_from_dims() -> Iterator[None]:
    """The converter takes a converted weight's shape from its data (``numpy_helper.to_array``),
    which would read a weight left in its file; its dims say the same without reading it."""
    from onnxruntime.transformers import float16

    def value_info(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                  list(tensor.dims))

    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = value_info
    try:
        yield
    finally:
        float16.make_value_info_from_tensor = original


def _annotate_types(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The model with a type for every tensor, or ``None`` to let the converter infer them.

    The converter learns which tensors are float from onnx shape inference, which stops at
    contrib ops (MatMulNBits from an int4 step, fused exporter ops); onnxruntime's symbolic
    shape inference knows them.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):
        inferred = None
    if inferred is not None:
        g = inferred.graph
        known = {v.name for v in [*g.value_info, *g.input, *g.output]} \
            | {i.name for i in g.initializer}
        if all(o in known for n in g.node for o in n.output if o):
            return None  # onnx knows every type: the converter's own inference will do
    # symbolic inference is slow (sympy), so it is the fallback for what onnx cannot type
    try:
        with quiet_onnxruntime_logs():
            typed = SymbolicShapeInference.infer_shapes(model, auto_merge=True,
                                                        guess_output_rank=True)
    except Exception:  # its failures are many and untyped; onnx inference is the fallback
        return None
    if typed is None:
        return None
    outputs = {o.name for o in typed.graph.output}
    kept = [v for v in typed.graph.value_info if v.name not in outputs]
    del typed.graph.value_info[:]
    typed.graph.value_info.extend(kept)
    return typed


# elements of a weight checked at once: a memory-mapped 2 GB weight is never copied whole
_CHECK_ELEMENTS = 2**22


def range_problem(value: np.ndarray) -> str | None:
    """Why ``value`` cannot be stored as float16 without damage, or ``None``."""
    flat = value.reshape(-1)
    peak = square = lost = 0.0
    seen = False
    for k in range(0, flat.size, _CHECK_ELEMENTS):
        part = np.asarray(flat[k:k + _CHECK_ELEMENTS])
        finite = part[np.isfinite(part)].astype(np.float64)
        if finite.size == 0:
            continue
        seen = True
        peak = max(peak, float(np.abs(finite).max()))
        if peak > FP16_MAX:
            return f"has |value| up to {peak:.3g}, beyond float16's {FP16_MAX:g}"
        converted = np.clip(finite, -FP16_MAX, FP16_MAX).astype(np.float16).astype(np.float64)
        # sums, not np.linalg.norm: BLAS threads make thousands of small norms slow on a
        # busy CPU
        square += float(np.sum(np.square(finite)))
        lost += float(np.sum(np.square(converted - finite)))
    if not seen:
        return None
    norm = float(np.sqrt(square))
    if norm > 0:
        rel = float(np.sqrt(lost)) / norm
        if rel > MAX_REL_ERROR:
            return f"loses {rel:.1%} of its magnitude in float16 (values too small to represent)"
    return None


def to_float16(values: np.ndarray) -> np.ndarray:
    """``values`` (float32) as the converter's ``convert_np_to_float16`` stores them, without
    its debug statistics (which cost it several passes over the data): a magnitude strictly
    between 0 and ``FP16_MIN_POSITIVE`` becomes it, one beyond ``FP16_MAX`` becomes it, sign
    kept; zeros, infinities and NaNs stay as they are."""
    out = np.array(values, dtype=np.float32)
    size = np.abs(out)
    for mask, bound in (((size > 0) & (size < FP16_MIN_POSITIVE), FP16_MIN_POSITIVE),
                        ((size > FP16_MAX) & np.isfinite(size), FP16_MAX)):
        out[mask] = np.copysign(np.float32(bound), out[mask])
    return out.astype(np.float16)


def _cast_lazy_weights(result: onnx.ModelProto, before: onnx.ModelProto,
                       ctx: PassContext) -> None:
    """Cast the weights the converter retyped to float16 but left in their files (a lazily
    opened model), one tensor at a time into a scratch file."""
    was_float = {t.name for t in before.graph.initializer
                 if t.data_type == onnx.TensorProto.FLOAT}
    todo = [t for t in result.graph.initializer
            if t.name in was_float and t.data_type == onnx.TensorProto.FLOAT16
            and is_lazy_tensor(t)]

    def cast(tensor: onnx.TensorProto, scratch: stream.ScratchFile) -> None:
        start = scratch.begin()
        for band in stream.row_bands(stream.as_stored(tensor, onnx.TensorProto.FLOAT)):
            scratch.write(to_float16(band))
        tensor.CopyFrom(scratch.tensor(tensor.name, onnx.TensorProto.FLOAT16, tensor.dims,
                                       start))

    stream.rewrite_each(todo, lambda t: t.name, "casting", "fp16", ctx.workdir, cast,
                        ctx.report, ctx.check_cancelled, lo=0.2, hi=0.9)


def _unshare_initializers(model: onnx.ModelProto, chosen: Sequence[str]) -> None:
    """A float initializer used by chosen and other nodes gets a copy for the chosen ones.

    Otherwise the converter stores it once as float16 and casts it back for the other nodes,
    rounding weights of nodes nobody asked to change.
    """
    chosen_set = set(chosen)
    inits = {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    users: dict[str, set[bool]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits:
                users.setdefault(name, set()).add(node.name in chosen_set)
    shared = {name for name, kinds in users.items() if kinds == {True, False}}
    if not shared:
        return
    graph_outputs = {o.name for o in model.graph.output}
    for name in sorted(shared):
        if name in graph_outputs:
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = f"{name}_fp16"
        append_initializer(model, copy)
        for node in model.graph.node:
            if node.name in chosen_set:
                for k, inp in enumerate(node.input):
                    if inp == name:
                        node.input[k] = copy.name


def _cast_to(node: onnx.NodeProto) -> int | None:
    for attr in node.attribute:
        if attr.name == "to":
            return attr.i
    return None


def _remove_round_trips(model: onnx.ModelProto, original: set[str]) -> None:
    """Drop the converter's float32→float16→float32 cast pairs between non-chosen nodes.

    Untouched nodes keep their output names; the float16 copy made for a chosen consumer is
    called ``<name>_fp16`` (the converter does it the other way round). One pass over the graph
    with maps kept up to date: models have thousands of such pairs.
    """
    graph = model.graph
    nodes = list(graph.node)
    outputs = {o.name for o in graph.output}
    producer: dict[str, int] = {}
    users: dict[str, list[int]] = {}
    for k, node in enumerate(nodes):
        for name in node.output:
            producer[name] = k
        for name in node.input:
            if name:
                users.setdefault(name, []).append(k)
    removed: set[int] = set()
    rename: dict[str, str] = {}

    def is_new_cast(k: int, to: int) -> bool:
        return (k not in removed and nodes[k].op_type == "Cast"
                and nodes[k].name not in original and _cast_to(nodes[k]) == to)

    for k2, c2 in enumerate(nodes):
        if not is_new_cast(k2, onnx.TensorProto.FLOAT):
            continue
        k1 = producer.get(c2.input[0])
        if k1 is None or not is_new_cast(k1, onnx.TensorProto.FLOAT16):
            continue
        c1 = nodes[k1]
        source, middle, target = c1.input[0], c1.output[0], c2.output[0]
        middle_users = [u for u in users.get(middle, []) if u not in removed]
        if target in outputs:
            # the value must keep the graph output's name: the float32 source takes it
            if middle_users != [k2] or source not in producer or source in outputs:
                continue
            rename[source] = target
            removed.update((k1, k2))
            continue
        for u in users.get(target, []):
            user = nodes[u]
            for i, name in enumerate(user.input):
                if name == target:
                    user.input[i] = source
            users.setdefault(source, []).append(u)
        removed.add(k2)
        if middle_users == [k2] and middle not in outputs:
            removed.add(k1)
            if source == middle + "_cast_to_fp16":
                rename[source] = middle  # the untouched tensor's own name again

    taken = set(producer) | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for k, node in enumerate(nodes):
        if k in removed or not is_new_cast(k, onnx.TensorProto.FLOAT16):
            continue
        source, middle = node.input[0], node.output[0]
        if source != middle + "_cast_to_fp16" or middle + "_fp16" in taken or middle in outputs:
            continue
        rename[middle] = middle + "_fp16"
        rename[source] = middle
        taken.add(middle + "_fp16")

    kept = [nodes[k] for k in range(len(nodes)) if k not in removed]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for i, name in enumerate(node.output):
            if name in rename:
                node.output[i] = rename[name]
    for info in graph.value_info:
        if info.name in rename:
            info.name = rename[info.name]
    copies = []
    for node in kept:
        c = onnx.NodeProto()
        c.CopyFrom(node)
        copies.append(c)
    del graph.node[:]
    graph.node.extend(copies)


def _restore_value_info(before: onnx.ModelProto, after: onnx.ModelProto,
                        chosen: set[str]) -> None:
    """Type annotations: the original ones for tensors of untouched nodes, the converter's for
    tensors the conversion produced; stale entries dropped."""
    old = {v.name: v for v in before.graph.value_info}
    new = {v.name: v for v in after.graph.value_info}
    originals = {n.name for n in before.graph.node}
    produced: dict[str, onnx.NodeProto] = {o: n for n in after.graph.node for o in n.output}
    io = {v.name for v in after.graph.input} | {v.name for v in after.graph.output}
    keep: list[onnx.ValueInfoProto] = []
    for name, producer in produced.items():
        if name in io:
            continue
        if producer.name in originals and producer.name not in chosen:
            entry = old.get(name)
        else:
            entry = new.get(name)
        if entry is not None:
            keep.append(entry)
    copies = []
    for entry in keep:
        c = onnx.ValueInfoProto()
        c.CopyFrom(entry)
        copies.append(c)
    del after.graph.value_info[:]
    after.graph.value_info.extend(copies)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    out = {}
    for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]:
        out[v.name] = v.type.tensor_type.elem_type
    return out


PASS = Fp16Pass()
