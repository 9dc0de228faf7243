"""The greedy plan and its back-off, on candidates with known sensitivities."""

import math

import pytest

from opstudio.core.errors import OpstudioError
from opstudio.core.plan.advisor import Budget, Verification, greedy_plan, recipe_for
from opstudio.core.plan.sensitivity import Candidate


def cand(node, technique, before, after, snr, op_type="MatMul", error=None):
    cos = 1 - 10 ** (-snr / 10) / 2 if snr is not None and not math.isinf(snr) else 1.0
    return Candidate(node=node, op_type=op_type, technique=technique, params={},
                     before_ms=before, after_ms=after, cosine=cos, snr_db=snr, error=error)


def additive_verifier(cands):
    """The true combined error is the sum of noise ratios (what the prediction assumes)."""
    by_key = {(c.node, c.technique): c for c in cands}

    def verify(recipe):
        noise = sum(by_key[(n, s.technique)].noise_ratio for s in recipe.steps for n in s.nodes)
        snr = math.inf if noise == 0 else -10 * math.log10(noise)
        return Verification(1 - noise / 2, snr)

    return verify


def test_picks_best_gain_per_error_and_one_technique_per_node():
    cands = [
        cand("a", "int8-dynamic", 1.0, 0.5, 40),   # gain 0.5, noise 1e-4
        cand("a", "int4-weight", 1.0, 0.3, 25),    # gain 0.7, noise 3.2e-3
        cand("b", "int8-dynamic", 2.0, 1.0, 45),   # gain 1.0, noise 3.2e-5
        cand("c", "lowrank", 1.0, 0.9, 20),        # gain 0.1, noise 1e-2
    ]
    plan = greedy_plan(cands, Budget(min_snr_db=30), additive_verifier(cands))
    picked = {(c.node, c.technique) for c in plan.chosen}
    assert picked == {("a", "int8-dynamic"), ("b", "int8-dynamic")}
    assert plan.verified.snr_db >= 30
    # c alone breaks the budget; a/int4 loses to a/int8 on gain per error
    assert "alone" in plan.rejected["c/lowrank"]
    assert plan.recipe.steps[0].technique == "int8-dynamic"
    assert sorted(plan.recipe.steps[0].nodes) == ["a", "b"]


def test_slower_or_unmeasured_candidates_are_rejected_with_reasons():
    cands = [
        cand("a", "int8-dynamic", 0.1, 0.2, 50),            # slower
        cand("b", "fp16", 1.0, None, None, error="no kernel"),
        cand("c", "int8-dynamic", 1.0, 0.99, 60),          # 1 % gain: noise level
    ]
    plan = greedy_plan(cands, Budget(min_cosine=0.99), additive_verifier(cands))
    assert plan.chosen == []
    assert "not faster" in plan.rejected["a/int8-dynamic"]
    assert plan.rejected["b/fp16"] == "no kernel"
    assert "not faster" in plan.rejected["c/int8-dynamic"]


def test_predicted_budget_limits_the_greedy_choice():
    # each alone fits 30 dB (noise 5.0e-4 against a budget of 1e-3), two already predict 1.002e-3
    cands = [cand(f"n{i}", "int8-dynamic", 1.0, 0.5 - i * 0.01, 33) for i in range(5)]
    plan = greedy_plan(cands, Budget(min_snr_db=30), additive_verifier(cands))
    noise = sum(c.noise_ratio for c in plan.chosen)
    assert noise <= 10 ** (-30 / 10)
    assert len(plan.chosen) == 1
    assert plan.chosen[0].node == "n4"  # the largest gain among equal errors


def test_back_off_when_errors_compound():
    cands = [cand(f"n{i}", "int8-dynamic", 1.0, 0.5, 50 - i) for i in range(4)]

    # the real model amplifies errors: combined noise is 30x the sum
    def compounding(recipe):
        by_node = {c.node: c for c in cands}
        noise = 30 * sum(by_node[n].noise_ratio for s in recipe.steps for n in s.nodes)
        return Verification(1 - noise / 2, -10 * math.log10(noise))

    calls = []

    def verify(recipe):
        calls.append(sum(len(s.nodes) for s in recipe.steps))
        return compounding(recipe)

    plan = greedy_plan(cands, Budget(min_snr_db=30), verify)
    assert calls[0] == 4 and calls == sorted(calls, reverse=True)  # one rewrite dropped per step
    assert plan.verified.snr_db >= 30
    assert any(line.startswith("back-off") for line in plan.log)
    # the dropped ones were the least efficient (smallest SNR = largest noise)
    kept = {c.node for c in plan.chosen}
    dropped = {c.node for c in cands} - kept
    assert max(c.snr_db for c in cands if c.node in dropped) <= min(
        c.snr_db for c in cands if c.node in kept)


