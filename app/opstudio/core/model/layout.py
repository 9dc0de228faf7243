"""Layered top-to-bottom layout of the operator graph, as numpy arrays (for the graph view).

A "Sugiyama-lite" in four steps, each cheap enough for LLM-sized graphs (10k–50k nodes):

1. layering — longest path from the inputs; nodes without producers (constants, shape
   helpers) are pulled down next to their first consumer so they do not pile up at the top;
2. short edges that skip layers get dummy nodes, so they can bend around boxes; edges that skip
   more than ``MAX_DUMMY_SPAN`` layers (a mask or position ids used by every block) are drawn
   straight instead, because routing them would add millions of dummies on a deep model;
3. ordering — a few barycentric sweeps, done for all layers at once (Jacobi style) with numpy
   rather than layer by layer, which would be a Python loop over thousands of layers;
4. x coordinates — nodes move towards the mean x of their neighbours, then overlaps inside a
   layer are removed with a segmented running maximum (left and right packings averaged).

Everything here is deterministic: the same graph gives the same arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from opstudio.core.model.graph import GraphInfo

NODE_HEIGHT = 28.0
LAYER_GAP = 34.0  # vertical space between the boxes of two layers
NODE_GAP = 18.0  # horizontal space between two boxes of one layer
CHAR_WIDTH = 7.2  # width of one label character at the view's base font, in scene units
MIN_WIDTH = 64.0
DUMMY_WIDTH = 10.0
MAX_DUMMY_SPAN = 12
ORDER_SWEEPS = 8
COORD_SWEEPS = 6


@dataclass
class Layout:
    """Node centres and sizes, and each graph edge as a polyline, in scene units (y grows down).

    ``edge_src[i]``/``edge_dst[i]`` are the node indices of ``graph.edges[i]``; its polyline is
    ``edge_points[edge_offsets[i]:edge_offsets[i + 1]]``.
    """

    x: np.ndarray
    y: np.ndarray
    width: np.ndarray
    height: np.ndarray
    layer: np.ndarray
    edge_src: np.ndarray
    edge_dst: np.ndarray
    edge_offsets: np.ndarray
    edge_points: np.ndarray

    @property
    def n_nodes(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.layer.max()) + 1 if self.layer.size else 0

    def bounds(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of all boxes."""
        if not self.x.size:
            return (0.0, 0.0, 0.0, 0.0)
        hw, hh = self.width / 2, self.height / 2
        return (float((self.x - hw).min()), float((self.y - hh).min()),
                float((self.x + hw).max()), float((self.y + hh).max()))

    def node_at(self, px: float, py: float) -> int | None:
        """Index of the box containing the point, or None."""
        hit = np.flatnonzero((np.abs(self.x - px) <= self.width / 2)
                             & (np.abs(self.y - py) <= self.height / 2))
        return int(hit[0]) if hit.size else None

    def nodes_in_rect(self, left: float, top: float, right: float, bottom: float) -> np.ndarray:
        """Indices of boxes that intersect the rectangle."""
        hw, hh = self.width / 2, self.height / 2
        mask = ((self.x + hw >= left) & (self.x - hw <= right)
                & (self.y + hh >= top) & (self.y - hh <= bottom))
        return np.flatnonzero(mask)

    def segments(self) -> tuple[np.ndarray, np.ndarray]:
        """All polyline pieces as an (S, 4) array of x0, y0, x1, y1 and the edge of each piece."""
        pts = self.edge_points
        counts = np.diff(self.edge_offsets)
        first = np.zeros(len(pts), dtype=bool)
        if len(pts):
            first[self.edge_offsets[:-1][counts > 0]] = True
        keep = np.flatnonzero(~first)  # every point but a polyline's first ends a piece
        seg = np.column_stack([pts[keep - 1], pts[keep]]) if keep.size else np.zeros((0, 4))
        edge_of_point = np.repeat(np.arange(len(counts)), counts)
        return seg, edge_of_point[keep] if keep.size else np.zeros(0, dtype=np.int64)


def label_width(labels: list[str]) -> np.ndarray:
    lengths = np.fromiter((len(s) for s in labels), dtype=np.float64, count=len(labels))
    return np.maximum(MIN_WIDTH, lengths * CHAR_WIDTH + 22.0)


def compute_layout(graph: GraphInfo) -> Layout:
    n = len(graph.nodes)
    widths = label_width([node.op_type for node in graph.nodes])
    if graph.edges:
        e = np.asarray([(s, d) for s, d, _ in graph.edges], dtype=np.int64)
        src, dst = e[:, 0], e[:, 1]
    else:
        src = dst = np.zeros(0, dtype=np.int64)
    return layout_arrays(n, src, dst, widths)


