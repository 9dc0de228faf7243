"""The operator table: values per column, numeric sorting, filtering, selection both ways."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from PySide6.QtCore import QItemSelectionModel, Qt
from qt_models import mlp_model

from opstudio.core.measure.compare import ADDED, REMOVED, NodeDelta
from opstudio.core.measure.timing import paired_speedup
from opstudio.core.model.graph import analyze
from opstudio.core.model.model_io import ensure_node_names
from opstudio.qt import theme
from opstudio.qt.op_table import (
    COL_AFTER,
    COL_FLOPS,
    COL_NAME,
    COL_OP,
    COL_P50,
    COL_PARAMS,
    COL_SHAPE,
    COL_SHARE,
    COL_SPEEDUP,
    COL_TECH,
    SORT_ROLE,
    OpTable,
)


def make_table(qtbot):
    model = mlp_model()
    ensure_node_names(model)
    graph = analyze(model, {"batch": 2})
    table = OpTable()
    qtbot.addWidget(table)
    table.set_graph(graph)
    return table, graph


def column(table, col):
    p = table.proxy
    return [p.data(p.index(r, col)) for r in range(p.rowCount())]


def test_cells_show_graph_profile_plan_and_comparison(app, qtbot):
    table, graph = make_table(qtbot)
    m = table.model
    assert sorted(column(table, COL_NAME)) == sorted(n.name for n in graph.nodes)
    mm0 = graph.node("mm0").index
    assert m.value(mm0, COL_SHAPE) == "[2,64]"
    assert m.value(mm0, COL_FLOPS) == 2 * 2 * 32 * 64
    assert m.value(mm0, COL_PARAMS) == 32 * 64 * 4
    assert m.data(m.index(mm0, COL_PARAMS)) == "8.0 KiB"
    profile = SimpleNamespace(nodes=[
        SimpleNamespace(name="mm0", mean_ms=0.6, p50_ms=0.5, share=0.5, group=["mm0", "add0"]),
        SimpleNamespace(name="softmax", mean_ms=0.3, p50_ms=0.25, share=0.25, group=[])])
    m.set_profile(profile)
    assert m.value(mm0, COL_P50) == 0.5 and m.data(m.index(mm0, COL_SHARE)) == "50.0%"
    assert m.value(graph.node("add0").index, COL_P50) == 0.5  # fused with mm0
    assert m.value(graph.node("relu0").index, COL_P50) is None
    m.set_techniques({"mm0": "int8-dynamic"})
    assert m.data(m.index(mm0, COL_TECH)) == "int8-dynamic"
    # after the rewrite mm0 and relu0 run as one kernel: they are compared as one group, and
    # the group's before time stands beside its after time
    comparison = SimpleNamespace(nodes=[SimpleNamespace(
        name="mm0", group=["mm0", "add0", "relu0"], before_ms=0.6, after_ms=0.3, speedup=2.0)])
    m.set_comparison(comparison)
    assert m.value(mm0, COL_AFTER) == 0.3 and m.value(mm0, COL_P50) == 0.6
    assert m.value(graph.node("relu0").index, COL_P50) == 0.6
    assert m.data(m.index(mm0, COL_SPEEDUP)) == "2.00×"


def _descending(table, col):
    """The column's sort values top to bottom: heaviest first, the unknown (-inf) last."""
    p = table.proxy
    values = [p.data(p.index(r, col), SORT_ROLE) for r in range(p.rowCount())]
    return values == sorted(values, reverse=True), values