def test_budget_validation():
    with pytest.raises(OpstudioError):
        Budget()
    with pytest.raises(OpstudioError):
        Budget(min_cosine=0.9, min_snr_db=20)
    with pytest.raises(OpstudioError):
        Budget(min_cosine=1.5)
    assert Budget(min_snr_db=20).max_noise_ratio == pytest.approx(0.01)
    assert Budget(min_cosine=0.999).max_noise_ratio == pytest.approx(0.002)
    with pytest.raises(OpstudioError, match="confidence"):
        Budget(min_top1=0.9, confidence=1.0)


def test_a_next_token_budget_holds_by_its_confidence_bound():
    from opstudio.core.measure.accuracy import agreement_low

    sure, plain = Budget(min_top1=0.9), Budget(min_top1=0.9, confidence=0.5)
    # 0.92 measured on 50 positions could well be 0.88 on the next text; on 2000 it could not
    assert not sure.holds_next_token(0.92, None, positions=50)
    assert sure.holds_next_token(0.92, None, positions=2000)
    assert plain.holds_next_token(0.92, None, positions=50)
    assert plain.holds_next_token(0.90, None, positions=50)
    # the count unknown: the measured value
    assert sure.holds_next_token(0.92, None)
    # the Wilson bound: below the share, closer with more positions, 1 is not certain
    assert agreement_low(0.92, 50, 0.9) < agreement_low(0.92, 500, 0.9) < 0.92
    assert agreement_low(1.0, 12, 0.9) == pytest.approx(1 / (1 + 1.2816 ** 2 / 12), abs=1e-3)
    # KL: the mean plus z standard errors
    kl = Budget(max_kl=0.05)
    assert kl.holds_next_token(None, 0.04, positions=100, kl_se=0.005)
    assert not kl.holds_next_token(None, 0.04, positions=100, kl_se=0.01)
    assert "90% confidence" in sure.describe() and "confidence" not in plain.describe()
    assert sure.to_json()["confidence"] == 0.9 and "confidence" not in Budget(
        min_cosine=0.99).to_json()


def test_recipe_groups_by_technique_in_safe_order():
    cands = [cand("a", "int8-dynamic", 1, 0.5, 40), cand("b", "lowrank", 1, 0.5, 40),
             cand("c", "int8-dynamic", 1, 0.5, 40)]
    recipe = recipe_for(cands)
    assert [s.technique for s in recipe.steps] == ["lowrank", "int8-dynamic"]
    assert recipe.steps[1].nodes == ["a", "c"]


def test_a_node_is_upgraded_to_the_technique_that_saves_more_within_budget():
    # fp16 is nearly exact but saves almost nothing; int8 saves much more and still fits
    cands = [cand("a", "fp16", 1.0, 0.9, 80), cand("a", "int8-dynamic", 1.0, 0.3, 40)]
    plan = greedy_plan(cands, Budget(min_snr_db=30), additive_verifier(cands))
    assert [(c.node, c.technique) for c in plan.chosen] == [("a", "int8-dynamic")]
    assert "saves more" in plan.rejected["a/fp16"]


def test_no_upgrade_past_the_budget():
    cands = [cand("a", "fp16", 1.0, 0.9, 80), cand("b", "int8-dynamic", 1.0, 0.5, 31),
             cand("a", "int8-dynamic", 1.0, 0.3, 31)]
    plan = greedy_plan(cands, Budget(min_snr_db=30), additive_verifier(cands))
    picked = {(c.node, c.technique) for c in plan.chosen}
    # a/int8 (the best gain per error) upgrades a; a second int8 at 31 dB would predict 28 dB
    assert picked == {("a", "int8-dynamic")}
    assert "over budget" in plan.rejected["b/int8-dynamic"]
    assert sum(c.noise_ratio for c in plan.chosen) <= Budget(min_snr_db=30).max_noise_ratio


