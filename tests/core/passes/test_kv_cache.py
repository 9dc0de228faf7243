"""kv-cache: GroupQueryAttention keeps its KV cache in int8 / packed int4 with calibrated scales."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, numpy_helper

from llm_builders import kv_decoder, llama_decoder, llama_inputs, prompt_inputs
from model_builders import apply_pass
from opstudio.core.measure.accuracy import evaluate
from opstudio.core.measure.inputs import make_inputs
from opstudio.core.model.runtime import create_session
from opstudio.core.passes import PassContext, get_pass

LAYERS, KV_HEADS, HEAD = 2, 2, 16


def _gqa_nodes(model):
    return [n.name for n in model.graph.node if n.op_type == "GroupQueryAttention"]


def _quantized(bits, prompt):
    model = kv_decoder("gqa", layers=LAYERS)
    result = get_pass("kv-cache").apply(model, _gqa_nodes(model), {"bits": bits},
                                        PassContext(inputs=[prompt]))
    return model, result


def _teacher_forced_argmax(model, tokens, prefill, cache_dtype):
    """Argmax of the next token after the prompt's first ``prefill`` tokens, then after each
    following token fed one at a time with the cache the model itself returned."""
    session = create_session(model)
    width = HEAD // 2 if cache_dtype == np.uint8 else HEAD
    zero = 0x88 if cache_dtype == np.uint8 else 0
    past = {f"past_key_values.{i}.{kind}": np.full((1, KV_HEADS, 0, width), zero, cache_dtype)
            for i in range(LAYERS) for kind in ("key", "value")}
    names = [o.name for o in session.get_outputs()]
    picks = []
    start, end = 0, prefill
    while end <= tokens.shape[1]:
        outs = dict(zip(names, session.run(None, {
            "input_ids": tokens[:, start:end], "attention_mask": np.ones((1, end), np.int64),
            **past})))
        picks.append(int(outs["logits"][0, -1].argmax()))
        past = {k: outs[k.replace("past_key_values", "present")] for k in past}
        start, end = end, end + 1
    return np.array(picks), past


def _prompt(tokens):
    return {"input_ids": tokens, "attention_mask": np.ones(tokens.shape, np.int64),
            **{f"past_key_values.{i}.{kind}": np.zeros((1, KV_HEADS, 0, HEAD), np.float32)
               for i in range(LAYERS) for kind in ("key", "value")}}


def _decoded(codes, scale, bits):
    """The float keys/values a cache of ``codes`` holds (int4: two codes per byte, offset 8)."""
    if bits == 4:
        codes = np.stack([(codes & 15).astype(np.int16) - 8, (codes >> 4).astype(np.int16) - 8],
                         axis=-1).reshape(*codes.shape[:-1], -1)
    return codes.astype(np.float32) * scale.reshape(1, KV_HEADS, 1, HEAD)


@pytest.mark.parametrize("bits, dtype", [(8, np.int8), (4, np.uint8)])
def test_the_cache_runs_quantized_in_prefill_and_decode(bits, dtype):
    tokens = prompt_inputs(48)["input_ids"]
    model, result = _quantized(bits, _prompt(tokens[:, :16]))
    assert sorted(result.applied) == sorted(_gqa_nodes(model)) and not result.skipped
    ref, ref_past = _teacher_forced_argmax(model, tokens, 16, np.float32)
    got, past = _teacher_forced_argmax(result.model, tokens, 16, dtype)
    assert all(v.dtype == dtype and v.shape[-1] == (HEAD if bits == 8 else HEAD // 2)
               for v in past.values())
    # every cached key and value is the float one to half a quantization step (past the
    # calibration prompt a value may exceed the calibrated range: those saturate)
    scales = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer
              if t.name.endswith("_scale")}
    name = "/model/layers.0/attn/GroupQueryAttention/k_scale"
    near = np.abs(_decoded(past["past_key_values.0.key"], scales[name], bits)
                  - ref_past["past_key_values.0.key"]) <= scales[name].reshape(
                      1, KV_HEADS, 1, HEAD) * 0.5 + 1e-4
    assert near[:, :, :16].all() and near.mean() > 0.95
    if bits == 8:  # the next token is fp32's on most positions
        assert np.mean(ref == got) >= 0.75, (ref, got)
    per_token = LAYERS * 2 * KV_HEADS * HEAD
    assert f"KV cache bytes per token: {per_token * 4} → {per_token * bits // 8}" in result.notes
    assert any("int8" in n if bits == 8 else "int4" in n for n in result.notes)
    for name in ("past_key_values.0.key", "present.1.value"):
        info = next(v for v in [*result.model.graph.input, *result.model.graph.output]
                    if v.name == name)
        assert info.type.tensor_type.elem_type == (TensorProto.INT8 if bits == 8
                                                   else TensorProto.UINT8)


def test_the_scales_follow_the_calibration_prompt():
    prompt = _prompt(prompt_inputs(12)["input_ids"])
    _, result = _quantized(8, prompt)
    scales = {t.name: t for t in result.model.graph.initializer if t.name.endswith("_scale")}
    assert len(scales) == 2 * LAYERS
    assert all(list(t.dims) == [KV_HEADS * HEAD] for t in scales.values())
    # the largest cached value is 127 codes: the prompt's present, read back, saturates once
    session = create_session(result.model)
    outs = session.run(None, {k: (np.zeros((1, KV_HEADS, 0, HEAD), np.int8)
                                  if k.startswith("past") else v) for k, v in prompt.items()})
    assert max(int(np.abs(v).max()) for v in outs[1:]) == 127


def test_decode_feeds_and_accuracy_follow_the_quantized_cache():
    shared = make_inputs(kv_decoder("gqa", layers=LAYERS), phase="prefill")
    _, result = _quantized(8, shared)
    feeds = make_inputs(result.model, phase="decode", past=32)
    assert feeds["past_key_values.0.key"].dtype == np.int8
    assert feeds["past_key_values.0.key"].shape == (1, KV_HEADS, 32, HEAD)
    create_session(result.model).run(None, feeds)
    # one float feed for both: its empty past is the same cache in int8
    report = evaluate(kv_decoder("gqa", layers=LAYERS), result.model, shared)
    assert [o.name for o in report.outputs] == ["logits"]
    assert report.next_token()["top1_agreement"] >= 0.75


def test_int4_synthetic_past_is_zero():
    _, result = _quantized(4, prompt_inputs(8))
    feeds = make_inputs(result.model, phase="decode", past=4)
    assert feeds["past_key_values.0.key"].dtype == np.uint8
    assert feeds["past_key_values.0.key"].shape == (1, KV_HEADS, 4, HEAD // 2)
    assert (feeds["past_key_values.0.key"] == 0x88).all()


def test_a_fused_hf_decoder_quantizes_its_cache():
    model = llama_decoder(layers=LAYERS)
    fused = apply_pass(get_pass("fuse"), model, [n.name for n in model.graph.node
                                                  if n.op_type in ("Pow", "Neg")], {}).model
    feeds = llama_inputs(past=0, layers=LAYERS)
    result = apply_pass(get_pass("kv-cache"), fused, _gqa_nodes(fused), {"bits": 8})
    assert len(result.applied) == LAYERS
    report = evaluate(fused, result.model, feeds)
    assert report.next_token()["top1_agreement"] >= 0.75


def test_other_nodes_are_refused_with_the_reason():
    kv = get_pass("kv-cache")
    model = llama_decoder(layers=1)
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    assert "fuse the attention first" in kv.check(model, matmul)
    _, result = _quantized(8, prompt_inputs(8))
    node = next(n for n in result.model.graph.node if n.op_type == "GroupQueryAttention")
    assert kv.check(result.model, node) == "its KV cache is already quantized"


def test_compare_times_the_float_and_the_quantized_cache_on_one_feed(tmp_path):
    from opstudio.core.measure.compare import compare_models
    from opstudio.core.measure.profiler import ProfileSettings

    model = kv_decoder("gqa", layers=LAYERS)
    _, result = _quantized(8, prompt_inputs(8))
    comparison = compare_models(model, result.model,
                                ProfileSettings(runs=2, warmup=1, phase="decode", past=16))
    assert comparison.before.total_ms["p50"] > 0 and comparison.after.total_ms["p50"] > 0
    assert [o.name for o in comparison.accuracy.outputs] == ["logits"]