def test_heaviest_rows_first_before_and_after_a_profile(app, qtbot):
    table, graph = make_table(qtbot)
    # before a profile: by FLOPs, the MatMuls first, the nodes of unknown FLOPs last
    ordered, flops = _descending(table, COL_FLOPS)
    assert ordered and flops[0] > 0 and flops[0] == max(n.flops or 0 for n in graph.nodes)
    assert table.proxy.data(table.proxy.index(0, COL_OP)) == "MatMul"
    # profiled: by time, heaviest first; unmeasured nodes last
    profile = SimpleNamespace(nodes=[
        SimpleNamespace(name="relu0", mean_ms=0.1, p50_ms=0.9, share=0.6, group=[]),
        SimpleNamespace(name="mm1", mean_ms=0.3, p50_ms=0.25, share=0.25, group=[])])
    table.model.set_profile(profile)
    p = table.proxy
    assert [p.data(p.index(r, COL_NAME)) for r in range(2)] == ["relu0", "mm1"]
    assert _descending(table, COL_P50)[0]
    # a sort the user chose by clicking a header stays through the next profile
    table.view.horizontalHeader().sectionClicked.emit(COL_NAME)
    table.view.sortByColumn(COL_NAME, Qt.SortOrder.AscendingOrder)
    table.model.set_profile(profile)
    names = [p.data(p.index(r, COL_NAME)) for r in range(p.rowCount())]
    assert names == sorted(names)
    # a new model: heaviest first again
    table.set_graph(graph)
    assert _descending(table, COL_FLOPS)[0]
    # a graph whose FLOPs are unknown: by weights
    for n in graph.nodes:
        n.flops = None
    table.set_graph(graph)
    assert table.proxy.sortColumn() == COL_PARAMS and _descending(table, COL_PARAMS)[0]


def test_numeric_sort_and_filter(app, qtbot):
    table, _graph = make_table(qtbot)
    table.view.sortByColumn(COL_FLOPS, Qt.SortOrder.DescendingOrder)
    flops = [table.model.value(table.proxy.mapToSource(table.proxy.index(r, 0)).row(), COL_FLOPS)
             for r in range(table.proxy.rowCount())]
    assert flops == sorted(flops, reverse=True)  # by number, not by text ("8.19k" < "128")
    table.filter.setText("matmul")
    assert sorted(column(table, COL_NAME)) == ["mm0", "mm1"]
    table.filter.setText("soft")
    assert column(table, COL_NAME) == ["softmax"]


def test_selection_sync_both_ways(app, qtbot):
    table, _graph = make_table(qtbot)
    got = []
    table.selectionChanged.connect(got.append)
    table.set_selection([1, 3])  # from the graph: no echo back
    assert table.selected() == [1, 3] and got == []
    sm = table.view.selectionModel()
    fifth = table.proxy.index(4, 0)
    node = table.proxy.mapToSource(fifth).row()
    sm.select(fifth, QItemSelectionModel.SelectionFlag.ClearAndSelect
              | QItemSelectionModel.SelectionFlag.Rows)
    assert got[-1] == [node]
    # selection survives sorting: rows are node indices, not view positions
    table.view.sortByColumn(COL_NAME, Qt.SortOrder.DescendingOrder)
    assert table.selected() == [node]


# --- speedups and their verdicts ----------------------------------------------------------------

def timed(name, op, before_ms, ratios, group=(), seed=0):
    """A comparison row whose paired runs have these before/after ratios (in shuffled order),
    each run's time jittered as a busy machine does, both sides alike."""
    ratios = np.random.default_rng(seed).permutation(np.asarray(ratios, dtype=float))
    drift = 1.0 + 0.3 * np.random.default_rng(seed + 1).random(ratios.size)
    before = before_ms * drift
    after = before / ratios
    return NodeDelta(name, op, float(np.median(before)), float(np.median(after)),
                     group=list(group), ratio=paired_speedup(before.tolist(), after.tolist()),
                     before_series=before.tolist(), after_series=after.tolist())


def cell(model, row, col, role=Qt.ItemDataRole.DisplayRole):
    return model.data(model.index(row, col), role)


FG, TIP = Qt.ItemDataRole.ForegroundRole, Qt.ItemDataRole.ToolTipRole
# the two cases: a 3 µs op whose median ratio is 1.5 and an Add at 0.96, both within
# the noise of their runs; and a projection really twice as fast
RESHAPE_LIKE = [0.8] * 7 + [1.5] * 6 + [3.0] * 7
ADD_LIKE = np.linspace(0.85, 1.07, 20)
TWICE = 2.0 * np.linspace(0.95, 1.05, 20)