def test_savings_are_discounted_to_what_the_whole_model_gained():
    from opstudio.core.plan.sensitivity import end_to_end

    assert end_to_end(model_gain_ms=1.0, node_gain_ms=2.0) == 0.5  # costs landed elsewhere
    assert end_to_end(model_gain_ms=-0.3, node_gain_ms=2.0) == 0.0  # the model got slower
    assert end_to_end(model_gain_ms=5.0, node_gain_ms=2.0) == 1.0  # never scaled up
    c = cand("a", "fp16", 1.0, 0.5, 80)
    c.discount = 0.0
    plan = greedy_plan([c], Budget(min_snr_db=30), additive_verifier([c]))
    assert plan.chosen == [] and "not faster" in plan.rejected["a/fp16"]


def test_fill_adds_back_what_the_measurement_allows():
    # the prediction (sum of noise ratios) keeps the third rewrite out, but the measured errors
    # partly cancel: the fill step measures it and keeps it
    cands = [cand(f"n{i}", "int8-dynamic", 1.0, 0.5, 33) for i in range(3)]

    def cancelling(recipe):
        n = sum(len(s.nodes) for s in recipe.steps)
        noise = 10 ** -3.3 * n / 2.5
        return Verification(1 - noise / 2, -10 * math.log10(noise))

    plan = greedy_plan(cands, Budget(min_snr_db=30), cancelling)
    assert len(plan.chosen) == 3
    assert any(line.startswith("fill:") for line in plan.log)
    assert plan.verified.snr_db >= 30


def test_savings_below_a_percent_of_the_run_are_not_worth_any_error():
    c = cand("a", "fp16", 0.2, 0.1, 80)  # halves its node, but the run takes 20 ms
    plan = greedy_plan([c], Budget(min_snr_db=30), additive_verifier([c]), run_ms=20.0)
    assert plan.chosen == [] and "not faster" in plan.rejected["a/fp16"]
    plan = greedy_plan([c], Budget(min_snr_db=30), additive_verifier([c]), run_ms=2.0)
    assert [x.node for x in plan.chosen] == ["a"]


def ratio_timer(step_ratios):
    """A timer that says how much faster the model is with each technique's step: with/without
    time ratios per technique, their product over the steps that differ."""
    from opstudio.core.measure.timing import Ratio

    calls = []

    def timer(a, b):
        calls.append((a, b))
        in_a = {s.technique for s in a.steps}
        in_b = {s.technique for s in b.steps}
        r = 1.0
        for t in in_a - in_b:
            r *= step_ratios[t]
        return Ratio(r, r - 0.01, r + 0.01, 30)

    timer.calls = calls
    return timer


def test_steps_the_whole_model_is_not_faster_with_are_dropped():
    # per-node profiles promised savings from fp16, but timed end to end the model is not
    # faster with it; int8 pays. Only int8 stays, and the log says why.
    cands = [cand("a", "int8-dynamic", 2.0, 1.0, 45), cand("b", "fp16", 2.0, 1.5, 80)]
    timer = ratio_timer({"int8-dynamic": 0.7, "fp16": 1.02})
    plan = greedy_plan(cands, Budget(min_snr_db=30), additive_verifier(cands), timer=timer)
    assert [(c.node, c.technique) for c in plan.chosen] == [("a", "int8-dynamic")]
    assert "not measurably faster" in plan.rejected["b/fp16"]
    assert any(line.startswith("timing: dropped fp16") for line in plan.log)
    assert len(timer.calls) == 2  # one timing per step
    assert plan.verified.snr_db >= 30  # the smaller plan was verified again


def test_a_single_step_plan_is_timed_against_the_original_model():
    cands = [cand("a", "fp16", 2.0, 1.5, 80)]
    timer = ratio_timer({"fp16": 0.999})  # within noise of the original: not worth it
    plan = greedy_plan(cands, Budget(min_snr_db=30), additive_verifier(cands), timer=timer)
    assert plan.chosen == [] and plan.recipe.steps == []
    (a, b), = timer.calls
    assert [s.technique for s in a.steps] == ["fp16"] and b.steps == []


