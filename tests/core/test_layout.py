"""Layered layout: layers follow the edges, boxes in a layer do not overlap, same input → same
output, and polylines join the right boxes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from opstudio.core.model.graph import analyze
from opstudio.core.model.layout import MAX_DUMMY_SPAN, NODE_GAP, compute_layout, layout_arrays
from opstudio.core.model.model_io import ensure_node_names


def random_dag(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    src, dst = [], []
    for v in range(1, n):
        for _ in range(int(rng.integers(1, 4))):
            u = v - int(rng.geometric(0.25))
            if u >= 0:
                src.append(u)
                dst.append(v)
        if rng.random() < 0.03:  # a long skip, like a mask used by every block
            src.append(0)
            dst.append(v)
    return np.asarray(src), np.asarray(dst)


def assert_no_overlap(lay) -> None:
    order = np.lexsort((lay.x, lay.layer))
    layer, x, w = lay.layer[order], lay.x[order], lay.width[order]
    same = layer[1:] == layer[:-1]
    gap = (x[1:] - w[1:] / 2) - (x[:-1] + w[:-1] / 2)
    assert (gap[same] >= NODE_GAP - 1e-6).all()


def test_layers_follow_edges_and_boxes_do_not_overlap():
    src, dst = random_dag(800, seed=1)
    widths = np.random.default_rng(2).uniform(60, 200, 800)
    lay = layout_arrays(800, src, dst, widths)
    assert (lay.layer[dst] > lay.layer[src]).all()
    assert_no_overlap(lay)
    # y is a function of the layer only, growing downwards
    assert np.allclose(np.diff(np.unique(lay.y)), np.diff(np.unique(lay.y))[0])
    assert (lay.y[dst] > lay.y[src]).all()


def test_deterministic():
    src, dst = random_dag(500, seed=3)
    a = layout_arrays(500, src, dst)
    b = layout_arrays(500, src, dst)
    for field in ("x", "y", "layer", "edge_points", "edge_offsets"):
        assert np.array_equal(getattr(a, field), getattr(b, field))


def test_polylines_run_from_source_bottom_to_target_top():
    src, dst = random_dag(300, seed=4)
    lay = layout_arrays(300, src, dst)
    pts, off = lay.edge_points, lay.edge_offsets
    assert len(off) == len(src) + 1
    first, last = pts[off[:-1]], pts[off[1:] - 1]
    assert np.allclose(first[:, 0], lay.x[src]) and np.allclose(last[:, 0], lay.x[dst])
    assert np.allclose(first[:, 1], lay.y[src] + lay.height[src] / 2)
    assert np.allclose(last[:, 1], lay.y[dst] - lay.height[dst] / 2)
    span = lay.layer[dst] - lay.layer[src]
    n_pts = np.diff(off)
    routed = (span > 1) & (span <= MAX_DUMMY_SPAN)
    # one bend point per skipped layer for routed edges, straight otherwise
    assert (n_pts[routed] == span[routed] + 1).all()
    assert (n_pts[~routed] == 2).all()
    seg, edge = lay.segments()
    assert len(seg) == int((n_pts - 1).sum())
    assert np.array_equal(np.bincount(edge, minlength=len(src)), n_pts - 1)


def test_sources_sit_just_above_their_first_consumer():
    # a constant feeding the last node must not be placed at the top of a long chain
    n = 12
    src = np.array([*range(n - 2), n - 1])
    dst = np.array([*range(1, n - 1), n - 2])
    lay = layout_arrays(n, src, dst)
    assert lay.layer[n - 1] == lay.layer[n - 2] - 1


def test_hit_tests():
    src, dst = random_dag(200, seed=5)
    lay = layout_arrays(200, src, dst)
    for i in (0, 57, 199):
        assert lay.node_at(lay.x[i], lay.y[i]) == i
        assert i in lay.nodes_in_rect(lay.x[i] - 1, lay.y[i] - 1, lay.x[i] + 1, lay.y[i] + 1)
    left, top, right, bottom = lay.bounds()
    assert lay.node_at(left - 10, top - 10) is None
    assert len(lay.nodes_in_rect(left, top, right, bottom)) == 200


def test_compute_layout_from_a_model():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r"),
             helper.make_node("Sigmoid", ["x"], ["b"], name="s"),
             helper.make_node("Add", ["a", "b"], ["c"], name="add"),
             helper.make_node("MatMul", ["c", "w"], ["y"], name="mm")]
    w = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4, 4], [0.0] * 16)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ensure_node_names(model)
    info = analyze(model)
    lay = compute_layout(info)
    idx = {n.name: n.index for n in info.nodes}
    assert lay.layer[idx["r"]] == lay.layer[idx["s"]] == 0
    assert lay.layer[idx["add"]] == 1 and lay.layer[idx["mm"]] == 2
    # the two branches sit side by side, the join between them
    lo, hi = sorted([lay.x[idx["r"]], lay.x[idx["s"]]])
    assert lo < lay.x[idx["add"]] < hi
    assert lay.width[idx["mm"]] >= lay.width[idx["r"]]
    assert_no_overlap(lay)


def test_empty_and_edgeless():
    lay = layout_arrays(0, np.zeros(0), np.zeros(0))
    assert lay.n_nodes == 0 and lay.bounds() == (0.0, 0.0, 0.0, 0.0)
    lay = layout_arrays(3, np.zeros(0), np.zeros(0))
    assert (lay.layer == 0).all()
    assert_no_overlap(lay)
