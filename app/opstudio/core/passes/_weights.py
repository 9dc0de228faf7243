"""Constant weights as the rewriting passes see them.

A weight may be an initializer, a ``Constant`` node's output (Paddle exports keep every weight
there), a sparse constant, or computed from constants by a few pure ops (``ConstantOfShape``
fills in older exports, ``Unsqueeze`` of a BatchNorm scale…); :func:`constant_array` reads any
of them. Passes never edit a weight in place: they add a new tensor under a fresh name and let
:func:`remove_unused` drop the old one once nothing reads it, so a weight shared with a node the
pass did not touch stays intact.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from opstudio.core.model.graph_utils import consumers
from opstudio.core.model.model_io import tensor_array

_ONNX_DOMAINS = ("", "ai.onnx")


def unit_dims(model: onnx.ModelProto) -> dict[str, int]:
    """Every named input dim bound to 1, so FLOPs of a model with ``batch``/``seq`` dims are
    concrete (per sample / per position) instead of unknown."""
    from opstudio.core.model.graph import symbolic_dims

    return {name: 1 for name in symbolic_dims(model)}


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in _ONNX_DOMAINS), 0)


def sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dense = np.zeros(int(np.prod(sparse.dims)), dtype=values.dtype)
    if indices.ndim == 2:  # [NNZ, rank] coordinates
        indices = np.ravel_multi_index(tuple(indices.T), tuple(sparse.dims))
    dense[indices] = values
    return dense.reshape(tuple(sparse.dims))


# Ops that compute a constant from constants; exports often reshape or scale weights with them
# (``Unsqueeze`` of a BatchNorm scale, ``ConstantOfShape`` fills, gamma / sqrt(var + eps)).
# LLM exports store weights as fp16/bf16 + Cast, tie the lm_head to the embedding through a
# Transpose, or keep them quantized behind DequantizeLinear.
FOLDABLE = {"ConstantOfShape", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Cast",
            "Transpose", "Expand", "Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Neg",
            "DequantizeLinear"}
_FOLD_DEPTH = 6
# an LLM's tied vocabulary projection (151936 × 896) must fold; a ConstantOfShape of a
# billion elements must not
_FOLD_MAX_ELEMENTS = 256 * 2**20


class _Index:
    """Positions of initializers and producers by name, for checks run node after node.

    Positions, not messages: the cache must not keep a large model alive.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.key = _index_key(model)
        self.initializers = {i.name: k for k, i in enumerate(graph.initializer)}
        self.producers = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
        self.sparse = {i.values.name for i in graph.sparse_initializer}
        self.inputs = {i.name for i in graph.input}


def _index_key(model: onnx.ModelProto) -> tuple:
    graph = model.graph
    nodes, inits = graph.node, graph.initializer
    return (id(model), len(nodes), len(inits), len(graph.input),
            nodes[0].name if nodes else "", nodes[-1].name if nodes else "",
            inits[0].name if inits else "", inits[-1].name if inits else "")


_INDEX: list[_Index] = []
_INDEX_LOCK = threading.Lock()  # the app checks and applies passes on worker threads


def _index(model: onnx.ModelProto) -> _Index:
    """A cached index; rebuilt whenever the graph's size or ends change (any edit here does)."""
    key = _index_key(model)
    with _INDEX_LOCK:
        for entry in _INDEX:
            if entry.key == key:
                return entry
    entry = _Index(model)
    with _INDEX_LOCK:
        _INDEX.insert(0, entry)
        del _INDEX[4:]
    return entry


def _forget(index: _Index) -> None:
    with _INDEX_LOCK:
        if index in _INDEX:  # another thread may have dropped it already
            _INDEX.remove(index)


def _index_agrees(index: _Index, graph: onnx.GraphProto, tensor: str) -> bool:
    k = index.initializers.get(tensor)
    if k is not None and (k >= len(graph.initializer) or graph.initializer[k].name != tensor):
        return False
    k = index.producers.get(tensor)
    return k is None or (k < len(graph.node) and tensor in graph.node[k].output)


