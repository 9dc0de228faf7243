"""The advisor panel shows a real advice: table rows, scatter points, clicks select nodes."""

from __future__ import annotations

import onnx
import pytest
from qt_models import mlp_model

from opstudio.core.advisor import Budget, advise
from opstudio.core.profiler import ProfileSettings


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