def test_variants_of_one_technique_are_chosen_per_node_by_accuracy():
    # both INT8 variants save the same; per channel is more accurate on one node, per tensor
    # on the other: the plan takes the better one for each node, in two steps
    def variant(node, per_channel, snr):
        c = cand(node, "int8-dynamic", 2.0, 1.0, snr)
        c.params = {"per_channel": per_channel}
        c.variant = f"per_channel={'true' if per_channel else 'false'}"
        return c

    cands = [variant("a", False, 45), variant("a", True, 48),
             variant("b", False, 50), variant("b", True, 44)]
    plan = greedy_plan(cands, Budget(min_snr_db=30), additive_verifier(cands))
    assert {(c.node, c.params["per_channel"]) for c in plan.chosen} == {("a", True), ("b", False)}
    assert sorted((s.params["per_channel"], s.nodes) for s in plan.recipe.steps) == [
        (False, ["b"]), (True, ["a"])]
    assert "per_channel=true" in cands[1].key
    assert "is chosen for this node" in plan.rejected["a/int8-dynamic (per_channel=false)"]


def test_an_upgrade_must_save_clearly_more_than_noise():
    exact = cand("a", "fp16", 2.0, 1.0, 90)
    barely = cand("a", "int8-dynamic", 2.0, 0.99, 40)  # 0.01 ms more: noise, not worth 40 dB
    plan = greedy_plan([exact, barely], Budget(min_snr_db=30), additive_verifier([exact, barely]))
    assert [c.technique for c in plan.chosen] == ["fp16"]


def test_scan_entries_name_variants_by_what_differs():
    from opstudio.core.plan.sensitivity import scan_entries

    entries = scan_entries({"int8-dynamic": [{"per_channel": False}, {"per_channel": True}],
                            "fp16": {}})
    assert entries == [("int8-dynamic", {"per_channel": False}, "per_channel=false"),
                       ("int8-dynamic", {"per_channel": True}, "per_channel=true"),
                       ("fp16", {}, "")]


def test_small_savings_are_tried_together_and_kept_when_the_model_is_faster():
    # ten nodes that each save less than their noise margin: alone none is worth any error,
    # together the model is measurably faster and the budget holds
    cands = [cand(f"n{i}", "int8-dynamic", 0.1, 0.097, 50) for i in range(10)]
    timer = ratio_timer({"int8-dynamic": 0.8})
    plan = greedy_plan(cands, Budget(min_snr_db=30), additive_verifier(cands), timer=timer)
    assert len(plan.chosen) == 10
    assert any(line.startswith("sweep: with 10 small") for line in plan.log)
    assert plan.verified.snr_db >= 30

    slower = ratio_timer({"int8-dynamic": 1.0})
    plan = greedy_plan(cands, Budget(min_snr_db=30), additive_verifier(cands), timer=slower)
    assert plan.chosen == []
    assert "not faster enough" in plan.rejected["n0/int8-dynamic"]


def test_variants_that_save_the_same_within_noise_are_decided_by_accuracy():
    # per channel measured 0.35 ms less saving (noise: same kernels) but is 1.7 dB more
    # accurate; without pooling, per tensor would take the node as "saving more"
    tensor = cand("a", "int8-dynamic", 3.5, 1.7, 45.7)
    tensor.params, tensor.variant = {"per_channel": False}, "per_channel=false"
    channel = cand("a", "int8-dynamic", 3.5, 2.05, 47.4)
    channel.params, channel.variant = {"per_channel": True}, "per_channel=true"
    plan = greedy_plan([tensor, channel], Budget(min_snr_db=30),
                       additive_verifier([tensor, channel]))
    assert [c.params for c in plan.chosen] == [{"per_channel": True}]


def _variant_cands(snr_tensor, snr_channel):
    out = []
    for node in ("a", "b"):
        for per_channel, snr in ((False, snr_tensor), (True, snr_channel)):
            c = cand(node, "int8-dynamic", 2.0, 1.0, snr)
            c.params = {"per_channel": per_channel}
            c.variant = f"per_channel={'true' if per_channel else 'false'}"
            out.append(c)
    return out


def _variant_model(cands, per_channel_cost):
    """A model where each INT8 node saves 1 ms and a per-channel node costs ``per_channel_cost``
    ms more: a timer and a verifier that know the variants apart."""
    from opstudio.core.measure.timing import Ratio

    by_key = {(c.node, c.params["per_channel"]): c for c in cands}
    calls = []

    def nodes(recipe):
        return [(n, s.params["per_channel"]) for s in recipe.steps for n in s.nodes]

    def time_of(recipe):
        return 10.0 - sum(1.0 - per_channel_cost * pc for _, pc in nodes(recipe))

    def timer(a, b):
        calls.append((a, b))
        r = time_of(a) / time_of(b)
        return Ratio(r, r - 0.005, r + 0.005, 100)

    def verify(recipe):
        noise = sum(by_key[key].noise_ratio for key in nodes(recipe))
        return Verification(1 - noise / 2, math.inf if noise == 0 else -10 * math.log10(noise))

    timer.calls = calls
    return timer, verify