def tensor_index(model: onnx.ModelProto, tensor: str) -> _Index:
    """The cached index of ``model``, rebuilt when an in-place edit made it wrong about
    ``tensor``: lookups node after node cost a dict access, not a scan of the graph."""
    index = _index(model)
    known = (tensor in index.initializers or tensor in index.producers
             or tensor in index.sparse or tensor in index.inputs)
    # an edit that kept the graph's size and ends (a node swapped for one writing a new name)
    # leaves the index wrong or silent about ``tensor``: look again from scratch
    if not known or not _index_agrees(index, model.graph, tensor):
        _forget(index)
        index = _index(model)
    return index


def constant_array(model: onnx.ModelProto, tensor: str,
                   _depth: int = 0) -> tuple[np.ndarray | None, str | None]:
    """The value of ``tensor`` if it is a constant, else ``(None, reason in words)``.

    Besides initializers and ``Constant`` nodes, a tensor computed only from constants by a few
    pure ops (:data:`FOLDABLE`) counts as constant; onnx's reference evaluator computes it.
    """
    graph = model.graph
    index = tensor_index(model, tensor)
    k = index.initializers.get(tensor)
    if k is not None:
        return tensor_array(graph.initializer[k]), None
    if tensor in index.sparse:
        for sparse in graph.sparse_initializer:
            if sparse.values.name == tensor:
                return sparse_to_dense(sparse), None
    k = index.producers.get(tensor)
    if k is not None:
        node = graph.node[k]
        if node.op_type == "Constant" and node.domain in _ONNX_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    return tensor_array(attr.t), None
                if attr.name == "sparse_value" and attr.HasField("sparse_tensor"):
                    return sparse_to_dense(attr.sparse_tensor), None
            return None, f"the weight '{tensor}' is a scalar or list Constant, not a tensor"
        computed = (f"the weight '{tensor}' is computed at run time by {node.op_type} "
                    f"'{node.name}', not a constant")
        if (node.op_type not in FOLDABLE or node.domain not in _ONNX_DOMAINS
                or _depth >= _FOLD_DEPTH or len(node.output) != 1):
            return None, computed
        values: dict[str, np.ndarray] = {}
        for name in node.input:
            if not name:
                continue
            value, _ = constant_array(model, name, _depth + 1)
            if value is None:
                return None, computed
            values[name] = value
        folded = _evaluate(model, node, values)
        return (folded, None) if folded is not None else (None, computed)
    if tensor in index.inputs:
        return None, f"the weight '{tensor}' is a graph input, computed at run time, not a constant"
    return None, f"the weight '{tensor}' is not a constant"


def _evaluate(model: onnx.ModelProto, node: onnx.NodeProto,
              values: dict[str, np.ndarray]) -> np.ndarray | None:
    """``node``'s output from constant inputs, by onnx's reference evaluator (None if it fails)."""
    from onnx.reference import ReferenceEvaluator

    if node.op_type == "DequantizeLinear":
        # the reference evaluator implements it only from opset 19 on; exports use 10–13
        return _dequantize(node, [values.get(name) if name else None for name in node.input])
    direct = _numpy_fold(node, [values.get(name) if name else None for name in node.input])
    if direct is not None:
        return direct if direct.size <= _FOLD_MAX_ELEMENTS else None

    graph = helper.make_graph(
        [node], "fold", [], [helper.make_empty_tensor_value_info(node.output[0])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in values.items()])
    single = helper.make_model(graph, opset_imports=list(model.opset_import),
                               ir_version=model.ir_version)
    try:
        (out,) = ReferenceEvaluator(single).run(None, {})
    except Exception:  # the evaluator raises many types; an unfoldable node is not constant
        return None
    out = np.asarray(out)
    return out if out.size <= _FOLD_MAX_ELEMENTS else None


_FLOATS = (np.float16, np.float32, np.float64)