def test_speedup_shows_its_verdict(app, qtbot):
    table, graph = make_table(qtbot)
    m = table.model
    softmax = timed("softmax", "Softmax", 0.003, RESHAPE_LIKE)
    add0 = timed("add0", "Add", 0.02, ADD_LIKE, seed=2)
    mm0 = timed("mm0", "MatMul", 0.6, TWICE, seed=4)
    assert softmax.speedup == 1.5 and not softmax.significant  # would have read "1.50×"
    assert round(add0.speedup, 2) == 0.96 and not add0.significant
    assert mm0.significant and mm0.speedup > 1.9
    rows = [mm0, add0, softmax,
            NodeDelta("mm1", "MatMul", 0.4, None, status=REMOVED),
            NodeDelta("relu0", "Relu", None, 0.01, status=ADDED)]
    m.set_comparison(SimpleNamespace(nodes=rows))
    i = {n.name: n.index for n in graph.nodes}
    for noise in (softmax, add0):
        r = i[noise.name]
        assert cell(m, r, COL_SPEEDUP) == "≈ 1×"
        assert m.value(r, COL_SPEEDUP) == noise.speedup  # sorts by its figure all the same
        assert cell(m, r, COL_SPEEDUP, FG) == theme.NOISE  # neither green nor red
        assert cell(m, r, COL_AFTER, FG) == theme.NOISE  # the after time greyed too
        tip = cell(m, r, COL_SPEEDUP, TIP)
        lo, hi = noise.ratio.low, noise.ratio.high
        assert tip == (f"≈ 1× (no change beyond the noise): 95 % interval {lo:.2f}–{hi:.2f}× "
                       "over 20 paired runs") and lo < 1 < hi
        assert cell(m, r, COL_AFTER, TIP) == tip
    assert cell(m, i["mm0"], COL_SPEEDUP) == f"{mm0.speedup:.2f}×"
    assert cell(m, i["mm0"], COL_SPEEDUP, FG) == theme.FASTER
    assert cell(m, i["mm0"], COL_AFTER, FG) is None
    assert cell(m, i["mm0"], COL_SPEEDUP, TIP).startswith(f"{mm0.speedup:.2f}× faster: ")
    # a slower op beyond the noise is red
    m.set_comparison(SimpleNamespace(nodes=[timed("mm0", "MatMul", 0.6, 1 / TWICE, seed=6)]))
    assert cell(m, i["mm0"], COL_SPEEDUP) == "0.50×"
    assert cell(m, i["mm0"], COL_SPEEDUP, FG) == theme.SLOWER
    m.set_comparison(SimpleNamespace(nodes=rows))
    # removed and added say so, instead of an empty cell
    assert cell(m, i["mm1"], COL_SPEEDUP) == "removed" and m.value(i["mm1"], COL_AFTER) is None
    assert "no node of the optimized model" in cell(m, i["mm1"], COL_SPEEDUP, TIP)
    assert cell(m, i["relu0"], COL_SPEEDUP) == "added"
    assert cell(m, i["mm1"], COL_SPEEDUP, FG) is None
    # nothing compared: nothing shown
    assert cell(m, i["add1"], COL_SPEEDUP) == "" and cell(m, i["add1"], COL_SPEEDUP, TIP) is None


