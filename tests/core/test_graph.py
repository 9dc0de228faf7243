"""Graph analysis: order, edges, shapes, FLOPs, bytes, subgraphs, dim binding."""

from __future__ import annotations

import random
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.errors import GraphError
from opstudio.core.model.graph import analyze, input_specs, symbolic_dims, topological_order


def make(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def one(op, inputs, inits=(), out_shape=None, **attrs):
    """Analyse a single-node model; returns that node's NodeInfo."""
    names = [n for n, _ in inputs] + [n for n, _ in inits]
    node = helper.make_node(op, names, ["y"], name="n", **attrs)
    info = analyze(make([node], inputs, [("y", out_shape)], inits))
    return info.node("n")


def w(*shape):
    return np.ones(shape, dtype=np.float32)


def chain_model(n: int = 6) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"r{i}") for i in range(n)]
    return make(nodes, [("t0", [2])], [(f"t{n}", [2])])


def test_topological_order_of_a_shuffled_graph():
    model = chain_model(8)
    nodes = list(model.graph.node)
    random.Random(4).shuffle(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    info = analyze(model)
    assert [n.name for n in info.nodes] == [f"r{i}" for i in range(8)]
    assert [n.index for n in info.nodes] == list(range(8))
    order = topological_order(model.graph)
    assert sorted(order) == list(range(8))


def test_order_is_stable_when_already_valid():
    # two independent branches: file order is kept
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="b1"),
             helper.make_node("Neg", ["x"], ["b"], name="b2"),
             helper.make_node("Add", ["a", "b"], ["y"], name="join")]
    info = analyze(make(nodes, [("x", [3])], [("y", [3])]))
    assert [n.name for n in info.nodes] == ["b1", "b2", "join"]


def test_edges_and_lookups():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r"),
             helper.make_node("Add", ["a", "a"], ["b"], name="add"),
             helper.make_node("Mul", ["a", "b"], ["y"], name="mul")]
    info = analyze(make(nodes, [("x", [3])], [("y", [3])]))
    assert sorted(info.edges) == [(0, 1, "a"), (0, 2, "a"), (1, 2, "b")]
    assert info.producer_of("b").name == "add"
    assert [n.name for n in info.consumers("a")] == ["add", "mul"]
    assert info.producer_of("x") is None
    assert isinstance(info.producer, str)  # the exporter's name, a field


def test_cycle_raises_graph_error():
    nodes = [helper.make_node("Relu", ["b"], ["a"], name="r"),
             helper.make_node("Neg", ["a"], ["b"], name="n")]
    with pytest.raises(GraphError, match="cycle"):
        analyze(make(nodes, [], [("b", [1])]))


def test_self_loop_raises_graph_error():
    nodes = [helper.make_node("Add", ["x", "a"], ["a"], name="self")]
    with pytest.raises(GraphError, match=r"cycle.*self"):
        topological_order(make(nodes, [("x", [1])], [("a", [1])]).graph)


def test_symbolic_dims_are_kept_and_bound():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = make(nodes, [("x", ["batch", "seq", 8])], [("y", None)], [("w", w(8, 4))])
    assert symbolic_dims(model) == ["batch", "seq"]
    assert [s.name for s in input_specs(model)] == ["x"]
    free = analyze(model)
    assert free.node("mm").output_shapes == [["batch", "seq", 4]]
    assert free.node("mm").flops is None
    bound = analyze(model, {"batch": 2, "seq": 5})
    assert bound.node("mm").output_shapes == [[2, 5, 4]]
    assert bound.node("mm").flops == 2 * 2 * 5 * 4 * 8
    partly = analyze(model, {"batch": 2})
    assert partly.node("mm").output_shapes == [[2, "seq", 4]]


def test_whole_shapes_bind_unnamed_dims():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = make(nodes, [("x", [None, 8])], [("y", None)], [("w", w(8, 4))])
    assert analyze(model).node("mm").flops is None
    assert analyze(model, shapes={"x": [3, 8]}).node("mm").flops == 2 * 3 * 4 * 8


