"""The advisor's fusion, unit by unit: which layers' units stay fused, and the recipe it writes
with packed projections applied to the original by ``optimize``."""

from __future__ import annotations

import importlib

import numpy as np
import onnx

from llm_builders import llama_decoder, prompt_inputs
from opstudio.core.measure.compare import FUSED, SAME, NodeDelta
from opstudio.core.plan.llm.fusion_units import choose_units, kept_of, unit_key

ATT0 = ["/model/layers.0/self_attn/Softmax", "/model/layers.0/self_attn/q_proj/MatMul"]
ATT1 = ["/model/layers.1/self_attn/Softmax", "/model/layers.1/self_attn/q_proj/MatMul"]
# a residual Add scoped in the layer before, with the norm it feeds
NORM1 = ["/model/layers.0/Add_1", "/model/layers.1/input_layernorm/Pow",
         "/model/layers.1/input_layernorm/Mul"]
GATE1 = ["/model/layers.1/mlp/gate_proj/MatMul", "/model/layers.1/mlp/up_proj/MatMul"]


def _row(name, before_ms, after_ms, group=(), rng=None, status=FUSED):
    """A profile row with 30 paired runs of 3 % noise (after None: nothing stands for it)."""
    rng = rng or np.random.default_rng(0)
    noise = rng.lognormal(0.0, 0.03, (2, 30))
    before = (before_ms * noise[0]).tolist()
    after = [] if after_ms is None else (after_ms * noise[1]).tolist()
    return NodeDelta(name, "Op", before_ms, after_ms, group=list(group), status=status,
                     before_series=before, after_series=after)


def test_a_layer_whose_unit_got_slower_is_left_unfused():
    rng = np.random.default_rng(1)
    rows = [_row("/model/layers.0/self_attn/GroupQueryAttention", 0.30, 0.10, ATT0, rng),
            # what the fused kernel made redundant counts for its layer's attention
            _row("/model/layers.0/self_attn/k_rot/Shape", 0.01, None, rng=rng),
            _row("/model/layers.1/self_attn/GroupQueryAttention", 0.20, 0.30, ATT1, rng),
            _row("/model/layers.1/input_layernorm/SkipSimplifiedLayerNormalization", 0.05,
                 0.05, NORM1, rng),
            _row("/model/layers.1/mlp/gate_up_proj/MatMul", 0.10, 0.08, GATE1, rng),
            # an unchanged node no unit holds counts for none
            _row("/model/layers.1/mlp/down_proj/MatMul", 0.5, 5.0, rng=rng, status=SAME)]
    units = [ATT0, ATT1, NORM1, GATE1]
    assert unit_key(NORM1) == (1, "norm") and unit_key(GATE1) == (1, "mlp")
    choice = choose_units(rows, units)
    assert [(v.layer, v.kind) for v in choice.dropped] == [(1, "attention")]
    slower = choice.dropped[0]
    assert 1.4 < 1 / slower.ratio.median < 1.6 and slower.before_ms > 0.19
    assert choice.kept_nodes() == sorted(ATT0 + NORM1 + GATE1)
    assert choice.summary().startswith("attention fused in 1/2 layers; MLP gate in 1/1; "
                                       "norms in 1/1; layer 1 attention left unfused: 1.5")
    assert "× slower [" in choice.summary()
    layer0 = next(v for v in choice.verdicts if v.layer == 0)
    assert layer0.kept and layer0.before_ms > 0.30  # the absorbed Shape's time is in it
    # another fusion's units (unpacked: the attention without its projections) drop alike
    unpacked = [ATT0[:1], ATT1[:1], NORM1]
    assert kept_of(unpacked, choice.dropped_nodes()) == sorted(ATT0[:1] + NORM1)
    js = choice.to_json()
    assert js["summary"] == choice.summary() and len(js["units"]) == 4
    assert [u["kept"] for u in js["units"] if u["layer"] == 1 and u["unit"] == "attention"] == [
        False]


