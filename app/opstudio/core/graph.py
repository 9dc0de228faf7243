"""The graph as opstudio sees it: nodes in topological order, edges, shapes, FLOPs and bytes.

Shapes come from ONNX shape inference with symbolic dims kept (``batch``, ``seq``); a dim that is
neither known nor named is ``None``. FLOPs count a multiply-add as 2 and are ``None`` whenever a
shape they need is unknown or symbolic; :func:`analyze` accepts ``dims`` to bind symbolic dims
(``{"batch": 1, "seq": 128}``) so the numbers can be made concrete for a chosen input size.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx
from onnx import helper, shape_inference

from opstudio.core.errors import GraphError
from opstudio.core.flops import node_flops

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
        n, size = self.numel(), self.itemsize
        return None if n is None or size is None else n * size


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

    def __post_init__(self) -> None:
        self._by_name = {n.name: n for n in self.nodes}
        self._producer: dict[str, int] = {}
        self._consumers: dict[str, list[int]] = defaultdict(list)
        for n in self.nodes:
            for out in n.outputs:
                if out:
                    self._producer[out] = n.index
            for inp in n.inputs:
                if inp:
                    self._consumers[inp].append(n.index)

    def node(self, name: str) -> NodeInfo:
        return self._by_name[name]

    def has_node(self, name: str) -> bool:
        return name in self._by_name

    def producer(self, tensor: str) -> NodeInfo | None:
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
        """Sum of known FLOPs (nodes with unknown FLOPs are left out)."""
        known = [n.flops for n in self.nodes if n.flops is not None]
        return sum(known) if known else None

    def total_param_bytes(self) -> int:
        return sum(n.param_bytes for n in self.nodes)


DTYPE_SIZES = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8,
    "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "bool": 1, "int4": 1, "uint4": 1,
    "float8e4m3fn": 1, "float8e4m3fnuz": 1, "float8e5m2": 1, "float8e5m2fnuz": 1,
    "complex64": 8, "complex128": 16,
}


def dtype_name(elem_type: int) -> str | None:
    if elem_type == onnx.TensorProto.UNDEFINED:
        return None
    try:
        name = onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return None
    return {"float": "float32", "double": "float64"}.get(name, name)


def numel(shape: Shape) -> int | None:
    if shape is None:
        return None
    total = 1
    for d in shape:
        if not isinstance(d, int) or d < 0:
            return None
        total *= d
    return total


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
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, list):
            value = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
        out[attr.name] = value
    return out


def topological_order(graph: onnx.GraphProto) -> list[int]:
    """Indices of ``graph.node`` in an order where producers precede consumers.

    Stable: keeps file order wherever it is already valid. Raises ``GraphError`` on a cycle.
    """
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for out in n.output:
            if out:
                producer[out] = i
    indegree = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        deps = {producer[x] for x in n.input if x in producer and producer[x] != i}
        for d in deps:
            users[d].append(i)
        indegree[i] = len(deps)
        if any(producer.get(x) == i for x in n.input if x):
            raise GraphError(f"graph has a cycle: node '{n.name or n.op_type}' consumes its own output")
    ready = [i for i, d in enumerate(indegree) if d == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            indegree[u] -= 1
            if indegree[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = next(i for i, d in enumerate(indegree) if d > 0)
        raise GraphError(
            f"graph has a cycle through node '{nodes[stuck].name or nodes[stuck].op_type}'")
    return order


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Shape-inferred copy of ``model`` (or the model itself and the reason inference failed)."""
    try:
        inferred = shape_inference.infer_shapes(model, check_type=False, strict_mode=False,
                                                data_prop=True)
        return inferred, None
    except Exception as exc:  # onnx raises many types here (InferenceError, ValueError, …)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return model, first[:300]


def analyze(model: onnx.ModelProto, dims: Mapping[str, int] | None = None) -> GraphInfo:
    """Analyse ``model`` (node names must be unique: see ``model_io.ensure_node_names``)."""
    dims = dict(dims or {})
    inferred, error = infer_shapes(model)
    g = inferred.graph

    tensors: dict[str, TensorInfo] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dtype, shape = _shape_from_type(vi.type)
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
        info.param_bytes = sum(_tensor_bytes(constants[x]) for x in set(node.input)
                               if x in constants)
        if node.op_type != "Constant":
            info.flops = node_flops(info, in_infos, out_infos)
            info.bytes_moved = _bytes_moved(in_infos, out_infos)
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
        shape_inference_error=error,
    )


def _tensor_bytes(t: onnx.TensorProto) -> int:
    size = DTYPE_SIZES.get(dtype_name(t.data_type) or "", 4)
    return math.prod(t.dims) * size if t.dims else size


def _bytes_moved(ins: list[TensorInfo | None], outs: list[TensorInfo | None]) -> int | None:
    total = 0
    for t in ins + outs:
        if t is None:
            continue
        b = t.nbytes()
        if b is None:
            return None
        total += b
    return total


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


def consumers_map(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            if i:
                out[i].append(n)
    return out


def reachable_from(graph: onnx.GraphProto, start: str) -> set[str]:
    """Tensor names reachable downstream from ``start``."""
    users = consumers_map(graph)
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
