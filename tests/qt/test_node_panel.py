"""The optimization panel: techniques enabled by the core's check, editors from ParamSpecs,
the plan with undo/redo, and recipe files."""

from __future__ import annotations

import json

import pytest
from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox
from qt_models import mlp_model

from opstudio.core.model.model_io import ensure_node_names
from opstudio.core.passes import get_pass
from opstudio.core.plan.recipe import Recipe, Step
from opstudio.core.session.edits import Plan
from opstudio.qt.node_panel import NodePanel, available_passes

EDITOR_TYPES = {"int": QSpinBox, "float": QDoubleSpinBox, "bool": QCheckBox,
                "choice": QComboBox}


@pytest.fixture
def panel(app, qtbot):
    model = mlp_model()
    ensure_node_names(model)
    plan = Plan()
    w = NodePanel(plan)
    qtbot.addWidget(w)
    w.set_model(model)
    w.show()
    return w


def test_techniques_follow_the_core_check(panel, qtbot):
    panel.set_selection(["relu0"])
    qtbot.waitUntil(lambda: not panel.checking())  # fuse's check runs in a worker
    relu = next(n for n in panel.model.graph.node if n.name == "relu0")
    for p in available_passes():
        reason = p.check(panel.model, relu)
        rb = panel.radio[p.technique]
        assert rb.isEnabled() == (reason is None)
        if reason:
            assert rb.toolTip() == reason
            assert panel.reason_labels[p.technique].text() == reason
    panel.set_selection(["mm0", "mm1"])
    assert panel.radio["int8-dynamic"].isEnabled()
    assert "2 selected" in panel.header.text()
    # one node that cannot take it disables it for the whole selection, with the reason
    panel.set_selection(["mm0", "relu0"])
    assert not panel.radio["int8-dynamic"].isEnabled()
    assert "1 of 2 selected" in panel.reason_labels["int8-dynamic"].text()
    assert "relu0" in panel.reason_labels["int8-dynamic"].text()


def test_editors_are_built_from_param_specs(panel):
    for p in available_passes():
        editor = panel.editor_for[p.technique]
        for spec in p.params:
            widget = editor.findChild(EDITOR_TYPES.get(spec.kind, QLineEdit),
                                      f"param_{spec.name}")
            if spec.kind == "path":
                widget = editor.findChild(QLineEdit)
            assert widget is not None, (p.technique, spec.name)
        # the defaults read back as the pass's own validated defaults
        assert p.validate_params(editor.values()) == p.validate_params({
            s.name: s.default for s in p.params})


def test_apply_undo_redo_remove(panel, qtbot):
    plan = panel.plan
    panel.set_selection(["mm0", "mm1"])
    assert panel.select_technique("lowrank")
    panel.editor_for["lowrank"].set_value("rank", 8)
    panel.apply_button.click()  # rank and energy together: the pass refuses, in words
    assert plan.steps == [] and "not both" in panel.param_error.text()
    panel.editor_for["lowrank"].set_value("energy", None)
    panel.apply_button.click()
    assert len(plan.steps) == 1 and panel.param_error.text() == ""
    step = plan.steps[0]
    assert step.technique == "lowrank" and step.nodes == ["mm0", "mm1"]
    assert step.params == get_pass("lowrank").validate_params({"rank": 8})
    assert panel.plan_list.count() == 1 and "2 nodes: mm0, mm1" in panel.plan_list.item(0).text()
    panel.set_selection(["mm1"])
    panel.select_technique("int8-dynamic")
    panel.apply_button.click()
    assert [s.technique for s in plan.steps] == ["lowrank", "int8-dynamic"]
    panel.undo_button.click()
    assert [s.technique for s in plan.steps] == ["lowrank"]
    panel.redo_button.click()
    assert [s.technique for s in plan.steps] == ["lowrank", "int8-dynamic"]
    panel.plan_list.setCurrentRow(0)
    panel.remove_button.click()
    assert [s.technique for s in plan.steps] == ["int8-dynamic"]
    plan.undo()
    assert [s.technique for s in plan.steps] == ["lowrank", "int8-dynamic"]
    assert plan.techniques_by_node(None) == {"mm0": "lowrank", "mm1": "lowrank, int8-dynamic"}