def layout_arrays(n: int, src: np.ndarray, dst: np.ndarray,
                  widths: np.ndarray | None = None) -> Layout:
    """Layout of a DAG given as edge arrays (node indices); the core of :func:`compute_layout`."""
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    widths = np.full(n, MIN_WIDTH) if widths is None else np.asarray(widths, dtype=np.float64)
    if n == 0:
        z = np.zeros(0)
        return Layout(z, z, z, z, np.zeros(0, np.int64), src, dst, np.zeros(1, np.int64),
                      np.zeros((0, 2)))
    layer = _layers(n, src, dst)

    # 2. dummies for edges that skip a few layers
    span = layer[dst] - layer[src]
    routed = (span > 1) & (span <= MAX_DUMMY_SPAN)
    r_idx = np.flatnonzero(routed)
    n_dum = span[r_idx] - 1
    total_dummies = int(n_dum.sum())
    m = n + total_dummies
    # dummy k of routed edge j sits at layer[src]+k (k = 1..span-1)
    dum_edge = np.repeat(r_idx, n_dum)
    first = np.cumsum(n_dum) - n_dum
    k = np.arange(total_dummies) - np.repeat(first, n_dum) + 1
    dum_ids = n + np.arange(total_dummies)
    all_layer = np.concatenate([layer, layer[src[dum_edge]] + k])
    all_width = np.concatenate([widths, np.full(total_dummies, DUMMY_WIDTH)])

    # virtual edges between adjacent layers only
    direct = span == 1
    prev = np.concatenate([[-1], dum_edge[:-1]])
    is_first = dum_edge != prev
    nxt = np.concatenate([dum_edge[1:], [-1]])
    is_last = dum_edge != nxt
    v_src = np.concatenate([
        src[direct],
        src[dum_edge[is_first]],  # source -> first dummy
        dum_ids[:-1][~is_last[:-1]] if total_dummies else np.zeros(0, np.int64),  # chain
        dum_ids[is_last],  # last dummy -> target
    ])
    v_dst = np.concatenate([
        dst[direct],
        dum_ids[is_first],
        dum_ids[1:][~is_last[:-1]] if total_dummies else np.zeros(0, np.int64),
        dst[dum_edge[is_last]],
    ])

    order_pos = _order(m, all_layer, v_src, v_dst)
    x = _coordinates(m, all_layer, order_pos, all_width, v_src, v_dst)
    pitch = NODE_HEIGHT + LAYER_GAP
    y = all_layer.astype(np.float64) * pitch

    # polylines: bottom of source, dummies, top of target
    half = NODE_HEIGHT / 2
    n_pts = np.full(len(src), 2, dtype=np.int64)
    n_pts[r_idx] += n_dum
    offsets = np.concatenate([[0], np.cumsum(n_pts)])
    pts = np.empty((int(offsets[-1]), 2))
    pts[offsets[:-1], 0] = x[src]
    pts[offsets[:-1], 1] = y[src] + half
    pts[offsets[1:] - 1, 0] = x[dst]
    pts[offsets[1:] - 1, 1] = y[dst] - half
    if total_dummies:
        where = offsets[dum_edge] + k
        pts[where, 0] = x[dum_ids]
        pts[where, 1] = y[dum_ids]
    return Layout(x=x[:n].copy(), y=y[:n].copy(), width=widths.copy(),
                  height=np.full(n, NODE_HEIGHT), layer=layer, edge_src=src, edge_dst=dst,
                  edge_offsets=offsets, edge_points=pts)