def _numpy_fold(node: onnx.NodeProto, args: list[np.ndarray | None]) -> np.ndarray | None:
    """Transpose, Cast between float types and Identity by numpy, in one copy: a tied
    embedding's table is the lm_head's weight transposed (0.9 GB in fp32 on a 1.5B model), and
    the reference evaluator would hold it four times over (proto, input, output, result).
    None for anything else."""
    if not args or args[0] is None:
        return None
    x = np.asarray(args[0])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Identity":
        return x
    if node.op_type == "Transpose":
        perm = attrs.get("perm")
        return np.ascontiguousarray(np.transpose(x, None if perm is None else list(perm)))
    if node.op_type == "Cast" and x.dtype.type in _FLOATS:
        to = np.dtype(helper.tensor_dtype_to_np_dtype(int(attrs["to"])))
        return x.astype(to) if to.type in _FLOATS else None
    return None


def _dequantize(node: onnx.NodeProto, args: list[np.ndarray | None]) -> np.ndarray | None:
    """``(x - zero_point) * scale``, per tensor, per axis or per block along ``axis``."""
    x, scale = args[0], args[1] if len(args) > 1 else None
    if x is None or scale is None:
        return None
    zero = args[2] if len(args) > 2 and args[2] is not None else np.zeros((), x.dtype)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis = int(attrs.get("axis", 1)) % max(x.ndim, 1)
    block = int(attrs.get("block_size", 0))
    out_type = np.asarray(scale).dtype
    scale, zero = np.asarray(scale, np.float32), np.asarray(zero)
    if scale.ndim and block:  # blocked: scale has x's shape with axis divided into blocks
        scale = np.repeat(scale, block, axis=axis).take(range(x.shape[axis]), axis=axis)
        zero = (np.repeat(zero, block, axis=axis).take(range(x.shape[axis]), axis=axis)
                if zero.ndim else zero)
    elif scale.ndim == 1:  # per axis
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = zero.reshape(shape) if zero.ndim == 1 else zero
    return ((x.astype(np.float32) - zero.astype(np.float32)) * scale).astype(out_type)


def all_names(graph: onnx.GraphProto) -> set[str]:
    names = {n.name for n in graph.node} | {i.name for i in graph.initializer}
    names |= {s.values.name for s in graph.sparse_initializer}
    names |= {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


FLOAT_TYPES = (np.float16, np.float32, np.float64)


def float_weight(model: onnx.ModelProto, node: onnx.NodeProto,
                 technique: str) -> np.ndarray | str:
    """The constant float weight (input 1) of a MatMul, Gemm or Conv, or why there is none."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or op not in ("MatMul", "Gemm", "Conv"):
        return f"{technique} handles MatMul, Gemm and Conv, not {op}"
    if len(node.input) < 2 or not node.input[1]:
        return f"{op} '{node.name}' has no weight input"
    weight, why = constant_array(model, node.input[1])
    if weight is None:
        return why or "its weight is not a constant"
    if weight.dtype.type not in FLOAT_TYPES:
        return f"its weight '{node.input[1]}' is {weight.dtype}, not a float tensor"
    return weight


def unique_name(taken: set[str], base: str) -> str:
    """``base`` or ``base_2``, ``base_3``… whichever is free; the result is marked taken."""
    name, k = base, 2
    while name in taken:
        name = f"{base}_{k}"
        k += 1
    taken.add(name)
    return name


def add_initializer(model: onnx.ModelProto, array: np.ndarray, name: str) -> None:
    # ascontiguousarray makes a scalar 1-D, and a [1] where a scalar was breaks shape arithmetic
    contiguous = np.ascontiguousarray(array).reshape(np.shape(array))
    append_initializer(model, numpy_helper.from_array(contiguous, name))


def append_initializer(model: onnx.ModelProto, tensor: onnx.TensorProto) -> None:
    """Add ``tensor`` to the model's initializers, declared as a graph input too when the
    model's IR version (before 4) requires every initializer to be one."""
    model.graph.initializer.append(tensor)
    if model.ir_version < 4:
        model.graph.input.append(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))


