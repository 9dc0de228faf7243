"""The graph view: painting at every level of detail, click / Ctrl-click / rubber band, search,
heat colouring, and edge tooltips — on synthetic graphs and a real model."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtGui import QImage, QPainter
from qt_models import synthetic_graph

from opstudio.qt.graph_view import GraphView


def make_view(qtbot, n=200):
    view = GraphView()
    qtbot.addWidget(view)
    view.resize(900, 700)
    view.show()
    qtbot.waitExposed(view)
    view.set_graph(synthetic_graph(n))
    return view


def render(view) -> QImage:
    img = QImage(view.viewport().size(), QImage.Format.Format_ARGB32)
    img.fill(0)
    p = QPainter(img)
    view.render(p)
    p.end()
    return img


def test_paints_at_far_and_close_zoom(app, qtbot):
    view = make_view(qtbot, 3000)
    view.fit_all()
    far = render(view)
    view.center_on(10)
    close = render(view)
    # both levels of detail put something other than the background on screen
    for img in (far, close):
        colours = {img.pixel(x, y) for x in range(0, img.width(), 7) for y in range(0, img.height(), 7)}
        assert len(colours) > 3


def test_click_ctrl_click_and_background_click(app, qtbot):
    view = make_view(qtbot)
    got = []
    view.selectionChanged.connect(got.append)
    view.center_on(5)
    qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton, pos=view.view_pos_of(5))
    assert view.selected() == [5] and got[-1] == [5]
    qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton,
                     Qt.KeyboardModifier.ControlModifier, pos=view.view_pos_of(6))
    assert view.selected() == [5, 6]
    qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton,
                     Qt.KeyboardModifier.ControlModifier, pos=view.view_pos_of(5))
    assert view.selected() == [6]
    lay = view.layout_
    empty = view.mapFromScene(QPointF(float(lay.x.max() + 400), float(lay.y[6])))
    qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton, pos=empty)
    assert view.selected() == []


def test_rubber_band_selects_the_boxes_inside(app, qtbot):
    view = make_view(qtbot)
    view.center_on(20)
    vp = view.viewport()
    a, b = view.view_pos_of(18), view.view_pos_of(22)
    lay = view.layout_
    # start outside every box, to the left of the graph
    left = view.mapFromScene(QPointF(float(lay.x.min() - 300), float(lay.y[18] - 20))).x()
    start = QPoint(max(left, 2), min(a.y(), b.y()) - 25)
    end = QPoint(vp.width() - 3, max(a.y(), b.y()) + 2)
    qtbot.mousePress(vp, Qt.MouseButton.LeftButton, pos=start)
    qtbot.mouseMove(vp, end)
    qtbot.mouseRelease(vp, Qt.MouseButton.LeftButton, pos=end)
    sel = view.selected()
    top, bottom = view.mapToScene(start).y(), view.mapToScene(end).y()
    expected = [i for i in range(len(lay.x)) if lay.y[i] + 14 >= top and lay.y[i] - 14 <= bottom
                and lay.x[i] + lay.width[i] / 2 >= view.mapToScene(start).x()]
    assert sel == expected and {18, 22} <= set(sel)


def test_search_by_op_type_and_name(app, qtbot):
    view = make_view(qtbot, 80)
    found = view.search("softmax")  # op type, case-insensitive
    assert found == [i for i in range(80) if i % 8 == 6]
    assert view.selected() == found
    assert view.search("node_7") == [7, *range(70, 80)]
    assert view.find_nodes("no such thing") == []


def test_heat_colours_and_legend(app, qtbot):
    view = make_view(qtbot, 50)
    share = np.linspace(0, 0.2, 50)
    share[3] = np.nan
    view.set_heat(share)
    item = view.item
    assert view.legend.visible and abs(view.legend.max_share - 0.2) < 1e-12
    assert item.colour[49] > item.colour[10]  # hotter node, later bin
    assert item.colour[3] == len(item._palette) - 1  # not measured
    view.set_heat(None)
    assert not view.legend.visible and np.array_equal(item.colour, item.base_colour)


def test_edge_tooltip_names_the_tensor(app, qtbot):
    view = make_view(qtbot, 30)
    view.center_on(4)
    _s, _d, tensor = view.graph.edges[3]
    seg = view.item.segments[view.item.segment_edge == 3][0]
    mid = QPointF((seg[0] + seg[2]) / 2, (seg[1] + seg[3]) / 2)
    assert view.item.edge_near(mid, 2.0) == 3
    assert view.graph.edges[3][2] == tensor


def _layered_view(qtbot):
    """A shown graph view of a 3-layer decoder, with the grouping of its nodes by layer."""
    from layer_models import layered_decoder
    from opstudio.core.model.graph import analyze
    from opstudio.core.model.layers import group_layers

    graph = analyze(layered_decoder(layers=3), {"batch": 1, "seq": 4})
    view = GraphView()
    qtbot.addWidget(view)
    view.resize(900, 700)
    view.show()
    qtbot.waitExposed(view)
    view.set_graph(graph)
    return graph, view, group_layers(n.name for n in graph.nodes)


def test_layer_frames_and_label_click_select_a_layer(app, qtbot):
    graph, view, grouping = _layered_view(qtbot)
    plain = render(view)
    view.show_layers(grouping)
    frames = view.layer_frames()
    assert [f.label for f in frames] == ["layer 0", "layer 1", "layer 2"]
    lay = view.layout_
    for f, key in zip(frames, grouping.layers(), strict=True):
        idx = grouping.layer_nodes(key)
        assert f.nodes.tolist() == idx
        # the frame holds every box of its layer, and no box of another layer's nodes
        for i in range(len(graph.nodes)):
            inside = f.rect.contains(QPointF(float(lay.x[i]), float(lay.y[i])))
            assert inside == (i in idx), graph.nodes[i].name
    view.fit_all()
    framed = render(view)
    assert framed != plain  # tints and labels drawn
    label = frames[1].label_rect
    assert not label.isEmpty() and view.viewport().rect().contains(label)
    got = []
    view.selectionChanged.connect(got.append)
    qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton, pos=label.center())
    assert got[-1] == grouping.layer_nodes(("model.layers", 1)) == view.selected()
    view.show_layers(None)
    assert view.layer_frames() == []


def test_fold_a_layer_into_one_box_and_open_it_again(app, qtbot):
    from layer_models import PER_LAYER

    graph, view, grouping = _layered_view(qtbot)
    view.show_layers(grouping)
    layer1 = ("model.layers", 1)
    inner = grouping.layer_nodes(layer1)
    up = graph.node("/model/layers.1/mlp/up_proj/MatMul").index
    view.set_selection([up])
    share = np.full(len(graph.nodes), 0.01)
    view.set_heat(share)

    assert view.set_folded({layer1}) == {layer1}
    box = view.box_of(up)
    assert view.box_of(inner[0]) == box and view.box_of(0) != box
    assert len(view.item.graph.nodes) == len(graph.nodes) - PER_LAYER + 1
    assert [f.label for f in view.layer_frames()] == ["layer 0", "layer 2"]
    # the selection is kept by node; the box is outlined because one of its nodes is selected
    assert view.selected() == [up] and view.item.selected[box] and view.item.selected.sum() == 1
    # a folded layer is as hot as its operators together: the hottest box
    assert view.item.colour[box] == view.item.colour.max()
    # ... a fused group's time, shown on each of its nodes, counted once
    once = share.copy()
    once[inner[1:]] = 0.0
    view.share_once = lambda: once
    view.set_heat(share)
    assert view.item.colour[box] == view.item.colour[view.box_of(0)]
    # a click on the box selects its operators; nodes inside are found at the box
    got = []
    view.selectionChanged.connect(got.append)
    view.center_on(up, zoom_in=True)
    pos = view.view_pos_of(up)
    qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton, pos=pos)
    assert got[-1] == inner and view.node_at_view(pos) == inner[0]
    # double-click opens it again, on the original layout
    qtbot.mouseDClick(view.viewport(), Qt.MouseButton.LeftButton, pos=pos)
    assert view.folded_layers() == set() and view.item.layout is view.layout_
    assert len(view.layer_frames()) == 3 and view.selected() == inner
    # a double click on a layer's label folds it
    view.fit_all()
    view.viewport().repaint()
    label = view.layer_frames()[2].label_rect
    qtbot.mouseDClick(view.viewport(), Qt.MouseButton.LeftButton, pos=label.center())
    assert view.folded_layers() == {("model.layers", 2)}
    view.fold_all()
    assert view.folded_layers() == set(grouping.layers()) and view.layer_frames() == []
    assert len(view.item.graph.nodes) == len(graph.nodes) - 3 * PER_LAYER + 3
    # no layers shown: nothing stays folded
    view.show_layers(None)
    assert view.folded_layers() == set() and view.item.layout is view.layout_
