"""fuse on the families beyond Llama: Mistral's and Gemma's sliding windows (through the mask),
Gemma 2's soft-capped scores, Gemma 3's q/k norms, Phi's partial rotary and LayerNorm, GPT-2's
c_attn split, learned positions and MHA. Each layer is fused with the same outputs, or refused
with its reason."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from family_builders import family_decoder, family_inputs
from model_builders import apply_pass, run_ort
from opstudio.core.passes import get_pass

FUSE = get_pass("fuse")
FEEDS = ((6, 0), (1, 9), (4, 5))  # prefill, decode past the windows, a chunk after a past


def _assert_same_logits(before, after, family, vocab=64):
    for seq, past in FEEDS:
        feeds = family_inputs(family, seq, past, vocab=vocab)
        want, got = run_ort(before, feeds), run_ort(after, feeds)
        for a, b in zip(want, got, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
        logits_a, logits_b = (x[0].reshape(-1, x[0].shape[-1]) for x in (want, got))
        cosine = (logits_a * logits_b).sum(-1) / np.linalg.norm(logits_a, axis=-1) / \
            np.linalg.norm(logits_b, axis=-1)
        assert cosine.min() >= 0.9999
        assert (logits_a.argmax(-1) == logits_b.argmax(-1)).all()


def _attention(model):
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            for n in model.graph.node if n.op_type == "GroupQueryAttention"]


@pytest.mark.parametrize("family,fused,attention", [
    # the window of each layer as local_window_size; Gemma 2's softcap kept
    ("mistral", {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4},
     [{"local_window_size": 3, "do_rotary": 1}, {"local_window_size": 5}]),
    ("gemma2", {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4},
     [{"local_window_size": 3, "softcap": 5.0}, {"softcap": 5.0}]),
    # the q/k norms stay as norms in front of the attention
    ("gemma3", {"SimplifiedLayerNormalization": 5, "SkipSimplifiedLayerNormalization": 4},
     [{"local_window_size": 3}, {}]),
    # rotary over 16 of 32 dims, inside the attention; LayerNorm with its residual
    ("phi", {"SkipLayerNormalization": 4}, [{"do_rotary": 1, "num_heads": 2}] * 2),
    ("gpt2", {"SkipLayerNormalization": 5}, [{"num_heads": 4, "kv_num_heads": 4}] * 2),
])
def test_each_family_fuses_every_layer_with_the_same_outputs(family, fused, attention):
    # Mistral's embedding is too large for the mask's probe to copy: it reads its shape only
    vocab = 1100 if family == "mistral" else 64
    model = family_decoder(family, vocab=vocab)
    result = apply_pass(FUSE, model, [n.name for n in model.graph.node], {"max_positions": 64})
    counts = Counter(n.op_type for n in result.model.graph.node)
    assert counts["GroupQueryAttention"] == 2
    assert {op: counts[op] for op in fused} == fused
    assert not [n for n in result.model.graph.node if n.op_type in ("Softmax", "Tanh", "Neg")]
    made = _attention(result.model)
    for want, got in zip(attention, made, strict=True):
        assert {k: got.get(k) for k in want} == want
        if "local_window_size" not in want:
            assert got.get("local_window_size", -1) == -1
    if family == "gpt2":
        assert all(not a.get("do_rotary") for a in made)
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    _assert_same_logits(model, result.model, family, vocab)


def test_an_attention_groupqueryattention_cannot_express_is_refused_per_layer():
    # rotary over 8 of 16 dims: GroupQueryAttention's rotary covers multiples of 16
    model = family_decoder("phi_narrow")
    by_name = {n.name: n for n in model.graph.node}
    reason = ("layer 1 attention: partial rotary over 8 of 16 dims: GroupQueryAttention "
              "rotates a multiple of 16 dims only")
    assert FUSE.check(model, by_name["/layers.1/attn/Softmax"], {"max_positions": 64}) == reason
    result = apply_pass(FUSE, model, [n.name for n in model.graph.node], {"max_positions": 64})
    assert result.skipped["/layers.1/attn/Softmax"] == reason
    assert f"not fused: {reason}" in result.notes
    # the rotary embeddings are still fused, each over its 8 dims
    rotary = [n for n in result.model.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(rotary) == 4
    assert all(onnx.helper.get_attribute_value(a) == 8 for n in rotary for a in n.attribute
               if a.name == "rotary_embedding_dim")
    _assert_same_logits(model, result.model, "phi_narrow")


def test_a_mask_that_is_not_causal_is_refused_with_the_reason():
    model = family_decoder("mistral")
    # a bias on the scores where the window mask had 0 (as ALiBi would): not a mask GQA applies
    for tensor in model.graph.initializer:
        if tensor.name == "/mask/zero_f3":
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.array(0.5, np.float32), tensor.name))
    by_name = {n.name: n for n in model.graph.node}
    assert FUSE.check(model, by_name["/layers.0/attn/Softmax"], {"max_positions": 64}) == (
        "layer 0 attention: its mask adds a bias to the scores (not only causal and padding)")
    assert FUSE.check(model, by_name["/layers.1/attn/Softmax"], {"max_positions": 64}) is None