def test_a_unit_within_the_noise_is_kept_and_all_kept_is_the_full_step():
    from opstudio.core.passes.fuse import fusable_nodes, fusable_units

    model = llama_decoder(layers=2, vocab=64, hidden=32, heads=2)
    units = fusable_units(model, pack=True)
    rng = np.random.default_rng(2)
    # each unit as one row: a kernel no faster than before, within the noise
    rows = [_row(f"k{i}", 0.1, 0.1, unit, rng) for i, unit in enumerate(units)]
    choice = choose_units(rows, units)
    assert not choice.dropped and all(v.ratio is not None for v in choice.verdicts)
    assert choice.kept_nodes() == fusable_nodes(model, True, pack=True)
    assert "left unfused" not in choice.summary()
    assert choice.summary().startswith("attention fused in 2/2 layers; MLP gate in 2/2")
    # without rows (not profiled) nothing is dropped either
    assert choose_units([], units).kept_nodes() == fusable_nodes(model, True, pack=True)


def test_the_advisors_packed_fusion_and_plan_apply_to_the_original(tmp_path, monkeypatch):
    """The plan is scanned on the fused model, so its quantizer steps name the packed
    projections; the fuse step leading the recipe makes them again, by the same names."""
    from opstudio.core.measure.profiler import ProfileSettings
    from opstudio.core.measure.timing import Ratio
    from opstudio.core.plan.budget import Budget
    from opstudio.core.plan.llm import driver, fusion, scan
    from opstudio.core.plan.llm.variants import default_variants
    from opstudio.core.plan.optimize import optimize

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # the packed fusion alone: which of packed and unpacked is faster on a model this small
    # is noise
    monkeypatch.setattr(fusion, "TRIES", fusion.TRIES[:1])
    real = scan.speed_in_parallel

    def faster(*args, **kwargs):  # int8 weights do not speed up a model this small
        out = real(*args, **kwargs)
        return {k: {**v, "ratio": 0.5, "low": 0.45, "high": 0.55} for k, v in out.items()}

    monkeypatch.setattr(scan, "speed_in_parallel", faster)
    path, npz = tmp_path / "d.onnx", tmp_path / "p.npz"
    model = llama_decoder(layers=2, vocab=256, hidden=64)
    onnx.save(model, path)
    np.savez(npz, **prompt_inputs(40, vocab=256, position_ids=True))
    variants = [v for v in default_variants(torch=False) if v.id in ("fuse", "int8-weight")]
    advice = driver.advise_llm(str(path), ProfileSettings(threads=1, inputs_path=str(npz)),
                               Budget(min_top1=0.5, confidence=0.5), variants,
                               timer=lambda plan, against: Ratio(0.5, 0.45, 0.55, 20),
                               time_budget_s=0.3)
    assert advice.fusion is not None and advice.fusion["by_layer"]["summary"].startswith(
        "attention fused in 2/2 layers")
    assert any(line.startswith("fuse by layer: ") for line in advice.log)
    fuse, *plan = advice.recipe.steps
    # a fusion twice as fast as the original on this model: kept, packed
    assert fuse.technique == "fuse" and fuse.params["pack"] is True
    # the plan chose packed projections of the fused model; the recipe names the originals
    # they stand for, which a recipe checked against the original must
    chosen = {n for c in advice.chosen for n in c.nodes}
    assert any(n.endswith("/qkv_proj/MatMul") for n in chosen)
    originals = {n.name for n in model.graph.node}
    planned = {n for step in plan for n in step.nodes or []}
    assert planned <= originals and "/model/layers.0/self_attn/k_proj/MatMul" in planned
    result = optimize(model, advice.recipe)
    applied = {n for report in result.steps[1:] for n in report.applied}
    assert applied == chosen  # each step rewrote the very nodes the advisor planned
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "MatMul" not in {
        n.op_type for n in result.model.graph.node if n.name in chosen}
    # as ``optimize`` runs on a big model's file: opened lazily, its weights left in the file
    # while the recipe is checked, which fuse's check reads the projections' from
    from opstudio.core.model import model_io

    optimize_module = importlib.import_module("opstudio.core.plan.optimize")
    monkeypatch.setattr(model_io, "LAZY_INLINE_ABOVE", 0)
    monkeypatch.setattr(model_io, "_SKIM_MIN_BYTES", 1024)
    monkeypatch.setattr(optimize_module, "STREAM_ABOVE", 0)
    monkeypatch.chdir(tmp_path / "cache")  # the weights' file is not in the working folder
    lazy = model_io.load_model(path, lazy=True)
    assert model_io.lazy_folders(lazy)
    streamed = optimize(lazy, advice.recipe)
    assert {n for report in streamed.steps[1:] for n in report.applied} == chosen