def _layers(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Longest-path layers, then producer-less nodes moved down next to their consumers."""
    order = _topological(n, src, dst)
    preds_sorted = np.argsort(dst, kind="stable")
    d_sorted, s_sorted = dst[preds_sorted], src[preds_sorted]
    starts = np.searchsorted(d_sorted, np.arange(n + 1))
    starts_l, s_list = starts.tolist(), s_sorted.tolist()
    layer = [0] * n
    for v in order.tolist():  # a Python loop: sequential by nature, ~0.1 µs per edge
        a, b = starts_l[v], starts_l[v + 1]
        if a != b:
            layer[v] = max(layer[u] for u in s_list[a:b]) + 1
    lay = np.asarray(layer, dtype=np.int64)
    has_pred = np.zeros(n, dtype=bool)
    has_pred[dst] = True
    has_succ = np.zeros(n, dtype=bool)
    has_succ[src] = True
    sinkable = ~has_pred & has_succ
    if sinkable.any():
        first_use = np.full(n, np.iinfo(np.int64).max)
        np.minimum.at(first_use, src, lay[dst])
        lay = np.where(sinkable, first_use - 1, lay)
    # drop empty layers
    _, lay = np.unique(lay, return_inverse=True)
    return lay.astype(np.int64).reshape(-1)


def _topological(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    if not len(src) or bool((src < dst).all()):
        return np.arange(n)  # GraphInfo already numbers nodes in topological order
    indeg = np.bincount(dst, minlength=n).tolist()
    by_src = np.argsort(src, kind="stable")
    starts = np.searchsorted(src[by_src], np.arange(n + 1)).tolist()
    succ = dst[by_src].tolist()
    ready = [v for v in range(n) if indeg[v] == 0]
    out: list[int] = []
    while ready:
        v = ready.pop()
        out.append(v)
        for w in succ[starts[v]:starts[v + 1]]:
            indeg[w] -= 1
            if indeg[w] == 0:
                ready.append(w)
    if len(out) != n:
        from opstudio.core.errors import GraphError

        raise GraphError("cannot lay out the graph: it has a cycle")
    return np.asarray(out, dtype=np.int64)


def _rank_in_layer(layer: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Centred position of each node in its layer after sorting by (layer, key, index)."""
    m = len(layer)
    order = np.lexsort((np.arange(m), key, layer))
    counts = np.bincount(layer)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(m, dtype=np.float64)
    rank[order] = np.arange(m) - starts[layer[order]]
    return rank - (counts[layer] - 1) / 2.0


def _order(m: int, layer: np.ndarray, v_src: np.ndarray, v_dst: np.ndarray) -> np.ndarray:
    # Start from file order (usually a depth-first walk of the model), then barycentres.
    pos = _rank_in_layer(layer, np.arange(m, dtype=np.float64))
    for sweep in range(ORDER_SWEEPS):
        a, b = (v_src, v_dst) if sweep % 2 == 0 else (v_dst, v_src)
        total = np.bincount(b, weights=pos[a], minlength=m)
        count = np.bincount(b, minlength=m)
        key = np.where(count > 0, total / np.maximum(count, 1), pos)
        pos = _rank_in_layer(layer, key)
    return pos


def _coordinates(m: int, layer: np.ndarray, pos: np.ndarray, width: np.ndarray,
                 v_src: np.ndarray, v_dst: np.ndarray) -> np.ndarray:
    seq = np.lexsort((pos, layer))  # nodes left to right, layer by layer
    lay_s = layer[seq]
    w_s = width[seq]
    same = np.concatenate([[False], lay_s[1:] == lay_s[:-1]])
    # minimum distance between the centres of a node and its left neighbour in the layer
    sep = np.where(same, (w_s + np.concatenate([[0.0], w_s[:-1]])) / 2 + NODE_GAP, 0.0)
    x = np.empty(m)
    x[seq] = _pack(lay_s, sep, np.zeros(m))
    # centre every layer on 0 to start
    x = _centre_layers(x, layer)
    for sweep in range(COORD_SWEEPS):
        a, b = (v_src, v_dst) if sweep % 2 == 0 else (v_dst, v_src)
        total = np.bincount(b, weights=x[a], minlength=m)
        count = np.bincount(b, minlength=m)
        want = np.where(count > 0, total / np.maximum(count, 1), x)
        x[seq] = _pack(lay_s, sep, want[seq])
    return x


def _pack(lay_s: np.ndarray, sep: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Positions closest to ``want`` keeping ``sep`` between neighbours, per layer (sorted)."""
    # Left packing: x_i = max(want_i, x_{i-1} + sep_i) = c_i + max_{j<=i}(want_j - c_j), with c
    # the cumulative separation inside the layer. A running maximum per layer is a global one
    # after adding an offset that grows with the layer.
    new_layer = np.concatenate([[True], lay_s[1:] != lay_s[:-1]])
    group = np.cumsum(new_layer) - 1
    csum = np.cumsum(sep)
    c = csum - (csum - sep)[new_layer][group]
    v = want - c
    big = float(v.max() - v.min()) + 1.0
    left = np.maximum.accumulate(v + group * big) - group * big + c
    # Right packing: the mirror image.
    v2 = -want[::-1]
    sep_r = np.concatenate([sep[1:], [0.0]])[::-1]
    lay_r = lay_s[::-1]
    new_r = np.concatenate([[True], lay_r[1:] != lay_r[:-1]])
    group_r = np.cumsum(new_r) - 1
    sep_r = np.where(new_r, 0.0, sep_r)
    csum_r = np.cumsum(sep_r)
    c_r = csum_r - (csum_r - sep_r)[new_r][group_r]
    w2 = v2 - c_r
    big2 = float(w2.max() - w2.min()) + 1.0
    right = -(np.maximum.accumulate(w2 + group_r * big2) - group_r * big2 + c_r)[::-1]
    return (left + right) / 2


def _centre_layers(x: np.ndarray, layer: np.ndarray) -> np.ndarray:
    counts = np.bincount(layer)
    lo = np.full(len(counts), np.inf)
    hi = np.full(len(counts), -np.inf)
    np.minimum.at(lo, layer, x)
    np.maximum.at(hi, layer, x)
    mid = np.where(counts > 0, (lo + hi) / 2, 0.0)
    return x - mid[layer]
