"""fuse: a decoder's norms, residual Adds, rotary embeddings and attention blocks become
onnxruntime's fused kernels, unit by unit, with the same outputs up to float rounding."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from llm_builders import llama_decoder, llama_inputs
from model_builders import apply_pass, run_ort, small_mlp
from opstudio.core.model import provenance
from opstudio.core.passes import PassContext, get_pass

FUSE = get_pass("fuse")
FUSED = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
         "GroupQueryAttention")
NO_ATTENTION = {"attention": False}


def _fused_ops(model):
    return Counter(n.op_type for n in model.graph.node if n.op_type in FUSED)


def _assert_same_outputs(before, after, feeds):
    want, got = run_ort(before, feeds), run_ort(after, feeds)
    assert len(want) == len(got)
    for a, b in zip(want, got, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    logits_a, logits_b = want[0].reshape(-1, want[0].shape[-1]), got[0].reshape(
        -1, got[0].shape[-1])
    cosine = (logits_a * logits_b).sum(-1) / np.linalg.norm(logits_a, axis=-1) / np.linalg.norm(
        logits_b, axis=-1)
    assert cosine.min() >= 0.9999
    assert (logits_a.argmax(-1) == logits_b.argmax(-1)).all()


@pytest.mark.parametrize("norm,axes,attention,bias", [("div", "attribute", True, False),
                                                       ("reciprocal", "input", True, False),
                                                       ("div", "attribute", False, False),
                                                       ("div", "attribute", True, True)])
def test_every_unit_of_a_decoder_fuses_with_the_same_outputs(norm, axes, attention, bias):
    model = llama_decoder(layers=2, norm=norm, axes=axes, bias=bias)
    names = [n.name for n in model.graph.node]
    result = apply_pass(FUSE, model, names, {"attention": attention})
    # the first norm has no residual before it; 2 per layer then take the residual Add; and
    # each layer's attention, or without it the rotary embeddings of q and k
    expected = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4,
                **({"GroupQueryAttention": 2} if attention else {"RotaryEmbedding": 4})}
    assert _fused_ops(result.model) == expected
    gone = ("Pow", "Sqrt", "Neg", "Cos", *(("Softmax", "Expand") if attention else ()))
    assert not [n for n in result.model.graph.node if n.op_type in gone]
    # the interface does not change
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    for feeds in (llama_inputs(seq=4, past=3), llama_inputs(seq=1, past=9, seed=2),
                  llama_inputs(seq=6, past=0, seed=3)):
        _assert_same_outputs(model, result.model, feeds)


@pytest.mark.parametrize("named,params,fused", [
    ("/model/layers.0/input_layernorm/Pow", {}, {"SimplifiedLayerNormalization": 1}),
    ("/model/layers.0/Add", {}, {"SkipSimplifiedLayerNormalization": 1}),
    ("/model/layers.0/post_attention_layernorm/Sqrt", {},
     {"SkipSimplifiedLayerNormalization": 1}),
    ("/model/layers.1/self_attn/k_rot/Slice_1", NO_ATTENTION, {"RotaryEmbedding": 1}),
    ("/model/layers.1/self_attn/k_rot/Slice_1", {}, {"GroupQueryAttention": 1}),
    ("/model/layers.0/self_attn/Softmax", {}, {"GroupQueryAttention": 1}),
])
def test_naming_one_node_fuses_its_unit_only(named, params, fused):
    model = llama_decoder(layers=2)
    result = apply_pass(FUSE, model, [named], params)
    assert result.applied == [named]
    assert _fused_ops(result.model) == fused
    _assert_same_outputs(model, result.model, llama_inputs())


def test_a_fused_node_records_every_node_it_replaced():
    model = llama_decoder(layers=1)
    result = apply_pass(FUSE, model, ["/model/layers.0/post_attention_layernorm/Pow"], {})
    (skip,) = [n for n in result.model.graph.node
               if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert skip.name == "/model/layers.0/post_attention_layernorm/SkipSimplifiedLayerNormalization"
    scope = "/model/layers.0/post_attention_layernorm"
    assert set(provenance.get_origin(skip)) == {
        "/model/layers.0/Add", *(f"{scope}/{op}" for op in (
            "Cast", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Cast_1", "Mul_1"))}
    # every original node the fused one stands for is found from its name
    derived = provenance.derived_nodes(result.model)
    assert derived[f"{scope}/ReduceMean"] == [skip.name]


def test_the_rotary_caches_are_shared_and_the_unused_tables_removed():
    model = llama_decoder(layers=2)
    names = [n.name for n in model.graph.node if "_rot/" in n.name]
    result = apply_pass(FUSE, model, names, {"max_positions": 64, **NO_ATTENTION})
    rotary = [n for n in result.model.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(rotary) == 4 and len({(n.input[2], n.input[3]) for n in rotary}) == 1
    assert all(n.input[1] == "position_ids" for n in rotary)
    caches = {t.name: t for t in result.model.graph.initializer if t.name == rotary[0].input[2]}
    assert list(caches[rotary[0].input[2]].dims) == [64, 8]
    assert not [n for n in result.model.graph.node if n.op_type in ("Cos", "Sin")]
    _assert_same_outputs(model, result.model, llama_inputs(seq=3, past=60))


def test_only_the_named_layers_change():
    model = llama_decoder(layers=2)
    names = [n.name for n in model.graph.node if n.name.startswith("/model/layers.1/")]
    result = apply_pass(FUSE, model, names, {})
    untouched = [n.name for n in model.graph.node if n.name.startswith("/model/layers.0/")
                 and n.name != "/model/layers.0/Add_1"]  # the residual before layer 1's norm
    kept = {n.name for n in result.model.graph.node}
    assert set(untouched) <= kept
    # layer 1's last residual Add goes with the final norm after it
    assert _fused_ops(result.model) == {"SkipSimplifiedLayerNormalization": 3,
                                        "GroupQueryAttention": 1}
    _assert_same_outputs(model, result.model, llama_inputs())


def test_what_cannot_be_fused_is_refused_with_the_reason():
    mlp = small_mlp()
    reason = FUSE.check(mlp, mlp.graph.node[0])
    assert reason and "RMSNorm" in reason
    model = llama_decoder(layers=1)
    by_name = {n.name: n for n in model.graph.node}
    assert FUSE.check(model, by_name["/model/layers.0/self_attn/Softmax"]) is None
    assert FUSE.check(model, by_name["/model/layers.0/self_attn/Softmax"], NO_ATTENTION)
    assert FUSE.check(model, by_name["/model/layers.0/mlp/act_fn/Sigmoid"]) is None  # packed
    assert FUSE.check(model, by_name["/model/layers.0/mlp/act_fn/Sigmoid"],
                      {"pack": False}) is not None
    assert FUSE.check(model, by_name["/model/layers.0/input_layernorm/Pow"]) is None
    # a norm whose mean is not over the last axis is not an RMSNorm
    for node in model.graph.node:
        if node.name == "/model/layers.0/input_layernorm/ReduceMean":
            node.attribute[0].ints[:] = [1]
    reason = "layer 0 norm: the mean is over axes [1], not the last one (-1)"
    assert FUSE.check(model, by_name["/model/layers.0/input_layernorm/Pow"]) == reason
    result = FUSE.apply(model, ["/model/layers.0/input_layernorm/Pow"], {}, PassContext())
    assert result.applied == [] and result.skipped == {
        "/model/layers.0/input_layernorm/Pow": reason}


def test_an_attention_unit_is_its_block_and_the_lengths_are_computed_once():
    model = llama_decoder(layers=2)
    result = apply_pass(FUSE, model, [n.name for n in model.graph.node if "self_attn" in n.name],
                        {})
    gqa = [n for n in result.model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2
    assert len({(n.input[5], n.input[6]) for n in gqa}) == 1  # seqlens_k, total length shared
    assert [n.op_type for n in result.model.graph.node].count("ReduceSum") == 1
    assert gqa[0].input[3] == "past_key_values.0.key" and gqa[0].output[1] == "present.0.key"
    attrs = {a.name: a for a in gqa[0].attribute}
    assert attrs["num_heads"].i == 4 and attrs["kv_num_heads"].i == 2
    origins = set(provenance.get_origin(gqa[0]))
    a = "/model/layers.0/self_attn"
    assert {f"{a}/Softmax", f"{a}/q_rot/Neg", f"{a}/Concat_k", f"{a}/repeat_v/Expand"} <= origins
    assert f"{a}/q_proj/MatMul" not in origins  # the projections stay MatMuls (quantizable)
    for feeds in (llama_inputs(seq=1, past=20), llama_inputs(seq=5, past=0, seed=4)):
        _assert_same_outputs(model, result.model, feeds)


def test_a_recipe_quantizes_the_projections_of_the_fused_model():
    from opstudio.core.plan.optimize import optimize
    from opstudio.core.plan.recipe import Recipe, Step

    model = llama_decoder(layers=2)
    int8 = Step("int8-weight", {"accuracy_level": 4}, op_types=["MatMul"])
    fuse = Step("fuse", {}, op_types=["Pow", "Softmax"])
    result = optimize(model, Recipe([fuse, int8]))
    ops = Counter(n.op_type for n in result.model.graph.node)
    # q|k|v packed with the attention (the MLP was not named): 5 a layer + lm_head
    assert ops["GroupQueryAttention"] == 2 and ops["MatMulNBits"] == 11
    want, got = run_ort(model, llama_inputs()), run_ort(result.model, llama_inputs())
    assert (want[0][0].argmax(-1) == got[0][0].argmax(-1)).mean() >= 0.75
    # quantized first, the projections are no longer MatMuls by a weight: said so
    late = optimize(model, Recipe([int8, fuse]))
    reasons = late.steps[1].skipped
    assert "fuse before quantizing" in reasons["/model/layers.0/self_attn/Softmax"]


def test_check_leaves_the_model_alone():
    # the app asks check about the open model itself; its Constant nodes stay as they were
    model = llama_decoder(layers=1)
    before = model.SerializeToString()
    for node in model.graph.node[:20]:
        FUSE.check(model, node)
    assert model.SerializeToString() == before
