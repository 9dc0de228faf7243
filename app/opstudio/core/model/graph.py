"""The graph as opstudio sees it: nodes in topological order, edges, shapes, FLOPs and bytes.

Shapes come from ONNX shape inference with symbolic dims kept (``batch``, ``seq``); a dim that is
neither known nor named is ``None``. FLOPs count a multiply-add as 2 and are ``None`` whenever a
shape they need is unknown or symbolic; :func:`analyze` accepts ``dims`` to bind symbolic dims
(``{"batch": 1, "seq": 128}``) so the numbers can be made concrete for a chosen input size.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import time
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator

from opstudio.core.errors import Cancelled, GraphError
from opstudio.core.isolation import call_isolated
from opstudio.core.model.flops import node_bytes, node_flops
from opstudio.core.model.graph_utils import consumers, topological_order
from opstudio.core.model.tensors import Dim, Shape, TensorInfo, nbytes


@dataclass
class NodeInfo:
    index: int  # position in topological order
    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    output_shapes: list[Shape]
    attributes: dict[str, Any] = field(default_factory=dict)
    flops: int | None = None
    param_bytes: int = 0
    bytes_moved: int | None = None  # inputs read + outputs written, when all are known
    subgraph_nodes: int = 0  # nodes held by If/Loop/Scan bodies, recursively

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op_type": self.op_type,
            "domain": self.domain,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "output_shapes": [list(s) if s is not None else None for s in self.output_shapes],
            "flops": self.flops,
            "param_bytes": self.param_bytes,
            "bytes_moved": self.bytes_moved,
            "subgraph_nodes": self.subgraph_nodes,
        }


@dataclass
class GraphInfo:
    nodes: list[NodeInfo]
    edges: list[tuple[int, int, str]]  # (producer index, consumer index, tensor name)
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    tensors: dict[str, TensorInfo]
    opset: int
    ir_version: int
    producer: str
    shape_inference_error: str | None = None
    # bytes of each constant tensor (initializer or Constant node output), for totals that
    # count a weight once however many nodes read it
    constant_bytes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_name = {n.name: n for n in self.nodes}
        self._producer: dict[str, int] = {}
        self._consumers: dict[str, list[int]] = defaultdict(list)
        for n in self.nodes:
            for out in n.outputs:
                if out:
                    self._producer[out] = n.index
            for inp in dict.fromkeys(n.inputs):  # Add(a, a) consumes a once
                if inp:
                    self._consumers[inp].append(n.index)

    def node(self, name: str) -> NodeInfo:
        return self._by_name[name]

    def has_node(self, name: str) -> bool:
        return name in self._by_name

    def static_shape(self, tensor: str) -> list[int] | None:
        """The shape of ``tensor`` when every dim is a known number, else None."""
        found = self.tensors.get(tensor)
        dims = None if found is None else found.shape
        if dims is None:
            return None
        ints = [d for d in dims if isinstance(d, int)]
        return ints if len(ints) == len(dims) else None

    # (``producer`` is the field naming the exporting tool, so this one has its own name)
    def producer_of(self, tensor: str) -> NodeInfo | None:
        """The node that writes ``tensor``; None for graph inputs and initializers."""
        i = self._producer.get(tensor)
        return None if i is None else self.nodes[i]

    def consumers(self, tensor: str) -> list[NodeInfo]:
        return [self.nodes[i] for i in self._consumers.get(tensor, [])]

    def op_type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for n in self.nodes:
            counts[n.op_type] += 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def total_flops(self) -> int | None:
        """Sum of known FLOPs (nodes with unknown FLOPs are left out: see ``flops_unknown``)."""
        known = [n.flops for n in self.nodes if n.flops is not None]
        return sum(known) if known else None

    def flops_unknown(self) -> int:
        """How many nodes have no FLOP count (a shape they need is unknown or symbolic)."""
        return sum(1 for n in self.nodes if n.flops is None)

    def unbound_dims(self) -> list[str]:
        """Named input dims that were given no value, in first-seen order."""
        names: list[str] = []
        for t in self.inputs:
            names.extend(d for d in t.shape or [] if isinstance(d, str) and d not in names)
        return names

    def sums_need_every_node(self) -> bool:
        """Whether a sum of FLOPs or bytes over a group of nodes is unknown as soon as one of
        them is: with a dim unbound, the unknown nodes are the costly ones (the MatMuls over
        the sequence) and the rest (a Cast, a Gather) would add up to a misleading 0. With
        every dim bound, the unknown nodes are ops of unknown cost, left out as the total's
        "+ N operators of unknown cost" says."""
        return bool(self.unbound_dims())

    def total_param_bytes(self) -> int:
        """Bytes of the weights the nodes read, each tensor once however many nodes read it
        (a tied embedding, rotary caches shared by every attention node)."""
        if not self.constant_bytes:  # built without sizes: what the nodes say they read
            return sum(n.param_bytes for n in self.nodes)
        read = {x for n in self.nodes for x in n.inputs if x in self.constant_bytes}
        return sum(self.constant_bytes[x] for x in read)


def dtype_name(elem_type: int) -> str | None:
    if elem_type == onnx.TensorProto.UNDEFINED:
        return None
    try:
        name = onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return None
    return {"float": "float32", "double": "float64"}.get(name, name)


def _shape_from_type(tp: onnx.TypeProto) -> tuple[str | None, Shape]:
    if not tp.HasField("tensor_type"):
        return None, None
    tt = tp.tensor_type
    dtype = dtype_name(tt.elem_type)
    if not tt.HasField("shape"):
        return dtype, None
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dtype, dims


def _bind(shape: Shape, dims: Mapping[str, int]) -> Shape:
    if shape is None or not dims:
        return shape
    return [dims.get(d, d) if isinstance(d, str) else d for d in shape]


def count_subgraph_nodes(node: onnx.NodeProto) -> int:
    total = 0
    for attr in node.attribute:
        graphs = list(attr.graphs)
        if attr.HasField("g"):
            graphs.append(attr.g)
        for g in graphs:
            total += len(g.node)
            total += sum(count_subgraph_nodes(n) for n in g.node)
    return total


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in node.attribute:
        if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            continue
        if attr.type in (onnx.AttributeProto.TENSOR, onnx.AttributeProto.SPARSE_TENSOR):
            t = attr.t if attr.type == onnx.AttributeProto.TENSOR else attr.sparse_tensor.values
            out[attr.name] = f"<tensor {dtype_name(t.data_type)} {list(t.dims)}>"
            continue
        if attr.ref_attr_name:  # only meaningful inside a function body; keep the reference
            out[attr.name] = f"<ref {attr.ref_attr_name}>"
            continue
        try:
            value = helper.get_attribute_value(attr)
        except ValueError:  # an attribute whose type field matches none of its values
            out[attr.name] = "<malformed>"
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, list):
            value = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
        out[attr.name] = value
    return out


# Initializers bigger than this are handed to shape inference as dims + type only: inference needs
# the values of small shape tensors, never of weights, and skipping them keeps a model with
# gigabytes of weights from being serialised again (or hitting protobuf's 2 GiB limit).
_STUB_ABOVE_ELEMENTS = 4096
# Constant folding before inference only evaluates shape arithmetic: small in, small out.
_FOLD_MAX_ELEMENTS = 4096
# A fold can reveal a shape that lets the next layer's shape arithmetic fold in turn (a decoder
# computing its causal mask in every layer from the previous layer's sequence length): rounds
# go on while something folds, within these bounds.
_FOLD_ROUNDS = 64
_FOLD_BUDGET_S = 10.0
INFERENCE_TIMEOUT_S = 30.0
_FOLDABLE = {
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Min", "Max", "Mod", "Floor", "Ceil", "Sqrt",
    "Cast", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or",
    "Where", "Identity", "Concat", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose",
    "Slice", "Gather", "Shape", "Size", "Range", "ConstantOfShape", "Expand", "Tile", "ReduceProd",
    "ReduceSum", "ReduceMax", "ReduceMin", "CumSum", "Sign", "Split",
}


def infer_shapes(model: onnx.ModelProto, dims: Mapping[str, int] | None = None,
                 shapes: Mapping[str, Sequence[int]] | None = None,
                 ) -> tuple[onnx.ModelProto, str | None]:
    """Shape-inferred stand-in for ``model``: same tensor names, types and shapes (weights left out).

    ``dims`` / ``shapes`` make input dims concrete *before* inference, so computed shapes
    (``Range(0, seq)``, Pad amounts…) come out as numbers. Small constant subgraphs (shape
    arithmetic) are folded between rounds of inference so that shapes computed from constants
    resolve too. On failure returns the best model so far and the first line of the reason.
    """
    work = _inference_copy(model, dims or {}, shapes or {})
    error: str | None = None
    folded: set[str] = set()
    inferred = work
    deadline = time.monotonic() + _FOLD_BUDGET_S
    for _ in range(_FOLD_ROUNDS):
        try:
            # In a child process: onnx's C++ inference aborts the whole process on some hostile
            # attribute values (a huge kernel_shape trips an assertion) and can crawl for minutes.
            data = call_isolated(_infer_serialized, work.SerializeToString(),
                                 timeout=INFERENCE_TIMEOUT_S, label="onnx shape inference",
                                 task="inferring shapes")
            inferred = onnx.ModelProto()
            inferred.ParseFromString(data)
        except Cancelled:
            raise
        except Exception as exc:  # onnx raises many types here (InferenceError, ValueError, …)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            error = first[:300]
            break
        if _all_static(inferred) or time.monotonic() > deadline \
                or not _fold_constants(work, inferred, folded):
            break
    _merge_generated_dims(inferred, {d for d in _input_dim_names(model)})
    return inferred, error


def _all_static(model: onnx.ModelProto) -> bool:
    """Every tensor has a shape of numbers: folding more could not make one more concrete."""
    g = model.graph
    return all(_static_shape(vi) is not None for vi in
               (*g.input, *g.value_info, *g.output) if vi.type.HasField("tensor_type"))


def _infer_serialized(data: bytes) -> bytes:
    if multiprocessing.current_process().name == "opstudio-_infer_serialized":
        # our own child: an assertion onnx prints before aborting is not for the user's
        # terminal (the parent reports the crash in words)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    model = onnx.ModelProto()
    model.ParseFromString(data)
    return shape_inference.infer_shapes(model, check_type=False, strict_mode=False,
                                        data_prop=True).SerializeToString()


def _input_dim_names(model: onnx.ModelProto) -> list[str]:
    names: list[str] = []
    for vi in model.graph.input:
        _, shape = _shape_from_type(vi.type)
        names.extend(d for d in shape or [] if isinstance(d, str))
    return names


def _inference_copy(model: onnx.ModelProto, dims: Mapping[str, int],
                    shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.ir_version = model.ir_version
    copy.opset_import.extend(model.opset_import)
    copy.functions.extend(model.functions)
    src, g = model.graph, copy.graph
    g.name = src.name
    g.node.extend(src.node)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    for vi in list(g.output) + list(g.value_info):
        _drop_implausible_shape(vi)
    g.sparse_initializer.extend(src.sparse_initializer)
    for init in src.initializer:
        # integer tensors are kept whole: shape arithmetic (data propagation) may read them
        if (_numel_dims(init.dims) > _STUB_ABOVE_ELEMENTS
                and init.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)) \
                or external_data_helper.uses_external_data(init):
            g.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
        else:
            g.initializer.append(init)
    for vi in src.input:
        new = g.input.add()
        new.CopyFrom(vi)
        tt = new.type.tensor_type if new.type.HasField("tensor_type") else None
        if tt is None:
            continue
        if vi.name in shapes:
            tt.shape.Clear()
            for size in shapes[vi.name]:
                tt.shape.dim.add(dim_value=int(size))
        elif dims and tt.HasField("shape"):
            for d in tt.shape.dim:
                if d.HasField("dim_param") and d.dim_param in dims:
                    d.dim_value = int(dims[d.dim_param])
    return copy


def _drop_implausible_shape(vi: onnx.ValueInfoProto) -> None:
    """Forget a declared shape that would make data propagation crawl.

    onnx's data propagation walks vectors element by element and takes their length from the
    declared shape: a file claiming ``[2147483648]`` for a 1-D tensor stalls inference for
    minutes. Inference recomputes these shapes anyway, so the claim is dropped.
    """
    if not vi.type.HasField("tensor_type"):
        return
    tt = vi.type.tensor_type
    if tt.HasField("shape") and len(tt.shape.dim) <= 1 \
            and any(d.dim_value > _STUB_ABOVE_ELEMENTS for d in tt.shape.dim):
        tt.ClearField("shape")


def _numel_dims(dims: Sequence[int]) -> int:
    return math.prod(dims) if dims else 1


def _static_shape(vi: onnx.ValueInfoProto) -> list[int] | None:
    _, shape = _shape_from_type(vi.type)
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return shape  # type: ignore[return-value]


def _fold_constants(work: onnx.ModelProto, inferred: onnx.ModelProto, folded: set[str]) -> bool:
    """Replace small computable nodes of ``work`` by Constant nodes; True if any changed."""
    static: dict[str, list[int]] = {}
    # graph outputs too: a KV decoder's attention reads the shape of its present.N.key
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) \
            + list(inferred.graph.output):
        s = _static_shape(vi)
        if s is not None:
            static[vi.name] = s
    values: dict[str, np.ndarray] = {}
    for init in work.graph.initializer:
        static.setdefault(init.name, list(init.dims))
        if _numel_dims(init.dims) <= _FOLD_MAX_ELEMENTS \
                and not external_data_helper.uses_external_data(init):
            with contextlib.suppress(Exception):  # a malformed tensor is just not foldable
                values[init.name] = numpy_helper.to_array(init)
    try:
        order = topological_order(work.graph)
    except GraphError:
        return False
    opset = min(next((o.version for o in work.opset_import if o.domain in ("", "ai.onnx")), 0)
                or onnx.defs.onnx_opset_version(), onnx.defs.onnx_opset_version())
    replacements: dict[int, list[onnx.NodeProto]] = {}
    for i in order:
        node = work.graph.node[i]
        if node.domain not in ("", "ai.onnx") or not node.output or not node.output[0]:
            continue
        if node.op_type == "Constant":
            t = next((a.t for a in node.attribute
                      if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
            if t is not None and _numel_dims(t.dims) <= _FOLD_MAX_ELEMENTS:
                with contextlib.suppress(Exception):
                    values[node.output[0]] = numpy_helper.to_array(t)
            continue
        if node.op_type not in _FOLDABLE or node.name in folded:
            continue
        out = _evaluate(node, values, static, opset)
        if out is None:
            continue
        reps = []
        for k, (name, arr) in enumerate(zip(node.output, out)):
            if name:
                values[name] = arr
                static[name] = list(arr.shape)
                reps.append(helper.make_node("Constant", [], [name], name=f"{node.name}__folded{k}",
                                             value=numpy_helper.from_array(arr, name)))
        folded.add(node.name)
        replacements[i] = reps
    if not replacements:
        return False
    nodes = list(work.graph.node)
    del work.graph.node[:]
    for i, node in enumerate(nodes):
        work.graph.node.extend(replacements.get(i, [node]))
    return True


def _evaluate(node: onnx.NodeProto, values: Mapping[str, np.ndarray],
              static: Mapping[str, list[int]], opset: int) -> list[np.ndarray] | None:
    if node.op_type in ("Shape", "Size"):
        shape = static.get(node.input[0]) if node.input else None
        if shape is None:
            return None
        if node.op_type == "Size":
            return [np.asarray(math.prod(shape), dtype=np.int64)]
        attrs = {a.name: a.i for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", len(shape))
        return [np.asarray(shape[start:end], dtype=np.int64)]
    if any(x and x not in values for x in node.input):
        return None
    ins = [values[x] if x else None for x in node.input]
    if not _fold_output_small(node.op_type, ins):
        return None
    try:
        graph = helper.make_graph(
            [node], "fold", [],
            [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
             for o in node.output if o],
            [numpy_helper.from_array(a, x) for a, x in zip(ins, node.input)
             if x and a is not None])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        outs = ReferenceEvaluator(m).run(None, {})
    except Exception:  # whatever the reference ops reject is simply not folded
        return None
    arrays = [np.asarray(o) for o in outs]
    if len(arrays) != len(node.output) or any(a.size > _FOLD_MAX_ELEMENTS for a in arrays):
        return None
    return arrays


def _fold_output_small(op: str, ins: list[Any]) -> bool:
    """Refuse before evaluating anything whose output could be large (hostile files)."""
    if any(a is not None and np.asarray(a).size > _FOLD_MAX_ELEMENTS for a in ins):
        return False
    try:
        if op == "Range":
            start, limit, delta = (float(np.asarray(a).reshape(-1)[0]) for a in ins[:3])
            return delta != 0 and 0 <= math.ceil((limit - start) / delta) <= _FOLD_MAX_ELEMENTS
        if op == "ConstantOfShape":
            shape = np.asarray(ins[0]).reshape(-1)
            return bool(np.all(shape >= 0)) and math.prod(int(d) for d in shape) <= _FOLD_MAX_ELEMENTS
        if op == "Expand":
            target = [int(d) for d in np.asarray(ins[1]).reshape(-1)]
            if any(d < 0 for d in target):
                return False
            out = np.broadcast_shapes(np.asarray(ins[0]).shape, tuple(target))
            return math.prod(out) <= _FOLD_MAX_ELEMENTS
        if op == "Tile":
            reps = [int(d) for d in np.asarray(ins[1]).reshape(-1)]
            return all(r >= 0 for r in reps) and \
                np.asarray(ins[0]).size * math.prod(reps) <= _FOLD_MAX_ELEMENTS
        if op in ("Gather", "Where", "Add", "Sub", "Mul", "Div", "Min", "Max", "Mod", "Equal",
                  "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or"):
            if op == "Gather":
                return np.asarray(ins[0]).size * max(np.asarray(ins[1]).size, 1) <= _FOLD_MAX_ELEMENTS
            out = np.broadcast_shapes(*(np.asarray(a).shape for a in ins if a is not None))
            return math.prod(out) <= _FOLD_MAX_ELEMENTS
    except (ValueError, TypeError, OverflowError, IndexError):
        return False
    return True


def _merge_generated_dims(model: onnx.ModelProto, declared: set[str]) -> None:
    """Rename dims that shape inference made up (``unk__3``) to the declared dim they must equal.

    Broadcasting ``[batch, seq, d] + [unk__1, d]`` forces ``unk__1 == seq`` in a valid model;
    onnx keeps whichever name it met first, which would hide ``seq`` from everything downstream
    (and from ``--dim seq=…``). Two declared names are never merged.
    """
    shapes: dict[str, onnx.TensorShapeProto] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = vi.type.tensor_type.shape
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.get(a, a) != a:
            a = parent[a]
        return a

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra == rb or (ra in declared and rb in declared):
            return
        if rb in declared or (not rb.startswith("unk__") and ra.startswith("unk__")):
            ra, rb = rb, ra
        parent[rb] = ra  # keep the declared (or human-made) name

    for node in model.graph.node:
        if node.op_type not in BROADCASTING or node.domain not in ("", "ai.onnx"):
            continue
        found = [shapes.get(x) for x in list(node.input) + list(node.output[:1]) if x]
        tensors = [t for t in found if t is not None]
        if len(tensors) < len(found) or len(tensors) < 2:
            continue
        rank = max(len(t.dim) for t in tensors)
        for pos in range(1, rank + 1):
            names = {t.dim[-pos].dim_param for t in tensors
                     if len(t.dim) >= pos and t.dim[-pos].dim_param}
            if len(names) > 1 and any(n not in declared for n in names):
                first, *rest = sorted(names)
                for other in rest:
                    union(first, other)
    if not parent:
        return
    for shape in shapes.values():
        for d in shape.dim:
            if d.dim_param and find(d.dim_param) != d.dim_param:
                d.dim_param = find(d.dim_param)


BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less",
                "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "PRelu",
                "Mod", "Sum", "Mean", "BitShift"}


def analyze(model: onnx.ModelProto, dims: Mapping[str, int] | None = None, *,
            shapes: Mapping[str, Sequence[int]] | None = None) -> GraphInfo:
    """Analyse ``model`` (node names must be unique: see ``model_io.ensure_node_names``).

    ``dims`` binds named dims (``{"seq": 128}``); ``shapes`` gives whole input shapes
    (``{"x": [1, 3, 224, 224]}``), for inputs whose dims have no names.
    """
    dims = dict(dims or {})
    inferred, error = infer_shapes(model, dims, shapes)
    g = model.graph

    tensors: dict[str, TensorInfo] = {}
    ig = inferred.graph
    for vi in list(ig.input) + list(ig.value_info) + list(ig.output):
        dtype, shape = _shape_from_type(vi.type)
        if vi.name in tensors and shape is None:
            continue
        tensors[vi.name] = TensorInfo(vi.name, dtype, _bind(shape, dims))
    constants: dict[str, onnx.TensorProto] = {}
    for init in g.initializer:
        constants[init.name] = init
        tensors[init.name] = TensorInfo(init.name, dtype_name(init.data_type), list(init.dims),
                                        is_constant=True)
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    constants[node.output[0]] = attr.t
                    tensors[node.output[0]] = TensorInfo(
                        node.output[0], dtype_name(attr.t.data_type), list(attr.t.dims),
                        is_constant=True)

    graph_inputs = [tensors.get(i.name) or TensorInfo(i.name) for i in g.input
                    if i.name not in constants]
    graph_outputs = [tensors.get(o.name) or TensorInfo(o.name) for o in g.output]

    constant_bytes = {name: _tensor_bytes(t) for name, t in constants.items()}
    order = topological_order(g)
    nodes: list[NodeInfo] = []
    for new_index, old_index in enumerate(order):
        node = g.node[old_index]
        in_infos = [tensors.get(x) if x else None for x in node.input]
        out_infos = [tensors.get(x) if x else None for x in node.output]
        info = NodeInfo(
            index=new_index,
            name=node.name,
            op_type=node.op_type,
            domain=node.domain,
            inputs=list(node.input),
            outputs=list(node.output),
            output_shapes=[t.shape if t else None for t in out_infos],
            attributes=_attributes(node),
            subgraph_nodes=count_subgraph_nodes(node),
        )
        info.param_bytes = sum(constant_bytes[x] for x in set(node.input) if x in constant_bytes)
        if node.op_type != "Constant":
            info.flops = node_flops(info, in_infos, out_infos)
            info.bytes_moved = node_bytes(info, in_infos, out_infos)
        else:
            info.flops = 0
        nodes.append(info)

    producer: dict[str, int] = {}
    for n in nodes:
        for out in n.outputs:
            if out:
                producer[out] = n.index
    edges: list[tuple[int, int, str]] = []
    for n in nodes:
        seen: set[str] = set()
        for inp in n.inputs:
            if inp and inp in producer and inp not in seen:
                seen.add(inp)
                edges.append((producer[inp], n.index, inp))

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return GraphInfo(
        nodes=nodes, edges=edges, inputs=graph_inputs, outputs=graph_outputs, tensors=tensors,
        opset=opset, ir_version=model.ir_version,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        shape_inference_error=error, constant_bytes=constant_bytes,
    )


def _tensor_bytes(t: onnx.TensorProto) -> int:
    count = math.prod(t.dims) if t.dims else 1
    found = nbytes(dtype_name(t.data_type), count)
    return count * 4 if found is None else found


def input_specs(model: onnx.ModelProto) -> list[TensorInfo]:
    """The model's real inputs (not initializers listed as inputs), with declared types."""
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dtype, shape = _shape_from_type(vi.type)
        specs.append(TensorInfo(vi.name, dtype, shape))
    return specs


def symbolic_dims(model: onnx.ModelProto) -> list[str]:
    """Named dims of the model's inputs, in first-seen order."""
    names: list[str] = []
    for spec in input_specs(model):
        for d in spec.shape or []:
            if isinstance(d, str) and d not in names:
                names.append(d)
    return names


def reachable_from(graph: onnx.GraphProto, start: str) -> set[str]:
    """Tensor names reachable downstream from ``start``."""
    users = consumers(graph)
    seen = {start}
    queue = deque([start])
    while queue:
        t = queue.popleft()
        for n in users.get(t, []):
            for o in n.output:
                if o and o not in seen:
                    seen.add(o)
                    queue.append(o)
    return seen
