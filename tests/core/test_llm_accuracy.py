"""LLM accuracy: next-token top-1 agreement and KL divergence on logits, none on KV caches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from onnx import numpy_helper

from llm_builders import decoder_inputs, tiny_decoder
from opstudio.core.measure.accuracy import (
    compare_outputs,
    evaluate,
    mean_kl_divergence,
    output_kind,
)


def test_kl_divergence_of_known_distributions():
    p = np.log(np.array([[0.5, 0.5], [0.1, 0.9]]))
    q = np.log(np.array([[0.25, 0.75], [0.1, 0.9]]))
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.0) / 2
    assert mean_kl_divergence(p, q) == pytest.approx(expected, rel=1e-12)
    # softmax is shift-invariant; huge logits must not overflow
    assert mean_kl_divergence(p + 5000.0, q - 3000.0) == pytest.approx(expected, rel=1e-9)
    assert mean_kl_divergence(q, q) == 0.0


def test_kl_against_direct_formula_and_masked_tokens():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 5, 40)) * 3
    b = a + rng.normal(size=a.shape) * 0.5
    pa = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    pb = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    direct = float(np.mean(np.sum(pa * np.log(pa / pb), axis=-1)))
    assert mean_kl_divergence(a.astype(np.float32), b.astype(np.float32)) == pytest.approx(
        direct, rel=1e-5)
    # a token the reference masks out (-inf) contributes nothing
    a[..., 0] = -np.inf
    assert math.isfinite(mean_kl_divergence(a, b))
    # a token only the reference can emit makes the divergence infinite
    assert mean_kl_divergence(b, a) == math.inf


def test_logits_get_agreement_over_all_positions_and_kl():
    ref = np.zeros((2, 3, 1200), np.float32)
    new = np.zeros_like(ref)
    winners_ref = np.array([[1, 2, 3], [4, 5, 6]])
    winners_new = np.array([[1, 2, 3], [4, 9, 9]])  # 4 of 6 positions agree
    for i in range(2):
        for j in range(3):
            ref[i, j, winners_ref[i, j]] = 5.0
            new[i, j, winners_new[i, j]] = 5.0
    report = compare_outputs({"logits": ref, "output_0": ref, "last_hidden_state": ref},
                             {"logits": new, "output_0": new, "last_hidden_state": new})
    logits, unnamed, hidden = report.outputs
    assert logits.kind == "logits" and logits.top1_agreement == pytest.approx(4 / 6)
    assert logits.kl_divergence > 0
    # the vocabulary is recognised by width when the name says nothing
    assert unnamed.kind == "logits" and unnamed.kl_divergence == pytest.approx(logits.kl_divergence)
    assert hidden.kind == "" and hidden.kl_divergence is None
    nt = report.next_token()
    assert nt["outputs"] == ["logits", "output_0"]
    assert nt["top1_agreement"] == pytest.approx(4 / 6)
    assert report.summary().startswith("next-token agreement 0.67, KL ")
    assert report.summary().endswith("nats on logits, output_0")
    data = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert data["outputs"][0]["kl_divergence"] == pytest.approx(logits.kl_divergence)
    assert data["outputs"][0]["top1_agreement"] == pytest.approx(4 / 6)
    assert data["next_token"]["kl_divergence"] == pytest.approx(logits.kl_divergence)


@pytest.mark.parametrize("name", ["present.0.key", "present.3.value", "present_key_values.1",
                                  "key_cache", "past_value", "layer1/value"])
def test_kv_cache_outputs_get_no_top1_and_no_kl(name):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(1, 2, 3, 1024)).astype(np.float32)
    b = a + 0.1
    assert output_kind(name, a) == "kv_cache"
    (o,) = compare_outputs({name: a}, {name: b}).outputs
    assert o.top1_agreement is None and o.kl_divergence is None
    assert o.cosine is not None and o.max_abs_err == pytest.approx(0.1, rel=1e-4)
    assert compare_outputs({name: a}, {name: b}).summary() == ""


def test_small_classifier_output_keeps_top1_without_kl():
    ref = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    (o,) = compare_outputs({"y": ref}, {"y": ref[:, ::-1].copy()}).outputs
    assert o.kind == "" and o.top1_agreement == 0.0 and o.kl_divergence is None


def test_tiny_decoder_against_itself_agrees_fully():
    model = tiny_decoder()
    report = evaluate(model, model, decoder_inputs())
    logits, present = report.outputs
    assert logits.name == "logits" and logits.kind == "logits" and logits.shape == [1, 6, 32]
    assert logits.top1_agreement == 1.0 and logits.kl_divergence == 0.0
    assert present.kind == "kv_cache" and present.shape == [1, 2, 9, 4]
    assert present.top1_agreement is None and present.kl_divergence is None
    assert report.summary() == "next-token agreement 1.00, KL 0 nats on logits"


def test_tiny_decoder_with_perturbed_head_matches_numpy():
    before, after = tiny_decoder(), tiny_decoder(noise=0.5)
    inputs = decoder_inputs()
    report = evaluate(before, after, inputs)
    logits = report.outputs[0]
    # the same figures straight from the weights
    emb = numpy_helper.to_array(before.graph.initializer[0]).astype(np.float64)
    h = emb[inputs["input_ids"][0]]
    la = h @ numpy_helper.to_array(before.graph.initializer[2]).astype(np.float64)
    lb = h @ numpy_helper.to_array(after.graph.initializer[2]).astype(np.float64)
    pa = np.exp(la - la.max(-1, keepdims=True))
    pa /= pa.sum(-1, keepdims=True)
    pb = np.exp(lb - lb.max(-1, keepdims=True))
    pb /= pb.sum(-1, keepdims=True)
    assert logits.kl_divergence == pytest.approx(
        float(np.mean(np.sum(pa * np.log(pa / pb), -1))), rel=1e-4)
    assert logits.top1_agreement == pytest.approx(
        float(np.mean(la.argmax(-1) == lb.argmax(-1))))
    assert 0.0 < logits.top1_agreement < 1.0 and logits.kl_divergence > 0.01
    assert report.outputs[1].top1_agreement is None  # the KV output is untouched by the head
