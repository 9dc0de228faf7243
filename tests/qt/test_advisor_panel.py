"""The advisor panel shows a real advice: table rows, scatter points, clicks select nodes."""

from __future__ import annotations

import onnx
import pytest
from qt_models import mlp_model

from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.plan.advisor import Budget, advise


@pytest.fixture(scope="module")
def advice(tmp_path_factory):
    import os

    folder = tmp_path_factory.mktemp("advice")
    os.environ["XDG_CACHE_HOME"] = str(folder / "cache")
    path = folder / "mlp.onnx"
    onnx.save(mlp_model(hidden=128), path)
    settings = ProfileSettings(runs=3, warmup=1, threads=1, dims={"batch": 16},
                               measure_plain=False)
    return advise(str(path), settings, Budget(min_snr_db=25),
                  {"int8-dynamic": {"per_channel": False}, "fp16": {}})


def test_panel_shows_every_candidate_and_the_plan(qtbot, advice):
    from opstudio.qt.advisor_panel import AdvisorPanel

    panel = AdvisorPanel()
    qtbot.addWidget(panel)
    panel.set_advice(advice)
    cands = advice.sensitivity.candidates
    assert panel.table.rowCount() == len(cands)
    measured = [c for c in cands if c.after_ms is not None and c.snr_db is not None]
    assert len(panel.points) == len(measured)
    in_plan = {(p["node"], p["technique"]) for p in panel.points if p["in_plan"]}
    assert in_plan == {(c.node, c.technique) for c in advice.plan.chosen}
    assert panel.accept_button.isEnabled() == bool(advice.plan.recipe.steps)
    assert "Plan within SNR ≥ 25 dB" in panel.summary.text()


def test_clicks_select_nodes_and_accept_hands_over_the_recipe(qtbot, advice):
    from opstudio.qt.advisor_panel import AdvisorPanel

    panel = AdvisorPanel()
    qtbot.addWidget(panel)
    panel.set_advice(advice)
    with qtbot.waitSignal(panel.nodeClicked) as blocker:
        panel._on_row(0, 0)
    assert blocker.args[0] == panel.table.item(0, 0).text()
    spot = panel.scatter.points()[0]
    with qtbot.waitSignal(panel.nodeClicked) as blocker:
        panel.scatter.sigClicked.emit(panel.scatter, [spot], None)
    assert blocker.args[0] == spot.data()
    if advice.plan.recipe.steps:
        with qtbot.waitSignal(panel.planAccepted) as blocker:
            panel.accept_button.click()
        assert blocker.args[0].to_json() == advice.plan.recipe.to_json()


def test_budget_and_techniques_from_the_controls(qtbot):
    from opstudio.qt.advisor_panel import AdvisorPanel

    panel = AdvisorPanel()
    qtbot.addWidget(panel)
    assert panel.budget() == Budget(min_cosine=0.999)
    panel.kind.setCurrentIndex(1)
    panel.value.setValue(33)
    assert panel.budget() == Budget(min_snr_db=33)
    panel.checks["fp16"].setChecked(False)
    with qtbot.waitSignal(panel.analyzeRequested) as blocker:
        panel.analyze_button.click()
    assert "fp16" not in blocker.args[1] and "int8-dynamic" in blocker.args[1]


def test_numeric_columns_sort_by_value_not_text(qtbot, advice):
    import copy

    from PySide6.QtCore import Qt

    from opstudio.qt.advisor_panel import COL_BEFORE, AdvisorPanel

    advice = copy.deepcopy(advice)
    # as text, "10.0000" would sort before "9.0000"
    for c, ms in zip(advice.sensitivity.candidates, (10.0, 9.0, 100.0)):
        c.before_ms = ms
    panel = AdvisorPanel()
    qtbot.addWidget(panel)
    panel.set_advice(advice)
    panel.table.sortItems(COL_BEFORE, Qt.SortOrder.AscendingOrder)
    texts = [panel.table.item(r, COL_BEFORE).text() for r in range(panel.table.rowCount())]
    assert len(texts) >= 3
    assert [float(t) for t in texts] == sorted(float(t) for t in texts)


def _llm_advice(budget, with_plan=True):
    from opstudio.core.plan.llm import (
        Choice,
        FrontierPoint,
        LlmAdvice,
        RoleResult,
        WholeResult,
        default_variants,
        recipe_of,
    )

    variants = [v for v in default_variants(torch=False, rtn=True)
                if v.id in ("int4-rtn", "int8-weight")]
    roles = [RoleResult("int4-rtn", "mlp/up_proj/MatMul",
                        [f"/model/layers.{i}/mlp/up_proj/MatMul" for i in range(3)], 0.93, 0.05),
             RoleResult("int8-weight", "mlp/up_proj/MatMul",
                        [f"/model/layers.{i}/mlp/up_proj/MatMul" for i in range(3)], 0.99, 0.01)]
    chosen = [Choice(i, "mlp/up_proj/MatMul", "int8-weight",
                     [f"/model/layers.{i}/mlp/up_proj/MatMul"], 0.1, 0.003) for i in range(2)]
    from opstudio.core.plan.llm import Target

    recipe = recipe_of([(variants[1], [Target(c.nodes[0], c.layer, c.role, 64, 256)
                                       for c in chosen])]) if with_plan else recipe_of([])
    plan = FrontierPoint("the plan", 0.95, 0.02, 1.4, 1.3, 1.5, "plan", 0.1, True)
    frontier = [FrontierPoint("plan KL≤0.1", 0.95, 0.02, 1.4, 1.3, 1.5, "plan", 0.1, True),
                FrontierPoint("plan KL≤0.4", 0.85, 0.2, 1.7, None, None, "plan", 0.4, False),
                FrontierPoint("INT4 RTN", 0.7, 0.5, 1.9, 1.8, 2.0, "whole", None, False)]
    whole = [WholeResult("int4-rtn", 3, 0.7, 0.5, 1 / 1.9, 1 / 2.0, 1 / 1.8)]
    return LlmAdvice(budget, "decode", 2.5, variants, roles, whole, {0: 0.1, 2: 0.05}, [0, 2],
                     chosen if with_plan else [], recipe,
                     {"top1": 0.95, "kl": 0.02} if with_plan else None,
                     plan if with_plan else None, frontier, seconds=42.0)


