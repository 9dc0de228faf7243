"""A request's time from a prefill and decode steps: estimate on synthetic rounds (linear decode
cost), before/after ratios, the inputs of each kind of run, and the timing on a tiny decoder."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from llm_builders import kv_decoder
from opstudio.core.errors import OpstudioError
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.measure.request import (
    check_request,
    compare_requests,
    decode_pasts,
    estimate,
    estimate_requests,
    request_inputs,
    require_kv_cache,
    step_weights,
)
from opstudio.core.model.model_io import save_model


def linear_rounds(prompt, generate, rounds=30, prefill=800.0, base=20.0, per_past=0.01,
                  noise=0.0, seed=0):
    """Timed rounds of a model whose decode step costs base + per_past·past ms."""
    rng = np.random.default_rng(seed)

    def jitter():
        return 1.0 + noise * rng.standard_normal(rounds)

    pre = prefill * jitter()
    dec = {p: (base + per_past * p) * jitter() for p in decode_pasts(prompt, generate)}
    return pre, dec


def test_linear_decode_cost_is_summed_exactly():
    P, G = 128, 128
    pre, dec = linear_rounds(P, G)
    r = estimate(pre, dec, P, G)
    steps = [20.0 + 0.01 * past for past in range(P, P + G - 1)]  # pasts P … P+G−2
    assert r.ttft_ms == pytest.approx(800.0)
    assert r.decode_ms == pytest.approx(np.mean(steps))
    assert r.total_ms == pytest.approx(800.0 + sum(steps))
    assert r.tokens_per_s == pytest.approx(1000.0 / np.mean(steps))
    assert r.decode_at_ms == pytest.approx({128: 21.28, 256: 22.56})
    assert (r.rounds, r.disturbed) == (30, 0)


def test_one_generated_token_is_the_prefill_alone():
    pre, dec = linear_rounds(64, 1)
    r = estimate(pre, dec, 64, 1)
    assert r.total_ms == pytest.approx(r.ttft_ms)
    # the rate still says what the next token would cost: the step after the prompt
    assert r.decode_ms == pytest.approx(20.0 + 0.01 * 64)


def test_step_weights_interpolate_between_the_timed_pasts():
    w = step_weights([10, 20], 10, 11)  # steps at pasts 10 … 19
    assert w.sum() == pytest.approx(1.0)
    assert w @ np.array([1.0, 2.0]) == pytest.approx(np.mean(1 + np.arange(10) / 10))
    # three timed pasts, a bend in the middle: still the mean over the steps
    w3 = step_weights([0, 5, 10], 0, 11)
    d = np.array([0.0, 5.0, 15.0])
    exact = np.mean([np.interp(p, [0, 5, 10], d) for p in range(10)])
    assert w3 @ d == pytest.approx(exact)


def test_intervals_come_from_the_rounds_and_a_disturbed_round_is_left_out():
    P, G = 32, 16
    pre, dec = linear_rounds(P, G, rounds=40, noise=0.02, seed=1)
    pre[7] *= 5  # another process woke up during round 7's prefill
    dec[48][20] *= 3  # and during round 20's decode step
    r = estimate(pre, dec, P, G)
    assert r.disturbed == 2 and r.rounds == 40
    for value, (lo, hi) in ((r.ttft_ms, r.ttft_ci), (r.decode_ms, r.decode_ci),
                            (r.total_ms, r.total_ci)):
        assert lo <= value <= hi and hi - lo < 0.05 * value
    assert r.ttft_ms == pytest.approx(800.0, rel=0.02)
    lo, hi = r.tokens_per_s_ci
    assert lo <= r.tokens_per_s <= hi
    text = r.describe()
    assert text.startswith("time to first token ") and "tokens/s" in text
    assert f"a request of {P}+{G} tokens: " in text
    data = r.to_json()
    assert data["ttft_ci"][0] <= data["ttft_ms"] <= data["ttft_ci"][1]
    assert set(data["decode_at_ms"]) == {"32", "48"}


def test_before_after_ratios_pair_the_rounds():
    P, G = 64, 64
    pre, dec = linear_rounds(P, G, noise=0.03, seed=2)
    before = estimate(pre, dec, P, G)
    # twice as fast to the first token, 1.5× in decode, the same rounds' noise
    after = estimate(pre / 2, {p: v / 1.5 for p, v in dec.items()}, P, G)
    c = compare_requests(before, after)
    assert c.ttft.median == pytest.approx(2.0) and c.ttft.significant
    assert c.decode.median == pytest.approx(1.5) and c.decode.label() == "1.50×"
    assert 1.5 < c.total.median < 2.0
    assert after.tokens_per_s == pytest.approx(1.5 * before.tokens_per_s)
    # the same model measured twice: no finding
    again = estimate(*linear_rounds(P, G, noise=0.03, seed=3), P, G)
    same = compare_requests(before, again)
    assert same.total.label() == "≈ 1×" and not same.total.significant
    data = c.to_json()
    assert data["speedup"]["ttft"]["label"] == "2.00×"
    assert {"before", "after", "prompt", "generate"} <= set(data)


def test_bad_lengths_and_a_model_without_a_kv_cache_are_refused():
    for bad in (0, -3, True, 1.5):
        with pytest.raises(OpstudioError, match="whole number of tokens"):
            check_request(bad, 8)
    with pytest.raises(OpstudioError, match="--generate"):
        check_request(8, 0)
    with pytest.raises(OpstudioError, match="whole number"):
        ProfileSettings(request=True, request_prompt=0).validate(check_provider=False)
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])])
    with pytest.raises(OpstudioError, match="no past key/value"):
        require_kv_cache(helper.make_model(g))


def test_inputs_of_each_run_have_the_request_lengths():
    model = kv_decoder("gqa", head_dim_name="kv_cache_dim")
    feeds = request_inputs(model, 12, 5, dims={"past_sequence_length": 99})
    assert list(feeds) == ["prefill", "decode@12", "decode@17"]
    assert feeds["prefill"]["input_ids"].shape == (1, 12)
    assert feeds["prefill"]["past_key_values.0.key"].shape == (1, 2, 0, 16)
    assert feeds["decode@12"]["input_ids"].shape == (1, 1)
    assert feeds["decode@12"]["past_key_values.1.value"].shape == (1, 2, 12, 16)
    assert feeds["decode@17"]["attention_mask"].shape == (1, 18)


def test_timed_on_a_tiny_decoder(tmp_path):
    path = tmp_path / "kv.onnx"
    save_model(kv_decoder("gqa"), path)
    settings = ProfileSettings(runs=4, warmup=1, threads=1, request=True, request_prompt=16,
                               request_generate=8)
    before, after = estimate_requests([path, path], settings)
    for r in (before, after):
        assert r.rounds == 4 and (r.prompt, r.generate) == (16, 8)
        assert 0 < r.ttft_ms < r.total_ms
        assert set(r.decode_at_ms) == {16, 24}
        # each round's request: its prefill and 7 steps
        np.testing.assert_allclose(r.total_series, np.asarray(r.ttft_series)
                                   + 7 * np.asarray(r.decode_series))
    c = compare_requests(before, after)
    assert c.total is not None and c.total.rounds <= 4