def test_a_variant_that_runs_the_whole_model_faster_replaces_the_more_accurate_one():
    # per channel is more accurate on both nodes, so it ranks first; timed end to end the
    # per-tensor plan is 3 % faster and still within budget: the plan switches
    cands = _variant_cands(snr_tensor=44, snr_channel=47)
    timer, verify = _variant_model(cands, per_channel_cost=0.15)
    plan = greedy_plan(cands, Budget(min_snr_db=30), verify, timer=timer)
    assert {(c.node, c.params["per_channel"]) for c in plan.chosen} == {("a", False),
                                                                         ("b", False)}
    assert any(line.startswith("variants: int8-dynamic ×2 as (per_channel=false)")
               for line in plan.log)
    assert "runs the whole model measurably faster" in \
        plan.rejected["a/int8-dynamic (per_channel=true)"]
    assert plan.verified.snr_db == pytest.approx(-10 * math.log10(2 * 10 ** -4.4))

    # the same speed: accuracy keeps per channel
    timer, verify = _variant_model(cands, per_channel_cost=0.0)
    plan = greedy_plan(cands, Budget(min_snr_db=30), verify, timer=timer)
    assert {c.params["per_channel"] for c in plan.chosen} == {True}

    # faster, but the per-tensor plan breaks the budget: per channel stays
    timer, verify = _variant_model(cands, per_channel_cost=0.15)
    plan = greedy_plan(cands, Budget(min_snr_db=43.5), verify, timer=timer)
    assert {c.params["per_channel"] for c in plan.chosen} == {True}
    assert any("variants:" in line and "SNR 40.9" in line for line in plan.log)


def sensitivity(candidates, refused=None):
    from opstudio.core.measure.profiler import Profile
    from opstudio.core.plan.sensitivity import Sensitivity

    return Sensitivity(baseline=Profile.from_json(BASELINE), candidates=candidates,
                       refused=refused or {})


BASELINE = {"model": "m.onnx", "settings": {}, "total_ms": {"mean": 1.0, "p50": 1.0},
            "nodes": [], "op_types": []}


def test_nothing_applies_groups_refusals_and_failures_with_counts():
    refused = {"int4-weight": {
        "/model/layers.0/mlp/MatMul": "its weight 'w0' is a graph input, not a constant initializer",
        "/model/layers.1/mlp/MatMul": "its weight 'w1' is a graph input, not a constant initializer"}}
    failed = [cand(f"mm{i}", "int8-dynamic", 1.0, None, None,
                   error=f"step 1 (int8-dynamic): node 'mm{i}' (MatMul) cannot take int8-dynamic: "
                         f"its weight 'w{i}' is a graph input")
              for i in range(3)]
    failed.append(cand("mm0", "lowrank", 1.0, None, None,
                       error="step 1 (lowrank): the result is not a valid ONNX model (bad)"))
    why = sensitivity(failed, refused).why_nothing_applies()
    assert why == ("6 tries — int8-dynamic: its weight '…' is a graph input ×3 | int4-weight: "
                   "its weight '…' is a graph input, not a constant initializer ×2 | lowrank: "
                   "the result is not a valid ONNX model (bad)")
    # the reasons survive the cache's JSON round trip
    from opstudio.core.plan.sensitivity import Sensitivity

    again = Sensitivity.from_json(sensitivity(failed, refused).to_json())
    assert again.why_nothing_applies() == why


def test_nothing_applies_is_none_when_any_candidate_was_applied():
    applied = cand("mm0", "int8-dynamic", 1.0, 0.99, 40.0)  # applied, just not worth it
    refused = {"int4-weight": {"mm0": "no"}}
    assert sensitivity([applied], refused).why_nothing_applies() is None
    assert sensitivity([], {}).why_nothing_applies() == (
        "the model has no MatMul, Gemm, Conv or ConvTranspose node to rewrite")