def test_disabled_technique_cannot_be_applied(panel):
    panel.set_selection(["relu0"])
    assert not panel.select_technique("int8-dynamic")
    assert panel.apply_to_selected() is None or panel.current_technique() == "fp16"
    panel.set_selection([])
    assert not panel.apply_button.isEnabled()


def test_recipe_round_trip(panel, tmp_path):
    panel.plan.replace([Step("int8-dynamic", {"per_channel": True}, nodes=["mm0"]),
                        Step("fp16", {}, op_types=["Softmax"])])
    path = tmp_path / "plan.json"
    panel.save_recipe(path)
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["steps"][1]["op_types"] == ["Softmax"]
    panel.plan.replace([])
    panel.load_recipe(path)
    assert panel.plan.recipe().to_json() == Recipe.load(path).to_json()
    assert "all Softmax" in panel.plan_list.item(1).text()


def test_planned_nodes_show_their_steps_technique_and_params(panel):
    """Selecting nodes already in a step shows that step, not the defaults of the technique
    checked last (which read as if the nodes were planned that way)."""
    panel.set_selection(["mm1"])
    panel.select_technique("lowrank")
    panel.apply_button.click()
    panel.set_selection(["mm0"])
    panel.select_technique("int8-dynamic")
    panel.editor_for["int8-dynamic"].set_value("per_channel", True)
    panel.apply_button.click()
    panel.set_selection(["relu0"])
    assert panel.select_technique("fp16")  # another technique checked meanwhile
    panel.editor_for["int8-dynamic"].set_value("per_channel", False)
    panel.set_selection(["mm0"])
    assert panel.current_technique() == "int8-dynamic"
    assert panel.editor_for["int8-dynamic"].values()["per_channel"] is True
    assert panel.plan_list.currentRow() == 1  # the step mm0 is in: Remove takes it
    # a selection no single step covers keeps whatever is checked
    panel.select_technique("prune")
    panel.set_selection(["mm0", "mm1"])
    assert panel.current_technique() == "prune"  # mm0 and mm1 are in different steps


def test_a_slow_check_runs_off_the_ui_thread_and_its_answer_arrives(panel, qtbot, monkeypatch):
    import threading
    import time

    from PySide6.QtCore import QTimer

    fuse = get_pass("fuse")
    assert fuse.slow_check and not get_pass("int8-dynamic").slow_check
    ui_thread = threading.get_ident()
    asked_in: list[int] = []

    def slow(model, node, params=None):
        asked_in.append(threading.get_ident())
        time.sleep(0.8)
        return None if node.name == "mm0" else f"{node.name} is not fusable here"

    monkeypatch.setattr(type(fuse), "check", lambda self, *a, **k: slow(*a, **k))
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    started = time.perf_counter()
    panel.set_selection(["relu0"])
    # the panel came back at once, the other techniques answered, fuse is being asked
    assert time.perf_counter() - started < 0.5
    assert panel.checking()
    assert not panel.radio["fuse"].isEnabled()
    assert panel.reason_labels["fuse"].text() == "checking…"
    qtbot.waitUntil(lambda: not panel.checking(), timeout=5000)
    timer.stop()
    assert asked_in and ui_thread not in asked_in
    assert len(ticks) >= 20  # the event loop ran all along (0.8 s at 20 ms a tick)
    assert panel.reason_labels["fuse"].text() == "relu0 is not fusable here"
    assert panel.radio["fuse"].toolTip() == "relu0 is not fusable here"
    assert not panel.radio["fuse"].isEnabled()

    # accepted: the technique is enabled once the answer arrives, and can be planned
    panel.set_selection(["mm0"])
    qtbot.waitUntil(lambda: not panel.checking(), timeout=5000)
    assert panel.radio["fuse"].isEnabled() and panel.reasons["fuse"] is None
    # an answer for a selection since replaced is dropped
    panel.set_selection(["relu0"])
    panel.set_selection(["mm0"])
    qtbot.waitUntil(lambda: not panel.checking(), timeout=5000)
    qtbot.wait(900)  # the first, stale answer ("relu0 …") has come back by now
    assert panel.reasons["fuse"] is None and panel.radio["fuse"].isEnabled()
