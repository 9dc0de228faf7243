"""The shared graph helpers count what a subgraph reads from outside as read by its node."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from opstudio.core.errors import GraphError
from opstudio.core.model.graph_utils import (
    consumers,
    outer_reads,
    producers,
    topo_sort,
    topological_order,
)


def branch(name: str, reads: str) -> onnx.GraphProto:
    """An If branch returning ``reads`` + its own input-free constant: reads ``reads`` from outside."""
    one = helper.make_node("Constant", [], [f"{name}_one"], name=f"{name}_c",
                           value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    add = helper.make_node("Add", [reads, f"{name}_one"], [f"{name}_out"], name=f"{name}_add")
    return helper.make_graph([one, add], name, [],
                             [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1])])


def if_graph(shuffled: bool):
    """x → neg → n; If(cond) reads n in its then-branch only; the If is listed first when shuffled."""
    neg = helper.make_node("Neg", ["x"], ["n"], name="neg")
    cond = helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("then", "n"),
                            else_branch=branch("else", "x"))
    nodes = [cond, neg] if shuffled else [neg, cond]
    return helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
                     helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])


def test_reads_from_inside_a_subgraph_count():
    graph = if_graph(shuffled=False)
    assert sorted(outer_reads(graph.node[1])) == ["n", "x"]  # not the branches' own tensors
    users = consumers(graph)
    assert [n.name for n in users["n"]] == ["if"]
    assert [n.name for n in users["x"]] == ["neg", "if"]  # once, though read by an input too
    assert producers(graph)["n"].name == "neg"


def test_topological_order_puts_a_subgraph_after_what_it_reads():
    graph = if_graph(shuffled=True)
    assert topological_order(graph) == [1, 0]
    topo_sort(graph)
    assert [n.name for n in graph.node] == ["neg", "if"]


def test_a_node_reading_its_own_output_is_a_cycle():
    graph = helper.make_graph([helper.make_node("Add", ["x", "a"], ["a"], name="loop")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])])
    with pytest.raises(GraphError, match="'loop' consumes its own output"):
        topological_order(graph)
