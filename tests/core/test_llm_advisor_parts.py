"""The next-token advisor's parts alone: the scan's preparation, the pure predictions, the
limit search, the frontier, and the confirmation of the chosen plan (with fake timers)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from llm_builders import kv_decoder, prompt_inputs
from opstudio.core.errors import OpstudioError
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.measure.timing import Ratio
from opstudio.core.plan.budget import Budget
from opstudio.core.plan.llm.advice import Choice, FrontierPoint, RoleResult, WholeResult
from opstudio.core.plan.llm.confirm import StepTimer, confirm
from opstudio.core.plan.llm.frontier import FrontierRecorder
from opstudio.core.plan.llm.limits import LimitSearch
from opstudio.core.plan.llm.predict import (
    Held,
    Judge,
    Option,
    assignment_of,
    first_limit,
    holding_everywhere,
    unit_options,
)
from opstudio.core.plan.llm.scan import Scan
from opstudio.core.plan.llm.variants import Target, Variant
from opstudio.core.plan.recipe import Recipe, Step

INT8 = Variant("int8", "int8-weight", {"block_size": 32}, "INT8")
INT4 = Variant("int4", "int4-weight", {"block_size": 32}, "INT4")


# --- scan ----------------------------------------------------------------------------------

def test_the_scan_is_prepared_without_measuring(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path, npz = tmp_path / "d.onnx", tmp_path / "p.npz"
    onnx.save(kv_decoder("hf", layers=2, vocab=512, hidden=64, seed=1), path)
    np.savez(npz, **prompt_inputs(40, vocab=512, position_ids=True))
    scan = Scan.prepare(str(path), ProfileSettings(threads=1, inputs_path=str(npz)), [INT8])
    assert scan.phase == "decode" and scan.layers == [0, 1]
    assert scan.usable["int8"] and scan.cache is not None
    # the prompt file has no past: the plan calibrates on the samples it is given
    assert scan.calibration == "random"
    assert scan.split.calibration["input_ids"].shape == (1, 20)
    assert scan.log[-1].startswith("accuracy: calibrated on the prompt's first 20 tokens")
    assert scan.nothing_applies(Budget(min_top1=0.9), 0.0) is None
    # a plan is realised as a recipe over its units' nodes
    t = scan.usable["int8"][0]
    recipe, chosen = scan.realise({t.unit: Option("int8", 0.1, 0.01, [t.node])})
    assert recipe.steps[0].nodes == [t.node] and chosen[0].layer == t.layer


def test_a_model_without_logits_is_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 4])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(OpstudioError, match="no logits output"):
        Scan.prepare(str(path), ProfileSettings(threads=1), [INT8])


# --- predictions ---------------------------------------------------------------------------

def _targets():
    return [Target(f"/model/layers.{i}/{r}", i, r, 64, 64) for i in (0, 1) for r in ("q", "v")]


def test_options_share_the_saving_by_bytes_and_the_error_by_layer():
    targets = _targets()
    whole = [WholeResult("int8", 4, 0.99, 0.01, 0.8, 0.78, 0.82),
             WholeResult("int4", 4, 0.9, 0.1, 0.99, 0.97, 1.01)]  # int4: not measurably faster
    roles = [RoleResult("int8", r, [], 0.99, 0.004) for r in ("q", "v")]
    role_nodes = {("int8", r): [t for t in targets if t.role == r] for r in ("q", "v")}
    options, notes = unit_options(whole, roles, role_nodes, {0: 0.75, 1: 0.25}, targets,
                                  {"int8": targets, "int4": targets},
                                  {"int8": INT8, "int4": INT4}, 10.0, "decode")
    assert notes == ["INT4: not measurably faster on the decode step (0.990× the time); "
                     "not planned"]
    assert set(options) == {t.unit for t in targets}
    # 2 ms saved over four same-sized nodes; errors 0.004 × the layer's share
    assert all(o[0].gain == pytest.approx(0.5) for o in options.values())
    assert options[(0, "q")][0].err == pytest.approx(0.003)
    assert options[(1, "q")][0].err == pytest.approx(0.001)
    assert assignment_of(options, "int8") == {u: o[0] for u, o in options.items()}
    assert assignment_of(options, "int4") == {}


def test_the_first_limit_comes_from_the_budget():
    assert first_limit(Budget(max_kl=0.05), [])[0] == 0.05
    # disagreement ≈ 1 · KL^0.5 when nothing was measured: top-1 0.9 → KL 0.01
    guess, fit, note = first_limit(Budget(min_top1=0.9), [])
    assert guess == pytest.approx(0.01) and fit == (1.0, 0.5) and "disagreement" in note


def test_the_judge_holds_the_confirming_half_and_the_kl_prediction():
    measured = {"top1": 0.95, "kl": 0.01, "positions": 200, "confirm": {
        "top1": 0.93, "kl": 0.01, "kl_se": 0.001, "positions": 100}}
    loose = Judge(Budget(min_top1=0.9, confidence=0.5))
    assert loose.holds(measured) and loose.predicted_top1(measured["confirm"]) is None
    # the fit puts KL 0.01 at top-1 0.8: the count of agreements alone does not carry it
    strict = Judge(Budget(min_top1=0.85, confidence=0.6), fit=(2.0, 0.5))
    assert not strict.holds(measured)
    assert not loose.holds({"confirm": {"top1": 0.85, "kl": 0.01, "positions": 100}})
    fast = WholeResult("int8", 4, 0.95, 0.01, 0.8, 0.78, 0.82, confirm=measured["confirm"])
    faster = WholeResult("int4", 4, 0.95, 0.01, 0.6, 0.58, 0.62, confirm=measured["confirm"])
    slow = WholeResult("x", 4, 0.95, 0.01, 1.0, 0.98, 1.02, confirm=measured["confirm"])
    assert holding_everywhere([fast, slow, faster], loose) == [faster, fast]


# --- the limit search ----------------------------------------------------------------------

def test_the_limit_search_doubles_then_bisects():
    search = LimitSearch(guess=1.0, max_err=100.0)
    truth = 5.0  # plans hold up to this limit
    search.run(lambda limit: limit <= truth, lambda f, m: None, lambda: None)
    limits = [limit for limit, _ in search.tried]
    assert limits[:4] == [1.0, 2.0, 4.0, 8.0]
    assert len(limits) <= 7 and search.lo is not None and search.hi is not None
    assert search.lo <= truth < search.hi and (search.hi / search.lo < 1.3 or len(limits) == 7)


def test_the_limit_search_quarters_when_the_guess_fails_and_stops_when_all_fit():
    search = LimitSearch(guess=1.0, max_err=0.5)
    search.record(1.0, False)
    assert search.suggest() == 0.25
    search.record(0.25, True)
    assert search.suggest() == pytest.approx(0.5)
    done = LimitSearch(guess=1.0, max_err=0.5)
    done.record(1.0, None)  # an empty plan at a limit every option fits under: nothing to gain
    assert done.suggest() is None


# --- the frontier --------------------------------------------------------------------------

def test_the_frontier_has_timed_predicted_and_whole_points():
    frontier = FrontierRecorder()
    frontier.plan("a", 0.95, 0.01, 0.1, True)
    frontier.plan("b", 0.9, 0.02, 0.2, False)
    frontier.timed(0.1, FrontierPoint("the plan", 0.95, 0.01, 1.5, 1.4, 1.6))
    frontier.predicted(10.0, lambda limit: 5.0 if limit == 0.2 else 0.0)
    frontier.whole([WholeResult("int8", 4, 0.9, 0.1, 0.5, 0.45, 0.55, confirm={})],
                   {"int8": INT8}, lambda c: c == {})
    a, b, w = frontier.points
    assert (a.speedup, a.low, a.high) == (1.5, 1.4, 1.6)
    assert b.speedup == pytest.approx(2.0) and b.low is None
    assert w.kind == "whole" and w.speedup == 2.0 and w.holds
    assert w.low == pytest.approx(1 / 0.55) and w.high == pytest.approx(2.0 / 0.9)


# --- confirmation --------------------------------------------------------------------------

def _held(limit, node):
    recipe = Recipe([Step("int8-weight", {"block_size": 32}, [node])])
    return Held(limit, recipe, [Choice(0, "q", "int8", [node], 0.1, limit)], (0.95, 0.01))


def _timer(ratios):
    def timer(plan, against):
        key = (plan.steps[0].nodes[0], against.steps[0].nodes[0] if against.steps else "")
        if key not in ratios:
            raise OpstudioError("could not be timed")
        m = ratios[key]
        return Ratio(m, m * 0.98, m * 1.02, 20)
    return timer


def test_an_upgrade_that_does_not_beat_its_start_is_dropped():
    start, best = _held(0.1, "start"), _held(0.3, "best")
    log: list[str] = []
    out = confirm(best, start, "INT8", _timer({("best", "start"): 1.0, ("best", ""): 0.7,
                                               ("start", ""): 0.69}), "decode", log)
    assert out.best is start and out.recipe is start.recipe and out.speed is not None
    assert out.speed.speedup == pytest.approx(1 / 0.69) and out.speed.limit == 0.1
    assert any("keeping the latter" in line for line in log)
    kept = confirm(best, start, "INT8", _timer({("best", "start"): 0.9, ("best", ""): 0.6,
                                                ("start", ""): 0.69}), "decode", [])
    assert kept.best is best and kept.chosen == best.chosen


def test_a_plan_not_measurably_faster_is_not_handed_out():
    out = confirm(_held(0.1, "p"), None, "", _timer({("p", ""): 1.0}), "decode", [])
    assert not out.recipe.steps and out.verified is None and out.speed is not None \
        and not out.speed.holds
    untimed = confirm(_held(0.1, "p"), None, "", _timer({}), "decode", [])
    assert untimed.speed is None and untimed.recipe.steps  # kept as verified, untimed


def test_the_step_timer_times_a_plan_and_its_start_once(monkeypatch):
    calls = []

    def fake(fn, path, timed, samples, tasks, cache, threads, budget, judge, **kw):
        calls.append(([t for t, _ in tasks], budget))
        a, b = (tasks + tasks)[:2]
        return {a[0]: {"ratio": 0.7, "low": 0.69, "high": 0.71, "rounds": 30,
                       "versus": {b[0]: [0.9, 0.88, 0.92]}},
                b[0]: {"ratio": 0.75, "low": 0.74, "high": 0.76, "rounds": 30}}

    monkeypatch.setattr("opstudio.core.isolation.call_isolated", fake)
    timer = StepTimer("m.onnx", {}, {}, None, 1, 2.0, 60.0)
    plan, start = _held(0.3, "best").recipe, _held(0.1, "start").recipe
    assert timer(plan, start).median == 0.9
    assert timer(plan, Recipe([])).median == 0.7 and timer(start, Recipe([])).median == 0.75
    assert len(calls) == 1 and calls[0][1] == 6.0  # timed together, three times longer


# --- fusion before the plan ----------------------------------------------------------------

def test_fusion_is_judged_exact_timed_and_kept_only_where_it_pays(tmp_path, monkeypatch):
    from llm_builders import llama_decoder
    from opstudio.core.plan.llm.fusion import fused_scan
    from opstudio.core.plan.llm.variants import default_variants

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path, npz = tmp_path / "d.onnx", tmp_path / "p.npz"
    model = llama_decoder(layers=2, vocab=256, hidden=64)
    onnx.save(model, path)
    np.savez(npz, **prompt_inputs(40, vocab=256, position_ids=True))
    settings = ProfileSettings(threads=1, inputs_path=str(npz))
    variants = [v for v in default_variants(torch=False) if v.id in ("fuse", "int8-weight")]
    scan = Scan.prepare(str(path), settings, variants)
    assert [v.id for v in scan.variants] == ["int8-weight"]  # fusion is not scanned by unit
    fused, fusion = fused_scan(scan, settings, variants, Budget(min_top1=0.9, confidence=0.5),
                               tmp_path, 0.3, lambda f, m: None)
    assert fusion is not None and "fuse" in fusion.tried and set(fusion.tried) <= {
        "fuse", "fuse (unpacked)", "fuse (norms and rotary only)"}
    # the whole fusion was profiled unit by unit against the original first
    # (each layer's attention, MLP gate and norms, and the final norm)
    assert fusion.by_layer is not None and len(fusion.by_layer["units"]) == 7
    for tried in fusion.tried.values():
        # the same math: every next token agrees
        assert tried["top1"] == 1.0 and tried["kl"] < 1e-6 and tried["ratio"] > 0
    paying = [t for t in fusion.tried.values() if t["ratio"] < 0.98 and t["high"] < 1.0]
    assert (fusion.step is not None) == bool(paying)
    if fusion.step is not None:
        # the scan now plans the quantizers on the fused model (its projections maybe packed)
        assert fused.path == fusion.path and fused.path != str(path)
        assert {t.node for t in fused.targets} <= {
            n.name for n in onnx.load(fused.path).graph.node}
        assert any("kept" in line for line in fused.log)
    else:
        assert fused is scan


# --- the KV cache as a candidate -----------------------------------------------------------

def test_the_kv_cache_is_a_candidate_at_a_long_past_and_is_measured(tmp_path, monkeypatch):
    from opstudio.core.plan.llm.measure import measure_accuracy, measure_speed
    from opstudio.core.plan.llm.variants import default_variants, recipe_of

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "gqa.onnx"
    onnx.save(kv_decoder("gqa", layers=2, vocab=512, hidden=64, max_positions=2048, seed=1),
              path)
    kv = [v for v in default_variants(torch=False) if v.technique == "kv-cache"]
    short = Scan.prepare(str(path), ProfileSettings(threads=1, phase="decode", past=512), kv)
    assert not short.variants and "here the decode step's past is 512: not tried" in short.log[-1]
    hf = tmp_path / "hf.onnx"
    onnx.save(kv_decoder("hf", layers=2, vocab=512, hidden=64), hf)
    unfused = Scan.prepare(str(hf), ProfileSettings(threads=1, phase="decode", past=1024), kv)
    assert "here the model has no GroupQueryAttention: not tried" in unfused.log[-1]
    scan = Scan.prepare(str(path), ProfileSettings(threads=1, phase="decode", past=1024), kv)
    assert [v.technique for v in scan.variants] == ["kv-cache"]
    nodes = scan.usable[kv[0].id]
    assert len(nodes) == 2 and all(t.op == "GroupQueryAttention" for t in nodes)
    assert not any(np.any(v) for k, v in scan.timed.items() if "past" in k)
    # a quantized cache is fed the float past in its own type, timed and judged
    tasks = [("kv", recipe_of([(kv[0], nodes)]).to_json())]
    speed = measure_speed(str(path), scan.timed, [scan.split.calibration], tasks, None, 1, 0.2)
    assert "error" not in speed["kv"] and speed["kv"]["ratio"] > 0
    acc = measure_accuracy(str(path), scan.prompt, tasks, None, 1)
    assert "error" not in acc["kv"] and 0 <= acc["kv"]["top1"] <= 1
