"""The operator table: values per column, numeric sorting, filtering, selection both ways."""

from __future__ import annotations

from types import SimpleNamespace

from PySide6.QtCore import QItemSelectionModel, Qt
from qt_models import mlp_model

from opstudio.core.graph import analyze
from opstudio.core.model_io import ensure_node_names
from opstudio.qt.op_table import (
    COL_AFTER,
    COL_FLOPS,
    COL_NAME,
    COL_P50,
    COL_PARAMS,
    COL_SHAPE,
    COL_SHARE,
    COL_SPEEDUP,
    COL_TECH,
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
    assert column(table, COL_NAME) == [n.name for n in graph.nodes]
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
    sm.select(table.proxy.index(4, 0), QItemSelectionModel.SelectionFlag.ClearAndSelect
              | QItemSelectionModel.SelectionFlag.Rows)
    assert got[-1] == [4]
    # selection survives sorting: rows are node indices, not view positions
    table.view.sortByColumn(COL_NAME, Qt.SortOrder.DescendingOrder)
    assert table.selected() == [4]
