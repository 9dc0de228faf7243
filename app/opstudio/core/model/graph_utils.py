"""A graph's structure read one way everywhere: who writes and who reads each tensor, an order
that respects both, node lookup by name, a copy of a model.

A node holding subgraphs (``If``, ``Loop``, ``Scan``) reads the outer-scope tensors its bodies
use, so those reads count here as reads by that node: a weight only an ``If`` branch uses is
still in use, and the ``If`` comes after the node producing it. The analysis (``graph``) and
every optimization pass use these helpers, so they agree about the same graph.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterator

import onnx

from opstudio.core.errors import GraphError


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The bodies ``node`` holds (``If`` branches, a ``Loop``/``Scan`` body)."""
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def outer_reads(node: onnx.NodeProto) -> list[str]:
    """Names ``node``'s subgraphs take from the enclosing scope, recursively, first-seen order."""
    names: dict[str, None] = {}
    for graph in subgraphs(node):
        local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
        local |= {s.values.name for s in graph.sparse_initializer}
        for inner in graph.node:
            for name in node_reads(inner):
                if name and name not in local:
                    names[name] = None
            local.update(inner.output)
    return list(names)


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Everything ``node`` reads: its inputs, then what its subgraphs take from outside."""
    reads = list(node.input)
    if len(node.attribute):
        reads.extend(outer_reads(node))
    return reads


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> nodes of ``graph`` reading it (directly or from a subgraph), in graph
    order, each node once per tensor."""
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in dict.fromkeys(node_reads(node)):
            if name:
                out[name].append(node)
    return out


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def nodes_by_name(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in graph.node}


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
        reads = node_reads(n)
        if any(producer.get(x) == i for x in reads if x):
            raise GraphError(f"graph has a cycle: node '{n.name or n.op_type}' consumes its own output")
        deps = {producer[x] for x in reads if x in producer}
        for d in deps:
            users[d].append(i)
        indegree[i] = len(deps)
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


def topo_sort(graph: onnx.GraphProto) -> None:
    """Put ``graph.node`` in topological order, in place (rewriters append what they create)."""
    order = topological_order(graph)
    if order == list(range(len(order))):
        return
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes[k] for k in order)