def test_layer_tree_shows_verdicts(app, qtbot):
    table, graph = make_layer_table(qtbot)
    table.set_grouped(True)
    up, mul, down = (graph.node(f"/model/layers.1/mlp/{n}").name
                     for n in ("up_proj/MatMul", "Mul", "down_proj/MatMul"))
    q = graph.node("/model/layers.1/self_attn/q_proj/MatMul").name
    rows = [timed(up, "MatMul", 0.5, TWICE, group=[up, mul], seed=8),
            timed(q, "MatMul", 0.3, ADD_LIKE, seed=10),
            NodeDelta(down, "MatMul", 0.1, None, status=REMOVED, before_series=[0.1] * 20)]
    table.model.set_comparison(SimpleNamespace(nodes=rows))
    p = table.tree_proxy
    layer1 = tree_rows(table)[1]
    attention, mlp = tree_rows(table, layer1)[1], tree_rows(table, layer1)[2]
    # operator rows: as in the flat table
    ops = {ix.data(): ix.siblingAtColumn(COL_SPEEDUP) for ix in tree_rows(table, mlp)}
    assert ops["mlp/up_proj/MatMul"].data() == ops["mlp/Mul"].data() == f"{rows[0].speedup:.2f}×"
    assert ops["mlp/up_proj/MatMul"].data(FG) == theme.FASTER
    assert ops["mlp/down_proj/MatMul"].data() == "removed"
    q_cell = tree_rows(table, attention)[0].siblingAtColumn(COL_SPEEDUP)
    assert q_cell.data() == "≈ 1×" and q_cell.data(FG) == theme.NOISE
    assert "no change beyond the noise" in q_cell.data(TIP)
    # a module's verdict from its rows' runs summed run by run: the MLP lost down_proj (0 ms
    # after) and halved up_proj, counted once although shown on up_proj and Mul
    expected = paired_speedup(
        (np.array(rows[0].before_series) + np.array(rows[2].before_series)).tolist(),
        rows[0].after_series)
    assert expected.significant and expected.median > 2
    mlp_cell = p.index(mlp.row(), COL_SPEEDUP, layer1)
    assert mlp_cell.data() == f"{expected.median:.2f}×"
    assert mlp_cell.data(SORT_ROLE) == expected.median
    assert mlp_cell.data(FG) == theme.FASTER
    assert f"{expected.low:.2f}–{expected.high:.2f}×" in mlp_cell.data(TIP)
    att_cell = p.index(attention.row(), COL_SPEEDUP, layer1)
    assert att_cell.data() == "≈ 1×" and att_cell.data(FG) == theme.NOISE
    assert p.index(attention.row(), COL_AFTER, layer1).data(FG) == theme.NOISE
    assert "no change beyond the noise" in att_cell.data(TIP)
    # a layer nothing was compared in shows nothing
    assert p.index(0, COL_SPEEDUP).data() == "" and p.index(0, COL_SPEEDUP).data(TIP) is None


# --- grouped by layer ---------------------------------------------------------------------------

def make_layer_table(qtbot, layers=3):
    from layer_models import layered_decoder

    graph = analyze(layered_decoder(layers=layers), {"batch": 1, "seq": 4})
    table = OpTable()
    qtbot.addWidget(table)
    table.resize(900, 500)
    table.show()
    table.set_graph(graph)
    return table, graph


def tree_rows(table, parent=None):
    from PySide6.QtCore import QModelIndex

    p = table.tree_proxy
    parent = parent or QModelIndex()
    return [p.index(r, 0, parent) for r in range(p.rowCount(parent))]