def test_generated_dims_take_the_declared_name():
    # Range(0, seq) has a length shape inference cannot name; broadcasting against x forces it
    # to be ``seq``, which must survive so that binding seq makes downstream FLOPs concrete.
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "one"], ["seq"], name="seq", axis=0),
        helper.make_node("Range", ["zero", "seq", "one"], ["pos"], name="range"),
        helper.make_node("Cast", ["pos"], ["posf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["posf", "axes"], ["col"], name="unsq"),
        helper.make_node("Add", ["x", "col"], ["h"], name="add"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="mm"),
    ]
    inits = [("one", np.asarray(1, np.int64)), ("zero", np.asarray(0, np.int64)),
             ("axes", np.asarray([1], np.int64)), ("w", w(8, 4))]
    model = make(nodes, [("x", ["batch", "seq", 8])], [("y", None)], inits)
    info = analyze(model)
    assert info.node("add").output_shapes[0] == ["batch", "seq", 8]
    assert info.node("mm").output_shapes[0] == ["batch", "seq", 4]
    assert analyze(model, {"batch": 1, "seq": 10}).node("mm").flops == 2 * 10 * 4 * 8


def test_shapes_computed_from_constants_are_folded():
    # The pad amounts go through Concat/Reshape/Slice/Transpose, as torch exports write them;
    # shape inference alone cannot see through that, folding the constants can.
    nodes = [
        helper.make_node("Concat", ["p0", "p1"], ["pc"], name="cat", axis=0),
        helper.make_node("Reshape", ["pc", "shp"], ["pr"], name="resh"),
        helper.make_node("Transpose", ["pr"], ["pt"], name="tr", perm=[1, 0]),
        helper.make_node("Reshape", ["pt", "flat"], ["pads"], name="flat"),
        helper.make_node("Pad", ["x", "pads"], ["xp"], name="pad"),
        helper.make_node("Conv", ["xp", "k"], ["y"], name="conv"),
    ]
    inits = [("p0", np.asarray([0, 0, 0], np.int64)), ("p1", np.asarray([0, 0, 2], np.int64)),
             ("shp", np.asarray([2, 3], np.int64)), ("flat", np.asarray([-1], np.int64)),
             ("k", w(4, 1, 3))]
    model = make(nodes, [("x", [1, 1, 10])], [("y", None)], inits)
    info = analyze(model)
    assert info.node("pad").output_shapes[0] == [1, 1, 12]
    assert info.node("conv").output_shapes[0] == [1, 4, 10]
    assert info.node("conv").flops == 2 * 4 * 10 * 3
    assert len(info.nodes) == 6  # folding never changes what is reported


def test_huge_computed_constants_are_not_materialised():
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="cos"),
             helper.make_node("Add", ["big", "x"], ["y"], name="add")]
    model = make(nodes, [("x", [1])], [("y", None)],
                 [("shape", np.asarray([100_000, 100_000], np.int64))])
    start = time.perf_counter()
    info = analyze(model)
    assert time.perf_counter() - start < 5
    assert info.node("add").output_shapes[0] == [100_000, 100_000]


def test_implausible_declared_shape_does_not_stall_inference():
    # A file claiming [2147483648] for a one-element Slice parameter made inference crawl.
    def const(name, values):
        return helper.make_node("Constant", [], [name], name=name,
                                value=numpy_helper.from_array(np.asarray(values, np.int64)))

    nodes = [const("starts", [0]), const("ends", [2]), const("axes", [0]),
             helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"], name="slice")]
    model = make(nodes, [("x", [4, 3])], [("y", None)])
    model.graph.value_info.append(
        helper.make_tensor_value_info("axes", TensorProto.INT64, [2**31]))
    start = time.perf_counter()
    info = analyze(model)
    assert time.perf_counter() - start < 5
    assert info.node("slice").output_shapes[0] == [2, 3]


def test_custom_domain_op_still_analysed():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Mystery", ["h"], ["z"], name="custom", domain="com.example"),
             helper.make_node("Relu", ["z"], ["y"], name="relu")]
    model = make(nodes, [("x", [2, 8])], [("y", None)], [("w", w(8, 4))])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    info = analyze(model)
    assert [n.name for n in info.nodes] == ["mm", "custom", "relu"]
    assert info.node("mm").flops == 2 * 2 * 4 * 8
    assert info.node("custom").domain == "com.example"
    assert info.node("custom").flops is None


# --- FLOPs ---------------------------------------------------------------------------------


def test_flops_matmul_2d_and_batched():
    assert one("MatMul", [("a", [3, 5])], [("b", w(5, 7))]).flops == 2 * 3 * 7 * 5
    batched = one("MatMul", [("a", [2, 3, 5, 7]), ("b", [2, 3, 7, 4])])
    assert batched.output_shapes[0] == [2, 3, 5, 4]
    assert batched.flops == 2 * (2 * 3 * 5 * 4) * 7
    broadcast = one("MatMul", [("a", [6, 5, 7])], [("b", w(7, 4))])
    assert broadcast.flops == 2 * (6 * 5 * 4) * 7


@pytest.mark.parametrize(("trans_a", "trans_b", "a_shape", "b_shape"), [
    (0, 0, [4, 8], [8, 6]), (1, 0, [8, 4], [8, 6]), (0, 1, [4, 8], [6, 8]), (1, 1, [8, 4], [6, 8]),
])
def test_flops_gemm_transposes(trans_a, trans_b, a_shape, b_shape):
    node = one("Gemm", [("a", a_shape)], [("b", w(*b_shape)), ("c", w(6))],
               transA=trans_a, transB=trans_b)
    assert node.output_shapes[0] == [4, 6]
    assert node.flops == 2 * 4 * 6 * 8 + 4 * 6  # multiply-adds + bias
    no_bias = one("Gemm", [("a", a_shape)], [("b", w(*b_shape))], transA=trans_a, transB=trans_b)
    assert no_bias.flops == 2 * 4 * 6 * 8


