"""Weights computed from constants, as LLM exports store them, are taken by every technique.

HF/optimum exports store weights as fp16 initializers followed by ``Cast`` to float32 and tie the
lm_head to the embedding through a ``Transpose``; quantized exports keep int8 weights behind
``DequantizeLinear``. A pass folds such a chain into a fresh initializer for the nodes it rewrites
and leaves the source alone while other nodes still read it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_builders import apply_pass, run_ort
from opstudio.core.passes import get_pass

VOCAB, HIDDEN, FFN = 96, 64, 128


def hf_style_decoder() -> onnx.ModelProto:
    """ids → Gather(embedding fp16 → Cast) → MatMul(W1 fp16 → Cast) → Relu →
    MatMul(DequantizeLinear(W2 int8)) → MatMul(Transpose(embedding)) = logits (tied)."""
    rng = np.random.default_rng(3)
    embed = (rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(np.float16)
    w1 = (rng.standard_normal((HIDDEN, FFN)) * 0.2).astype(np.float16)
    w2_q = rng.integers(-127, 128, (FFN, HIDDEN), dtype=np.int8)
    nodes = [
        helper.make_node("Cast", ["embed.fp16"], ["embed"], name="embed_cast", to=TensorProto.FLOAT),
        helper.make_node("Gather", ["embed", "input_ids"], ["h0"], name="embed_tokens"),
        helper.make_node("Cast", ["w1.fp16"], ["w1"], name="w1_cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="up_proj"),
        helper.make_node("Relu", ["h1"], ["a1"], name="act"),
        helper.make_node("DequantizeLinear", ["w2.q", "w2.scale"], ["w2"], name="w2_dq"),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="down_proj"),
        helper.make_node("Transpose", ["embed"], ["embed_t"], name="lm_head_t", perm=[1, 0]),
        helper.make_node("MatMul", ["h2", "embed_t"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes, "hf", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", VOCAB])],
        [numpy_helper.from_array(embed, "embed.fp16"), numpy_helper.from_array(w1, "w1.fp16"),
         numpy_helper.from_array(w2_q, "w2.q"),
         numpy_helper.from_array(np.float32(0.004), "w2.scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


FEEDS = {"input_ids": np.array([[1, 5, 7, 42, 90, 3, 3, 17]], dtype=np.int64)}
MATMULS = ["up_proj", "down_proj", "lm_head"]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    (tensor,) = [t for t in model.graph.initializer if t.name == name]
    return numpy_helper.to_array(tensor)


@pytest.mark.parametrize("technique,params,min_cosine", [
    ("int4-weight", {"accuracy_level": 1}, 0.97),
    ("int8-dynamic", {}, 0.99),
    ("fp16", {}, 0.999),
])
def test_quantizers_take_weights_behind_cast_transpose_and_dequantize(technique, params,
                                                                       min_cosine):
    model = hf_style_decoder()
    pass_ = get_pass(technique)
    for name in MATMULS:
        node = next(n for n in model.graph.node if n.name == name)
        assert pass_.check(model, node) is None, name
    result = apply_pass(pass_, model, MATMULS, params)
    assert sorted(result.applied) == sorted(MATMULS)
    assert not result.skipped
    (before,), (after,) = run_ort(model, FEEDS), run_ort(result.model, FEEDS)
    assert _cosine(before, after) > min_cosine


def test_tied_embedding_stays_intact_when_the_lm_head_is_quantized():
    model = hf_style_decoder()
    result = apply_pass(get_pass("int4-weight"), model, ["lm_head"], {"accuracy_level": 1})
    out = result.model
    # the embedding Gather still reads the fp16 table through its Cast, untouched
    np.testing.assert_array_equal(_initializer(out, "embed.fp16"),
                                  _initializer(model, "embed.fp16"))
    gather = next(n for n in out.graph.node if n.name == "embed_tokens")
    assert gather.input[0] == "embed"
    assert any(n.name == "embed_cast" for n in out.graph.node)
    # the Transpose only the lm_head read is gone with it
    assert not any(n.op_type == "Transpose" for n in out.graph.node)
    assert [n.op_type for n in out.graph.node].count("MatMulNBits") == 1


def test_a_chain_nothing_reads_any_more_is_removed():
    model = hf_style_decoder()
    result = apply_pass(get_pass("int8-dynamic"), model, ["up_proj"], {})
    names = {n.name for n in result.model.graph.node}
    inits = {t.name for t in result.model.graph.initializer}
    assert "w1_cast" not in names and "w1.fp16" not in inits
    assert "w2_dq" in names  # down_proj was not chosen: its chain stays


@pytest.mark.parametrize("technique,params", [
    ("lowrank", {"rank": FFN}),  # full rank of [64, 128]: rank 64 is exact; 128 caps at it
    ("prune", {"sparsity": 0.0}),
])
def test_lowrank_and_prune_take_cast_weights_exactly_at_no_compression(technique, params):
    model = hf_style_decoder()
    if technique == "lowrank":
        params = {"rank": HIDDEN}
    result = apply_pass(get_pass(technique), model, ["up_proj"], params)
    assert result.applied == ["up_proj"]
    (before,), (after,) = run_ort(model, FEEDS), run_ort(result.model, FEEDS)
    np.testing.assert_allclose(after, before, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("opset,scale_shape,attrs", [
    (13, (), {}),
    (13, (HIDDEN,), {"axis": 1}),
    (13, (FFN,), {"axis": 0}),
    (21, (FFN // 32, HIDDEN), {"axis": 0, "block_size": 32}),
])
def test_dequantize_fold_matches_onnxruntime(opset, scale_shape, attrs):
    from opstudio.core.passes._weights import constant_array

    rng = np.random.default_rng(5)
    q = rng.integers(-127, 128, (FFN, HIDDEN), dtype=np.int8)
    scale = (rng.random(scale_shape) * 0.01 + 0.001).astype(np.float32)
    zero = rng.integers(-5, 5, scale_shape, dtype=np.int8)
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], name="dq", **attrs)
    graph = helper.make_graph([node], "dq", [],
                              [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"),
                               numpy_helper.from_array(zero, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    folded, why = constant_array(model, "w")
    assert why is None
    (expected,) = run_ort(model, {})
    np.testing.assert_allclose(folded, expected, rtol=1e-6, atol=1e-7)


def test_the_embedding_table_is_block_quantized_too():
    model = hf_style_decoder()
    result = apply_pass(get_pass("int4-weight"), model, ["embed_tokens", "lm_head"],
                        {"accuracy_level": 1})
    assert sorted(result.applied) == ["embed_tokens", "lm_head"]
    ops = [n.op_type for n in result.model.graph.node]
    assert "GatherBlockQuantized" in ops and "Gather" not in ops
    # nothing reads the fp16 table any more: it is gone, not kept beside its quantized copy
    assert "embed.fp16" not in {t.name for t in result.model.graph.initializer}
    (before,), (after,) = run_ort(model, FEEDS), run_ort(result.model, FEEDS)
    assert _cosine(before, after) > 0.97
    gather = next(n for n in model.graph.node if n.name == "embed_tokens")
    assert "4 bits only" in get_pass("int8-weight").check(model, gather)


def test_gather_along_another_axis_is_refused_with_the_reason():
    model = hf_style_decoder()
    gather = next(n for n in model.graph.node if n.name == "embed_tokens")
    gather.attribute.append(helper.make_attribute("axis", 1))
    assert "axis other than 0" in get_pass("int4-weight").check(model, gather)


def test_quantizing_the_embedding_keeps_the_models_own_opset():
    # ReduceMean's `axes` attribute is gone from opset 18 on: raised to 21, this model breaks
    rng = np.random.default_rng(4)
    table = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["h"], name="embed_tokens"),
             helper.make_node("ReduceMean", ["h"], ["y"], name="mean", axes=[-1], keepdims=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", 1])],
        [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = apply_pass(get_pass("int4-weight"), model, ["embed_tokens"], {})
    assert next(o.version for o in result.model.opset_import if o.domain == "") == 17
    (before,), (after,) = run_ort(model, FEEDS), run_ort(result.model, FEEDS)
    np.testing.assert_allclose(after, before, atol=0.05)


@pytest.mark.parametrize("op, attrs, x", [
    ("Transpose", {}, np.arange(24, dtype=np.float32).reshape(2, 3, 4)),
    ("Transpose", {"perm": [1, 0, 2]}, np.arange(24, dtype=np.float32).reshape(2, 3, 4)),
    ("Cast", {"to": TensorProto.FLOAT}, np.linspace(-3, 3, 12, dtype=np.float16).reshape(3, 4)),
    ("Cast", {"to": TensorProto.FLOAT16}, np.linspace(-3, 3, 12, dtype=np.float32)),
    ("Identity", {}, np.ones((2, 2), np.float32)),
])
def test_weight_chains_fold_in_numpy_as_onnx_evaluates_them(op, attrs, x):
    # a tied 1.5B model's table is a 0.9 GB Transpose: folded by numpy in one copy, the same
    # values onnx's reference evaluator gives
    from onnx.reference import ReferenceEvaluator

    from opstudio.core.passes._weights import _numpy_fold

    node = helper.make_node(op, ["x"], ["y"], **attrs)
    model = helper.make_model(helper.make_graph(
        [node], "g", [], [helper.make_empty_tensor_value_info("y")],
        [numpy_helper.from_array(x, "x")]))
    expected = ReferenceEvaluator(model).run(None, {})[0]
    folded = _numpy_fold(node, [x])
    assert folded is not None and folded.dtype == expected.dtype
    np.testing.assert_array_equal(folded, expected)
    assert folded.flags["C_CONTIGUOUS"]
    int_cast = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT8)
    assert _numpy_fold(int_cast, [x]) is None  # rounding rules differ: the evaluator decides