def test_next_token_advice_shows_roles_and_the_frontier(qtbot):
    from opstudio.qt.advisor_panel import LLM_COLUMNS, AdvisorPanel

    panel = AdvisorPanel()
    qtbot.addWidget(panel)
    advice = _llm_advice(Budget(min_top1=0.9))
    panel.set_advice(advice)
    assert panel.table.columnCount() == len(LLM_COLUMNS)
    assert panel.table.rowCount() == 2
    rows = {panel.table.item(r, 1).text(): panel.table.item(r, 5).text()
            for r in range(2)}
    assert rows == {"INT4 RTN": "", "INT8 weight-only": "2 of 3"}
    assert not panel.frontier_plot.isHidden() and panel.plot.isHidden()
    assert [(p["label"], p["x"], p["y"]) for p in panel.frontier_points] == [
        (p.label, p.speedup, p.top1) for p in advice.frontier]
    assert [p["chosen"] for p in panel.frontier_points] == [True, False, False]
    assert panel.top1_line.value() == 0.9
    text = panel.summary.text()
    assert "next-token top-1 agreement ≥ 0.9" in text and "decode step 1.40× faster" in text
    with qtbot.waitSignal(panel.planAccepted) as blocker:
        panel.accept_button.click()
    assert blocker.args[0].to_json() == advice.recipe.to_json()
    # a role row selects its first layer's node
    with qtbot.waitSignal(panel.nodeClicked) as blocker:
        panel._on_row(0, 0)
    assert blocker.args[0].startswith("/model/layers.0/mlp/up_proj")
    # back to a model without logits: the cosine/SNR table and scatter return
    empty = _llm_advice(Budget(max_kl=0.01), with_plan=False)
    panel.set_advice(empty)
    assert "No rewrite saves time within next-token KL ≤ 0.01" in panel.summary.text()
    assert not panel.accept_button.isEnabled()


def test_next_token_budget_phase_and_past_from_the_controls(qtbot):
    from opstudio.qt.advisor_panel import KIND_KL, KIND_TOP1, AdvisorPanel

    panel = AdvisorPanel()
    qtbot.addWidget(panel)
    base = ProfileSettings(threads=2)
    assert panel.phase.isHidden() and panel.confidence.isHidden()  # cosine: no phase
    assert panel.settings_for(base) is base
    panel.kind.setCurrentIndex(KIND_TOP1)
    assert panel.budget() == Budget(min_top1=0.9)
    assert not panel.phase.isHidden() and not panel.confidence.isHidden()
    panel.confidence.setValue(0.5)
    assert panel.budget() == Budget(min_top1=0.9, confidence=0.5)
    panel.confidence.setValue(0.9)
    assert panel.checks["int8-weight"].isVisibleTo(panel)
    assert not panel.checks["fp16"].isVisibleTo(panel)
    panel.past.setValue(256)
    settings = panel.settings_for(base)
    assert (settings.phase, settings.past, settings.threads) == ("decode", 256, 2)
    panel.phase.setCurrentIndex(1)
    assert not panel.past.isEnabled()
    assert (panel.settings_for(base).phase, panel.settings_for(base).past) == ("prefill", None)
    panel.kind.setCurrentIndex(KIND_KL)
    panel.value.setValue(0.05)
    assert panel.budget() == Budget(max_kl=0.05)
    with qtbot.waitSignal(panel.analyzeRequested) as blocker:
        panel.analyze_button.click()
    assert set(blocker.args[1]) <= {"fuse", "kv-cache", "int4-weight", "int8-weight",
                                    "int8-dynamic", "lowrank", "prune"}


def test_where_the_next_token_scan_runs(qtbot):
    from opstudio.qt.advisor_panel import KIND_COSINE, KIND_TOP1, AdvisorPanel

    panel = AdvisorPanel()
    qtbot.addWidget(panel)
    assert panel.cluster.isHidden()  # the per-operator scan times every rewrite here
    panel.kind.setCurrentIndex(KIND_TOP1)
    assert not panel.cluster.isHidden() and panel.scan_cluster() is None
    panel.cluster.setCurrentIndex(1)
    assert panel.scan_cluster() == "auto"
    with qtbot.waitSignal(panel.clusterChanged) as blocker:
        panel.cluster.setCurrentText(" ray://head.example:10001 ")
    assert blocker.args == [" ray://head.example:10001 "]
    assert panel.scan_cluster() == "ray://head.example:10001"
    panel.kind.setCurrentIndex(KIND_COSINE)
    assert panel.scan_cluster() is None
    panel.set_scan_cluster("")
    panel.kind.setCurrentIndex(KIND_TOP1)
    assert panel.cluster.currentIndex() == 0 and panel.scan_cluster() is None