def test_flops_conv_with_groups_and_strides():
    node = one("Conv", [("x", [1, 8, 16, 16])], [("k", w(8, 2, 3, 3)), ("b", w(8))],
               group=4, strides=[2, 2], pads=[1, 1, 1, 1])
    assert node.output_shapes[0] == [1, 8, 8, 8]
    out = 8 * 8 * 8
    assert node.flops == 2 * out * (2 * 3 * 3) + out
    depthwise = one("Conv", [("x", [1, 8, 10, 10])], [("k", w(8, 1, 3, 3))], group=8)
    assert depthwise.flops == 2 * (8 * 8 * 8) * 9


def test_flops_conv_transpose():
    node = one("ConvTranspose", [("x", [1, 4, 5, 5])], [("k", w(4, 2, 3, 3))], strides=[2, 2])
    assert node.output_shapes[0] == [1, 2, 11, 11]
    assert node.flops == 2 * (4 * 5 * 5) * (2 * 3 * 3)


def test_flops_elementwise_and_normalisations():
    assert one("Add", [("a", [3, 4]), ("b", [4])]).flops == 12
    assert one("Relu", [("a", [2, 5])]).flops == 10
    assert one("Softmax", [("a", [2, 10])], axis=-1).flops == 5 * 20
    ln = one("LayerNormalization", [("a", [2, 3, 10])], [("g", w(10)), ("b", w(10))], axis=-1)
    assert ln.flops == 8 * 60
    assert one("Reshape", [("a", [2, 6])], [("s", np.asarray([3, 4], np.int64))]).flops == 0


def test_flops_pools():
    mp = one("MaxPool", [("x", [1, 2, 4, 4])], kernel_shape=[2, 2], strides=[2, 2])
    assert mp.output_shapes[0] == [1, 2, 2, 2]
    assert mp.flops == 8 * 4
    ap = one("AveragePool", [("x", [1, 1, 6, 6])], kernel_shape=[3, 3], strides=[3, 3])
    assert ap.flops == 4 * 9
    assert one("GlobalAveragePool", [("x", [1, 3, 5, 5])]).flops == 75


# --- parameter bytes and subgraphs ---------------------------------------------------------


def test_param_bytes_from_initializers_and_constant_nodes():
    const = helper.make_node("Constant", [], ["cw"], name="cw",
                             value=numpy_helper.from_array(w(8, 2)))
    nodes = [const,
             helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "cw"], ["y"], name="mm2")]
    model = make(nodes, [("x", [1, 4])], [("y", None)], [("w", w(4, 8))])
    model.graph.initializer[0].data_type = TensorProto.FLOAT
    info = analyze(model)
    assert info.node("mm1").param_bytes == 4 * 8 * 4
    assert info.node("mm2").param_bytes == 8 * 2 * 4
    assert info.node("cw").param_bytes == 0  # counted once, at the consumer
    assert info.total_param_bytes() == (32 + 16) * 4
    assert info.node("mm2").flops == 2 * 2 * 8


def test_param_bytes_by_dtype_and_shared_weights():
    half = numpy_helper.from_array(np.ones((4, 4), np.float16), "wh")
    nodes = [helper.make_node("Cast", ["wh"], ["wf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "wf"], ["y"], name="add")]
    model = make(nodes, [("x", [4, 4])], [("y", None)])
    model.graph.initializer.append(half)
    assert analyze(model).node("cast").param_bytes == 16 * 2


def _if_model() -> onnx.ModelProto:
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t1"]), helper.make_node("Neg", ["t1"], ["t"])],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_g = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch",
                              then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                     helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_if_node_counts_its_branches():
    info = analyze(_if_model())
    assert len(info.nodes) == 1
    assert info.node("branch").subgraph_nodes == 3
    assert info.node("branch").flops is None  # the work is in a branch: unknown, not zero


def test_loop_node_counts_nested_bodies():
    inner = _if_model().graph.node[0]
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["xin"], ["xout"]),
         helper.make_node("Not", ["cond_in"], ["cond"]), inner],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("xin", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("xout", TensorProto.FLOAT, [2])])
    loop = helper.make_node("Loop", ["n", "c", "x"], ["y"], name="loop", body=body)
    graph = helper.make_graph(
        [loop], "g",
        [helper.make_tensor_value_info("n", TensorProto.INT64, []),
         helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    info = analyze(model)
    assert len(info.nodes) == 1
    assert info.node("loop").subgraph_nodes == 4 + 3  # body nodes + the If's branches


def test_op_type_counts_and_totals():
    info = analyze(chain_model(3))
    assert info.op_type_counts() == {"Relu": 3}
    assert info.total_flops() == 6
    assert info.opset == 17 and info.ir_version == 8


def test_shapes_resolve_through_every_layer_of_a_decoder_masking_per_layer():
    # each layer computes its causal mask from the shape of its present.N.key (a graph output)
    # and the previous layer's sequence length: folding one layer lets the next one fold
    from llm_builders import kv_decoder

    model = kv_decoder("hf", layers=8)
    dims = {"batch_size": 1, "sequence_length": 1, "past_sequence_length": 512,
            "total_sequence_length": 513}
    info = analyze(model, dims)
    assert info.flops_unknown() == 0 and not info.unbound_dims()
    last = info.node("/model/layers.7/attn/o_proj/MatMul")
    assert last.output_shapes == [[1, 1, 64]]