def test_layer_tree_rows_and_totals(app, qtbot):
    from layer_models import PER_LAYER

    table, graph = make_layer_table(qtbot)
    assert table.group_box.isEnabled() and not table.grouped()
    shown = []
    table.layersShown.connect(shown.append)
    table.group_box.setChecked(True)
    assert table.grouped() and table.stack.currentWidget() is table.tree
    assert shown == [table.grouping]
    p = table.tree_proxy
    top = tree_rows(table)
    assert [ix.data() for ix in top] == ["layer 0", "layer 1", "layer 2", "not in a layer"]
    assert p.index(0, COL_OP).data() == f"{PER_LAYER} ops"
    assert [ix.data() for ix in tree_rows(table, top[1])] == ["norms", "attention", "MLP",
                                                              "other"]
    assert [ix.data() for ix in tree_rows(table, top[3])] == ["embedding", "norms", "lm_head"]
    mlp = tree_rows(table, top[1])[2]
    # operators under their layer: the path inside it; the full name in the tooltip
    ops = tree_rows(table, mlp)
    assert [ix.data() for ix in ops] == [
        "mlp/gate_proj/MatMul", "mlp/up_proj/MatMul", "mlp/Mul", "mlp/down_proj/MatMul"]
    assert ops[1].data(Qt.ItemDataRole.ToolTipRole) == "/model/layers.1/mlp/up_proj/MatMul"
    assert tree_rows(table, tree_rows(table, top[3])[2])[0].data() == "/lm_head/MatMul"
    # FLOPs and bytes: sums of the operators below
    layer1 = table.grouping.layer_nodes(("model.layers", 1))
    flops = sum(graph.nodes[i].flops for i in layer1)
    m = table.tree_model
    assert m.group_value(p.mapToSource(top[1]).internalId(), COL_FLOPS) == flops
    assert p.index(1, COL_FLOPS).data() == f"{flops / 1e3:.2f}k"
    mlp_params = sum(graph.nodes[i].param_bytes for i in
                     table.grouping.module_nodes(("model.layers", 1), "mlp"))
    assert p.data(p.index(2, COL_PARAMS, top[1])) == f"{mlp_params / 1024:.1f} KiB"
    # time: a fused group is one measurement shown on both members, counted once
    up, mul = graph.node("/model/layers.1/mlp/up_proj/MatMul"), graph.node("/model/layers.1/mlp/Mul")
    q = graph.node("/model/layers.1/self_attn/q_proj/MatMul")
    table.model.set_profile(SimpleNamespace(nodes=[
        SimpleNamespace(name=up.name, p50_ms=0.5, share=0.25, group=[up.name, mul.name]),
        SimpleNamespace(name=q.name, p50_ms=0.25, share=0.125, group=[])]))
    assert table.model.value(mul.index, COL_P50) == 0.5
    assert p.index(1, COL_P50).data() == "0.750"
    assert p.data(p.index(2, COL_P50, top[1])) == "0.500"  # MLP
    assert p.data(p.index(1, COL_SHARE, top[1])) == "12.5%"  # attention
    assert p.index(0, COL_P50).data() == ""  # layer 0 was not measured
    # a comparison: before/after sums and their ratio on group rows
    table.model.set_comparison(SimpleNamespace(nodes=[SimpleNamespace(
        name=up.name, group=[mul.name], before_ms=0.5, after_ms=0.25, speedup=2.0)]))
    assert p.data(p.index(2, COL_AFTER, top[1])) == "0.250"
    assert p.data(p.index(2, COL_SPEEDUP, top[1])) == "2.00×"
    # summed medians of rows not timed in pairs: a figure, but no verdict colour
    assert p.data(p.index(2, COL_SPEEDUP, top[1]), Qt.ItemDataRole.ForegroundRole) is None
    assert "no verdict" in p.data(p.index(2, COL_SPEEDUP, top[1]), Qt.ItemDataRole.ToolTipRole)
    # the filter keeps matching operators and the groups holding them
    table.filter.setText("up_proj")
    assert [ix.data() for ix in tree_rows(table)] == ["layer 0", "layer 1", "layer 2"]
    assert [ix.data() for ix in tree_rows(table, tree_rows(table)[0])] == ["MLP"]
    table.filter.setText("")
    table.group_box.setChecked(False)
    assert shown[-1] is None and table.stack.currentWidget() is table.view