def undeclare_initializers(model: onnx.ModelProto) -> list[str]:
    """Before IR 4, drop the graph inputs that only declare an initializer (every one is),
    in place; returns the graph's input names as they were, for :func:`declare_initializers`.

    onnxruntime's float16 converter takes such an input for one the user feeds, and with
    ``keep_io_types`` leaves the weight float32 behind a Cast."""
    graph = model.graph
    order = [v.name for v in graph.input]
    if model.ir_version >= 4:  # there such an input is one the user may feed: it stays
        return order
    inits = {i.name for i in graph.initializer}
    kept = [v for v in graph.input if v.name not in inits]
    if len(kept) != len(graph.input):
        _set_inputs(graph, kept)
    return order


def declare_initializers(model: onnx.ModelProto, order: Iterable[str] = ()) -> list[str]:
    """Before IR 4 every initializer must also be a graph input: declare the ones onnxruntime's
    rewriters added without one (its quantizers and float16 converter ignore the rule), with
    the initializer's type and shape, and make the declared ones agree with their initializer
    (a weight converted to float16 or int8 changes type). Inputs named in ``order`` come first,
    in that order. Returns the names declared anew.

    Such an input stays an initializer for onnxruntime (``get_inputs`` does not list it), as
    the model's own weights already are in an IR 3 file."""
    if model.ir_version >= 4:
        return []
    graph = model.graph
    declared = {v.name: v for v in graph.input}
    added: list[str] = []
    for init in graph.initializer:
        info = helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
        old = declared.get(init.name)
        if old is None:
            graph.input.append(info)
            added.append(init.name)
        elif old.type != info.type:
            old.CopyFrom(info)
    rank = {name: k for k, name in enumerate(order)}
    if rank:
        _set_inputs(graph, sorted(graph.input, key=lambda v: rank.get(v.name, len(rank))))
    return added


def _set_inputs(graph: onnx.GraphProto, infos: list[onnx.ValueInfoProto]) -> None:
    """The graph's inputs replaced by ``infos`` (copied first: they may be its own entries)."""
    copies = [onnx.ValueInfoProto() for _ in infos]
    for copy, info in zip(copies, infos):
        copy.CopyFrom(info)
    del graph.input[:]
    graph.input.extend(copies)


def remove_unused(model: onnx.ModelProto, tensors: Iterable[str]) -> list[str]:
    """Drop the constants among ``tensors`` that no node or graph output reads any more.

    Initializers, sparse initializers and ``Constant`` nodes are removed (with their graph-input
    and value_info entries); a tensor something still reads is kept. Returns what was removed.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    removed: list[str] = []
    todo = [t for t in tensors if t]
    while todo:
        used = set(consumers(graph)) | outputs
        gone = {t for t in todo if t not in used}
        todo = []
        for init in [i for i in graph.initializer if i.name in gone]:
            removed.append(init.name)
            graph.initializer.remove(init)
        for sparse in [s for s in graph.sparse_initializer if s.values.name in gone]:
            removed.append(sparse.values.name)
            graph.sparse_initializer.remove(sparse)
        for node in [n for n in graph.node if (n.op_type == "Constant" or n.op_type in FOLDABLE)
                     and len(n.output) == 1 and n.output[0] in gone]:
            removed.append(node.output[0])
            todo.extend(node.input)  # what a folded node read may be unused now
            graph.node.remove(node)
    drop_value_info(graph, removed)
    for vi in [v for v in graph.input if v.name in set(removed)]:
        graph.input.remove(vi)
    return removed


def drop_value_info(graph: onnx.GraphProto, names: Iterable[str]) -> None:
    """Forget recorded shapes of ``names`` (stale shapes make the checker and ORT fail)."""
    names = set(names)
    for vi in [v for v in graph.value_info if v.name in names]:
        graph.value_info.remove(vi)


def replace_nodes(graph: onnx.GraphProto,
                  replacements: dict[str, list[onnx.NodeProto]]) -> None:
    """Put each node named in ``replacements`` back as its list of nodes, at the same place.

    The new nodes read what the old one read and write what it wrote, so the order stays
    topological.
    """
    rebuilt: list[onnx.NodeProto] = []
    for node in graph.node:
        for new in replacements.get(node.name, [node]):
            copy = onnx.NodeProto()
            copy.CopyFrom(new)
            rebuilt.append(copy)
    del graph.node[:]
    graph.node.extend(rebuilt)
