"""Structured pruning of attention heads behind GroupQueryAttention, checked on onnxruntime:
removing a query head is exactly zeroing its rows of the output projection."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llm_builders import kv_decoder
from model_builders import run_ort
from opstudio.core.measure.inputs import make_inputs
from opstudio.core.passes import PassContext, get_pass

HEADS, KV_HEADS, HIDDEN = 4, 2, 64
HEAD = HIDDEN // HEADS


def packed_attention(seed: int = 0) -> onnx.ModelProto:
    """x → MatMul(q|k|v) → GroupQueryAttention (packed, rotary) → MatMul(o), as
    onnxruntime-genai writes a layer's attention."""
    rng = np.random.default_rng(seed)
    width = (HEADS + 2 * KV_HEADS) * HEAD
    inv = 1.0 / 10000.0 ** (np.arange(0, HEAD, 2) / HEAD)
    angles = np.outer(np.arange(64), inv)
    inits = [numpy_helper.from_array((rng.standard_normal((HIDDEN, width)) * 0.3)
                                     .astype(np.float32), "Wqkv"),
             numpy_helper.from_array((rng.standard_normal((HEADS * HEAD, HIDDEN)) * 0.3)
                                     .astype(np.float32), "Wo"),
             numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
             numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
    nodes = [
        helper.make_node("MatMul", ["x", "Wqkv"], ["qkv"], name="attn/qkv_proj/MatMul"),
        helper.make_node("GroupQueryAttention",
                         ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "cos",
                          "sin"], ["attn", "present_key", "present_value"],
                         name="attn/GroupQueryAttention", domain="com.microsoft",
                         num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1),
        helper.make_node("MatMul", ["attn", "Wo"], ["y"], name="attn/o_proj/MatMul"),
    ]
    kv = ["batch", KV_HEADS, "past", HEAD]
    graph = helper.make_graph(
        nodes, "packed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
         helper.make_tensor_value_info("past_key", TensorProto.FLOAT, kv),
         helper.make_tensor_value_info("past_value", TensorProto.FLOAT, kv),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
         helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
         helper.make_tensor_value_info("present_key", TensorProto.FLOAT,
                                       ["batch", KV_HEADS, "total", HEAD]),
         helper.make_tensor_value_info("present_value", TensorProto.FLOAT,
                                       ["batch", KV_HEADS, "total", HEAD])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def packed_feeds(seq: int = 3, past: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    kv = (1, KV_HEADS, past, HEAD)
    return {"x": rng.standard_normal((1, seq, HIDDEN)).astype(np.float32),
            "past_key": rng.standard_normal(kv).astype(np.float32),
            "past_value": rng.standard_normal(kv).astype(np.float32),
            "seqlens_k": np.array([past + seq - 1], np.int32),
            "total": np.array(past + seq, np.int32)}


def zero_o_rows(model: onnx.ModelProto, weight: str, removed: list[int]) -> onnx.ModelProto:
    """The original with the removed heads silenced: their output-projection rows zeroed
    (a weight stored float16 behind a Cast is zeroed where it is stored)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for k, init in enumerate(out.graph.initializer):
        if init.name in (weight, weight + ".fp16"):
            value = numpy_helper.to_array(init).copy()
            for h in removed:
                value[h * HEAD:(h + 1) * HEAD] = 0
            out.graph.initializer[k].CopyFrom(numpy_helper.from_array(value, init.name))
    return out


def assert_same_outputs(reference: onnx.ModelProto, pruned: onnx.ModelProto,
                        feeds: dict[str, np.ndarray], tol: float = 1e-5) -> None:
    for a, b in zip(run_ort(reference, feeds), run_ort(pruned, feeds)):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)


def gqa_node(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")


@pytest.mark.parametrize("selected", ["attn/qkv_proj/MatMul", "attn/o_proj/MatMul"])
def test_packed_qkv_heads_go_per_kv_group_and_equal_silencing_them(selected):
    model = packed_attention()
    result = get_pass("prune").apply(model, [selected], {"structured": True, "sparsity": 0.5},
                                     PassContext())
    assert result.applied == [selected]
    details = result.details[selected]
    assert (details["heads_before"], details["heads_after"]) == (4, 2)
    removed = details["removed_heads"]
    # one of the two query heads of each KV group
    assert len(removed) == 2 and {h // 2 for h in removed} == {0, 1}
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    num_heads = next(a.i for a in gqa_node(out).attribute if a.name == "num_heads")
    assert num_heads == 2
    shapes = {i.name: tuple(i.dims) for i in out.graph.initializer}
    assert shapes[out.graph.node[0].input[1]] == (HIDDEN, (2 + 2 * KV_HEADS) * HEAD)
    feeds = packed_feeds()
    # y, and the KV cache: untouched, same shape
    assert_same_outputs(zero_o_rows(model, "Wo", removed), out, feeds)
    assert any("KV cache unchanged" in n for n in result.notes)


def test_decoder_heads_with_a_q_bias_and_the_cache_the_runtime_feeds(tmp_path):
    model = kv_decoder("gqa", layers=2, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, seed=2)
    names = [n.name for n in model.graph.node if n.name.endswith("q_proj/MatMul")]
    result = get_pass("prune").apply(model, names, {"structured": True, "sparsity": 0.5},
                                     PassContext())
    assert result.applied == names
    zeroed = model
    for i, name in enumerate(names):
        zeroed = zero_o_rows(zeroed, f"model.layers.{i}.attn.o_proj.weight",
                             result.details[name]["removed_heads"])
    feeds = make_inputs(model, phase="decode", past=6)
    # the same inputs fit: the KV cache keeps its shape
    assert_same_outputs(zeroed, result.model, feeds, tol=1e-4)
    sizes = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    assert any(s == (2 * HEAD,) for n, s in sizes.items() if "q_proj.bias" in n)


def test_activation_importance_ranks_heads_by_what_reaches_them():
    model = kv_decoder("gqa", layers=1, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, seed=3)
    result = get_pass("prune").apply(
        model, ["/model/layers.0/attn/o_proj/MatMul"],
        {"structured": True, "sparsity": 0.5, "importance": "activation",
         "calibration": "random", "samples": 2}, PassContext())
    details = result.details["/model/layers.0/attn/o_proj/MatMul"]
    assert details["importance"] == "activation" and details["heads_after"] == 2


def test_kv_projections_and_one_head_per_group_are_refused_with_the_reason():
    model = kv_decoder("gqa", layers=1, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS)
    prune = get_pass("prune")
    k_proj = next(n for n in model.graph.node if n.name.endswith("k_proj/MatMul"))
    why = prune.check(model, k_proj, {"structured": True})
    assert why is not None and "KV cache" in why
    mha = kv_decoder("gqa", layers=1, hidden=HIDDEN, heads=HEADS, kv_heads=HEADS)
    q_proj = next(n for n in mha.graph.node if n.name.endswith("q_proj/MatMul"))
    why = prune.check(mha, q_proj, {"structured": True})
    assert why is not None and "one query head per KV head" in why
    # a sparsity that removes less than one head of a group says so
    result = prune.apply(model, [next(n.name for n in model.graph.node
                                      if n.name.endswith("q_proj/MatMul"))],
                         {"structured": True, "sparsity": 0.2}, PassContext())
    assert not result.applied and "removes none" in next(iter(result.skipped.values()))


# --- HF / optimum exports: transformers' repeat_kv in plain ops ---------------------------

HF_HEADS, HF_KV = 6, 2  # a repeat factor of 3, as SmolLM2's, equal to the head-dim axis index


def hf_attention(seed: int = 0, q_bias: bool = True) -> onnx.ModelProto:
    """One attention as transformers exports it with a KV cache: q/k/v MatMuls reshaped with
    [b, s, -1, d] built from Shape/Gather/Concat, rotary embedding by halves, the keys and
    values repeated per query head by Unsqueeze → Expand → Reshape whose shapes hold the factor
    as constants, MatMul/Softmax attention, and the heads merged by [b, s, -1]."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    group = HF_HEADS // HF_KV

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(kind, inputs, name, **attrs):
        nodes.append(helper.make_node(kind, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def dim(tensor, axis, name):
        shape = op("Shape", [tensor], f"{name}/Shape")
        picked = op("Gather", [shape, const(f"{name}/idx", np.array(axis, np.int64))],
                    f"{name}/Gather", axis=0)
        return op("Unsqueeze", [picked, const(f"{name}/axes", np.array([0], np.int64))],
                  f"{name}/Unsqueeze")

    def weight(name, shape):
        return const(name, (0.3 * rng.standard_normal(shape)).astype(np.float32))

    b, s = dim("x", 0, "b"), dim("x", 1, "s")
    minus1 = const("minus1", np.array([-1], np.int64))
    d_const = const("head_dim", np.array([HEAD], np.int64))
    half = HEAD // 2

    def heads(proj, name):
        shape = op("Concat", [b, s, minus1, d_const], f"{name}/shape", axis=0)
        r = op("Reshape", [proj, shape], f"{name}/Reshape")
        return op("Transpose", [r], f"{name}/Transpose", perm=[0, 2, 1, 3])

    def rotary(t, name):
        lo = op("Slice", [t, const(f"{name}/s0", np.array([0])), const(f"{name}/e0", np.array([half])),
                          const(f"{name}/a0", np.array([3]))], f"{name}/Slice")
        hi = op("Slice", [t, const(f"{name}/s1", np.array([half])),
                          const(f"{name}/e1", np.array([HEAD])), const(f"{name}/a1", np.array([3]))],
                f"{name}/Slice_1")
        rot = op("Concat", [op("Neg", [hi], f"{name}/Neg"), lo], f"{name}/Concat", axis=-1)
        return op("Add", [op("Mul", [t, "cos"], f"{name}/Mul"),
                          op("Mul", [rot, "sin"], f"{name}/Mul_1")], f"{name}/Add")

    q = op("MatMul", ["x", weight("Wq", (HIDDEN, HF_HEADS * HEAD))], "q_proj/MatMul")
    if q_bias:
        q = op("Add", [q, weight("bq", (HF_HEADS * HEAD,))], "q_proj/Add")
    q = rotary(heads(q, "q"), "q_rot")
    k = rotary(heads(op("MatMul", ["x", weight("Wk", (HIDDEN, HF_KV * HEAD))], "k_proj/MatMul"),
                     "k"), "k_rot")
    v = heads(op("MatMul", ["x", weight("Wv", (HIDDEN, HF_KV * HEAD))], "v_proj/MatMul"), "v")
    nodes.append(helper.make_node("Concat", ["past_key", k], ["present_key"], axis=2,
                                  name="k/Concat_past"))
    nodes.append(helper.make_node("Concat", ["past_value", v], ["present_value"], axis=2,
                                  name="v/Concat_past"))

    def repeat(t, name):
        pb, kv, tt, dd = (dim(t, a, f"{name}/d{a}") for a in range(4))
        up = op("Unsqueeze", [t, const(f"{name}/ax2", np.array([2], np.int64))], f"{name}/Unsq")
        shape5 = op("Concat", [pb, kv, const(f"{name}/group", np.array([group], np.int64)), tt,
                               dd], f"{name}/Concat_5", axis=0)
        expanded = op("Expand", [up, shape5], f"{name}/Expand")
        kv_scalar = op("Gather", [op("Shape", [t], f"{name}/Shape_kv"),
                                  const(f"{name}/one", np.array(1, np.int64))],
                       f"{name}/Gather_kv", axis=0)
        times = op("Mul", [kv_scalar, const(f"{name}/factor", np.array(group, np.int64))],
                   f"{name}/Mul_kv")
        times = op("Unsqueeze", [times, const(f"{name}/ax0", np.array([0], np.int64))],
                   f"{name}/Unsq_kv")
        shape4 = op("Concat", [pb, times, tt, dd], f"{name}/Concat_4", axis=0)
        return op("Reshape", [expanded, shape4], f"{name}/Reshape_rep")

    k_rep, v_rep = repeat("present_key", "k_rep"), repeat("present_value", "v_rep")
    kt = op("Transpose", [k_rep], "k_rep/Transpose", perm=[0, 1, 3, 2])
    scores = op("Mul", [op("MatMul", [q, kt], "attn/MatMul"),
                        const("scale", np.array(HEAD ** -0.5, np.float32))], "attn/Mul")
    probs = op("Softmax", [scores], "attn/Softmax", axis=-1)
    ctx = op("Transpose", [op("MatMul", [probs, v_rep], "attn/MatMul_1")], "attn/Transpose",
             perm=[0, 2, 1, 3])
    merged = op("Reshape", [ctx, op("Concat", [b, s, minus1], "attn/merge_shape", axis=0)],
                "attn/Reshape")
    nodes.append(helper.make_node("MatMul", [merged, weight("Wo", (HF_HEADS * HEAD, HIDDEN))],
                                  ["y"], name="o_proj/MatMul"))
    kv = [1, HF_KV, "past", HEAD]
    graph = helper.make_graph(
        nodes, "hf_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", HIDDEN]),
         helper.make_tensor_value_info("cos", TensorProto.FLOAT, [1, 1, "seq", HEAD]),
         helper.make_tensor_value_info("sin", TensorProto.FLOAT, [1, 1, "seq", HEAD]),
         helper.make_tensor_value_info("past_key", TensorProto.FLOAT, kv),
         helper.make_tensor_value_info("past_value", TensorProto.FLOAT, kv)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", HIDDEN]),
         helper.make_tensor_value_info("present_key", TensorProto.FLOAT,
                                       [1, HF_KV, "total", HEAD]),
         helper.make_tensor_value_info("present_value", TensorProto.FLOAT,
                                       [1, HF_KV, "total", HEAD])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def hf_feeds(seq: int = 3, past: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(6)
    angles = rng.uniform(0, 3, size=(1, 1, seq, HEAD)).astype(np.float32)
    kv = (1, HF_KV, past, HEAD)
    return {"x": rng.standard_normal((1, seq, HIDDEN)).astype(np.float32),
            "cos": np.cos(angles), "sin": np.sin(angles),
            "past_key": rng.standard_normal(kv).astype(np.float32),
            "past_value": rng.standard_normal(kv).astype(np.float32)}


@pytest.mark.parametrize("selected", ["q_proj/MatMul", "o_proj/MatMul"])
def test_hf_attention_heads_go_with_the_repeat_factor_and_equal_silencing_them(selected):
    model = hf_attention()
    onnx.checker.check_model(model, full_check=True)
    result = get_pass("prune").apply(model, [selected], {"structured": True, "sparsity": 0.34},
                                     PassContext())
    assert result.applied == [selected], result.skipped
    details = result.details[selected]
    assert (details["heads_before"], details["heads_after"]) == (6, 4)
    removed = details["removed_heads"]
    assert len(removed) == 2 and {h // 3 for h in removed} == {0, 1}
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    feeds = hf_feeds()
    assert_same_outputs(zero_o_rows(model, "Wo", removed), out, feeds)
    # the repeat factor 3 became 2 in the Expand and the Reshape; the head-dim axis index 3
    # that reads the same number stayed
    values = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert int(values[next(n for n in values if n.startswith("k_rep/group"))][0]) == 2
    assert all(int(values[n]) == 3 for n in values if n.endswith("d3/idx"))


def test_hf_attention_without_repeated_heads_says_why():
    model = kv_decoder("hf", layers=1, hidden=HIDDEN, heads=HEADS)
    q_proj = next(n for n in model.graph.node if n.name.endswith("q_proj/MatMul"))
    why = get_pass("prune").check(model, q_proj, {"structured": True})
    assert why is not None and "repeated" in why