def test_layer_and_module_rows_select_their_operators(app, qtbot):
    table, graph = make_layer_table(qtbot)
    table.set_grouped(True)
    got = []
    table.selectionChanged.connect(got.append)
    top = tree_rows(table)
    rect = table.tree.visualRect(top[2])
    qtbot.mouseClick(table.tree.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    layer2 = table.grouping.layer_nodes(("model.layers", 2))
    assert got[-1] == layer2 and table.selected() == layer2
    table.tree.expand(top[0])
    attention = tree_rows(table, top[0])[1]
    table.tree.selectionModel().select(
        attention, QItemSelectionModel.SelectionFlag.ClearAndSelect
        | QItemSelectionModel.SelectionFlag.Rows)
    assert [graph.nodes[i].name for i in got[-1]] == [
        f"/model/layers.0/self_attn/{n}" for n in
        ("q_proj/MatMul", "v_proj/MatMul", "Softmax", "Mul", "o_proj/MatMul")]
    # from the graph: operator rows get selected, their layer opened, nothing echoed back
    n = len(got)
    down = graph.node("/model/layers.1/mlp/down_proj/MatMul").index
    table.set_selection([down])
    assert table.selected() == [down] and len(got) == n
    assert table.tree.isExpanded(top[1])
    # switching back to the flat table keeps the selection
    table.set_grouped(False)
    assert table.selected() == [down]


def test_role_selected_across_layers_from_menu_and_picker(app, qtbot):
    table, graph = make_layer_table(qtbot)
    got = []
    table.selectionChanged.connect(got.append)
    ups = [graph.node(f"/model/layers.{i}/mlp/up_proj/MatMul").index for i in range(3)]
    # flat table: the row's context menu
    menu = table.menu_for(table.view, table.proxy.mapFromSource(table.model.index(ups[1], 0)))
    texts = [a.text() for a in menu.actions()]
    assert texts == ["Select every …/mlp/up_proj/MatMul (3 layers)", "Select layer 1 (13 ops)"]
    menu.actions()[0].trigger()
    assert got[-1] == ups and table.selected() == ups
    # tree: a module row offers that module in every layer
    table.set_grouped(True)
    module = tree_rows(table, tree_rows(table)[0])[2]
    menu = table.menu_for(table.tree, module)
    assert [a.text() for a in menu.actions()] == ["Select the MLP of every layer (12 ops)"]
    menu.actions()[0].trigger()
    assert got[-1] == table.grouping.module_everywhere("mlp") and len(got[-1]) == 12
    # rows outside the layers have no role to offer
    outside = tree_rows(table, tree_rows(table)[3])[2]  # lm_head
    assert table.menu_for(table.tree, outside) is None
    # the picker lists the weight-bearing roles; picking one selects it in every layer
    combo = table.role_combo
    roles = [combo.itemData(i) for i in range(1, combo.count())]
    assert "mlp/up_proj/MatMul" in roles and "self_attn/Softmax" not in roles
    combo.activated.emit(combo.findData("mlp/down_proj/MatMul"))
    assert [graph.nodes[i].name for i in got[-1]] == [
        f"/model/layers.{i}/mlp/down_proj/MatMul" for i in range(3)]
    assert combo.currentIndex() == 0
    assert table.selected() == got[-1]


def test_no_layers_no_grouping(app, qtbot):
    table, _graph = make_table(qtbot)
    assert not table.group_box.isEnabled() and not table.role_combo.isEnabled()
    table.set_grouped(True)
    assert not table.grouped() and table.stack.currentWidget() is table.view


def test_main_window_layer_view(window, qtbot, tmp_path):
    """Open a 3-layer model in the real window, group by layer, select a layer, then a role."""
    import dataclasses

    import onnx
    import pytest

    from layer_models import layered_decoder

    path = tmp_path / "decoder.onnx"
    onnx.save(layered_decoder(layers=3), path)
    window.set_run_settings(dataclasses.replace(window.run_settings, dims={"batch": 1, "seq": 8}))
    assert window.open_model(path)
    table = window.table
    qtbot.mouseClick(table.group_box, Qt.MouseButton.LeftButton,
                     pos=table.group_box.rect().center())
    assert table.grouped()
    assert [f.label for f in window.graph_view.layer_frames()] == ["layer 0", "layer 1",
                                                                   "layer 2"]
    # a click on a layer row selects its operators, in the graph and the Optimize panel too
    top = tree_rows(table)
    qtbot.mouseClick(table.tree.viewport(), Qt.MouseButton.LeftButton,
                     pos=table.tree.visualRect(top[1]).center())
    layer1 = [n.name for n in window.graph.nodes if n.name.startswith("/model/layers.1/")]
    assert window.selected_names() == layer1 and len(layer1) == 13
    assert window.panel.selection == layer1
    # every up_proj of every layer: one pick
    combo = table.role_combo
    combo.activated.emit(combo.findData("mlp/up_proj/MatMul"))
    ups = [f"/model/layers.{i}/mlp/up_proj/MatMul" for i in range(3)]
    assert window.selected_names() == ups and window.panel.selection == ups
    # after a profile, layer rows carry the time of their operators
    worker = window.run_profile()
    qtbot.waitUntil(lambda: worker.is_done() and window.progress.isHidden(), timeout=60000)
    assert window.profile is not None, window.banner_text.text()
    p = table.tree_proxy
    layer_ms = p.index(1, COL_P50).data(SORT_ROLE)
    measured = {s.name: s.p50_ms for s in window.profile.nodes}
    expected = sum(ms for name, ms in measured.items() if name.startswith("/model/layers.1/"))
    assert layer_ms == pytest.approx(expected) and layer_ms > 0
    # the graph sums shares per folded layer from the table's once-per-kernel shares
    once = table.share_once()
    assert np.nansum(once) == pytest.approx(sum(s.share for s in window.profile.nodes))
    # the graph's layer label selects the same layer
    window.graph_view.fit_all()
    window.graph_view.viewport().repaint()
    label = window.graph_view.layer_frames()[2].label_rect
    qtbot.mouseClick(window.graph_view.viewport(), Qt.MouseButton.LeftButton,
                     pos=label.center())
    assert window.selected_names() == [n.name for n in window.graph.nodes
                                       if n.name.startswith("/model/layers.2/")]
    # View ▸ Fold every layer: one box per layer, the selection kept
    from PySide6.QtGui import QAction

    actions = {a.text(): a for a in window.findChildren(QAction)}
    actions["Fold every layer"].trigger()
    view = window.graph_view
    assert view.folded_layers() == set(table.grouping.layers())
    assert len(view.item.graph.nodes) == len(window.graph.nodes) - 3 * 13 + 3
    box = view.box_of(window.graph.node("/model/layers.2/Add").index)
    assert view.item.selected.tolist().count(True) == 1 and view.item.selected[box]
    actions["Open every layer"].trigger()
    assert view.folded_layers() == set() and view.item.layout is view.layout_


def test_gui_command_opens_grouped_by_layer(tmp_path):
    """``opstudio gui MODEL --by-layer --dim …``: a real process, as the docs screenshot is made."""
    import os
    import subprocess
    import sys

    import onnx
    from PySide6.QtGui import QImage

    from layer_models import layered_decoder

    path = tmp_path / "decoder.onnx"
    onnx.save(layered_decoder(layers=3), path)
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_CONFIG_HOME": str(tmp_path)}
    images = []
    for flags in ([], ["--by-layer", "--dim", "seq=7"]):
        shot = tmp_path / f"shot{len(images)}.png"
        proc = subprocess.run(
            [sys.executable, "-m", "opstudio", "gui", str(path), "--size", "1200x800",
             "--screenshot", str(shot), "--quit-after", "1", *flags],
            env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        images.append(QImage(str(shot)))
    assert images[0] != images[1]  # the tree and the layer frames
    assert '\\"seq\\": 7' in (tmp_path / "opstudio" / "opstudio.conf").read_text()


def test_layer_flops_read_a_dash_while_dims_are_missing(app, qtbot):
    from llm_builders import kv_decoder

    # batch given, the lengths not: each layer holds Casts (0 FLOPs) and MatMuls (unknown),
    # whose known part would sum to a misleading 0
    model = kv_decoder("hf", layers=2)
    for dims, known in (({"batch_size": 1}, False),
                        ({"batch_size": 1, "sequence_length": 1, "past_sequence_length": 8,
                          "total_sequence_length": 9}, True)):
        graph = analyze(model, dims)
        table = OpTable()
        qtbot.addWidget(table)
        table.set_graph(graph)
        table.set_grouped(True)
        p = table.tree_proxy
        top = tree_rows(table)
        assert [ix.data() for ix in top] == ["layer 0", "layer 1", "not in a layer"]
        layer0 = table.grouping.layer_nodes(("model.layers", 0))
        flops = [graph.nodes[i].flops for i in layer0]
        cells = [p.index(r, COL_FLOPS).data() for r in range(len(top))]
        if known:
            assert None not in flops
            assert cells[0] == f"{sum(flops) / 1e3:.2f}k"
        else:
            assert None in flops and 0 in flops
            assert cells == ["–", "–", "–"]
            # an operator whose FLOPs are unknown reads the same
            mm = graph.node("/model/layers.0/attn/q_proj/MatMul").index
            assert table.model.data(table.model.index(mm, COL_FLOPS)) == "–"
        assert p.index(0, COL_PARAMS).data().endswith("KiB")  # weights are always known
