"""Structured pruning of attention heads behind GroupQueryAttention, checked on onnxruntime:
removing a query head is exactly zeroing its rows of the output projection."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llm_builders import kv_decoder
from model_builders import run_ort
from opstudio.core.inputs import make_inputs
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
    ref = run_ort(zero_o_rows(model, "Wo", removed), feeds)
    new = run_ort(out, feeds)
    for a, b in zip(ref, new):  # y, and the KV cache: untouched, same shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
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
    ref, new = run_ort(zeroed, feeds), run_ort(result.model, feeds)
    for a, b in zip(ref, new):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
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
