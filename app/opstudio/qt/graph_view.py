"""The operator graph: one QGraphicsItem paints every node and edge itself, by level of detail.

A QGraphicsItem per node is too slow past a few thousand nodes, so ``GraphItem`` keeps the
layout as numpy arrays and, on each paint, culls to the exposed rectangle and draws:

- far away: boxes as filled paths, one path per colour, built from arrays (no Python loop per
  node) and edges as one path of line pieces;
- close up: rounded boxes with the op type, and the node name once there is room for it.

The layout is computed once per graph (``opstudio.core.model.layout``), never per frame.
Selection: click, Ctrl-click (toggle), drag on the background for a rubber band; middle or
right drag pans, the wheel zooms. Hovering an edge shows its tensor and shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPoint, QPointF, QRect, QRectF, QSize, Qt, Signal
from PySide6.QtGui import (
    QBrush,
    QColor,
    QFont,
    QFontMetricsF,
    QLinearGradient,
    QMouseEvent,
    QPainter,
    QPainterPath,
    QPen,
    QWheelEvent,
)
from PySide6.QtWidgets import (
    QGraphicsItem,
    QGraphicsObject,
    QGraphicsScene,
    QGraphicsView,
    QRubberBand,
    QStyleOptionGraphicsItem,
    QToolTip,
    QWidget,
)

from opstudio.core.model.graph import GraphInfo
from opstudio.core.model.layers import Collapsed, LayerGrouping, LayerKey, collapse_layers
from opstudio.core.model.layout import Layout, compute_layout, label_width, layout_arrays

# op type -> palette slot; a restrained, light palette so heat colours stand out later
CATEGORY_OPS = {
    1: {"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "QLinearMatMul", "QLinearConv",
        "ConvInteger", "MatMulNBits", "Attention", "MultiHeadAttention", "GroupQueryAttention",
        "FusedMatMul", "Einsum", "LSTM", "GRU", "RNN"},
    2: {"LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
        "SimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization",
        "SkipSimplifiedLayerNormalization", "LpNormalization"},
    3: {"Relu", "Gelu", "FastGelu", "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "Erf", "Elu",
        "LeakyRelu", "HardSigmoid", "HardSwish", "Mish", "Softplus", "PRelu", "Clip", "QuickGelu"},
    4: {"Reshape", "Transpose", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice",
        "Expand", "Constant", "Cast", "Identity", "Flatten", "Split", "Range", "ConstantOfShape",
        "Where", "Equal", "Tile", "ScatterND", "GatherElements", "GatherND", "Trilu", "Pad",
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Size", "NonZero"},
    5: {"Add", "Mul", "Sub", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Exp", "Log", "Abs",
        "ReduceMean", "ReduceSum", "ReduceMax", "Max", "Min", "Sum", "Mean", "Sin", "Cos"},
}
CATEGORY_COLOURS = ["#f4f4f1", "#dbe6f6", "#def0e0", "#fbe3d2", "#ececec", "#ece4f4"]
# a light-to-dark sequential scale for latency share (bins of equal width)
HEAT_STOPS = ["#fff7cf", "#fed976", "#fd9d46", "#f0592b", "#c8182a", "#7d0428"]
HEAT_BINS = 10
NO_DATA_COLOUR = "#f0f0f0"
SELECT_COLOUR = QColor("#1f6fd1")
EDGE_COLOUR = QColor("#9aa3ad")
BORDER_COLOUR = QColor("#7b8594")
# layer frames: two alternating tints so neighbouring layers read apart, even zoomed far out
FRAME_FILLS = (QColor(70, 110, 190, 22), QColor(120, 90, 170, 30))
FRAME_BORDER = QColor("#a3adbf")
FRAME_PAD = 10.0
FOLDED_WIDTH = 180.0  # a layer folded into one box

DETAIL_PX = 9.0  # below this box height on screen, boxes are drawn as plain filled shapes
LABEL_PX = 15.0  # from this box height the op type is written in the box
NAME_PX = 27.0  # from this box height the node name is written under the op type


def heat_colours(bins: int = HEAT_BINS) -> list[QColor]:
    cmap = pg.ColorMap(np.linspace(0, 1, len(HEAT_STOPS)), [QColor(c) for c in HEAT_STOPS])
    return [cmap.map((i + 0.5) / bins, mode="qcolor") for i in range(bins)]


class GraphItem(QGraphicsObject):
    """Paints the whole graph from the layout arrays."""

    def __init__(self, graph: GraphInfo, layout: Layout) -> None:
        super().__init__()
        self.graph, self.layout = graph, layout
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemUsesExtendedStyleOption, True)
        lay = layout
        self._left = lay.x - lay.width / 2
        self._right = lay.x + lay.width / 2
        self._top = lay.y - lay.height / 2
        self._bottom = lay.y + lay.height / 2
        self.segments, self.segment_edge = lay.segments()
        s = self.segments
        self._seg_lo = np.minimum(s[:, :2], s[:, 2:]) if len(s) else np.zeros((0, 2))
        self._seg_hi = np.maximum(s[:, :2], s[:, 2:]) if len(s) else np.zeros((0, 2))
        left, top, right, bottom = lay.bounds()
        self._bounds = QRectF(left - 20, top - 20, right - left + 40, bottom - top + 40)
        self.op_types = [n.op_type for n in graph.nodes]
        self.names = [n.name for n in graph.nodes]
        self.selected = np.zeros(lay.n_nodes, dtype=bool)
        self.dimmed: np.ndarray | None = None
        self.frames: list[LayerFrame] = []
        self._palette = [QColor(c) for c in CATEGORY_COLOURS] + heat_colours() + [
            QColor(NO_DATA_COLOUR)]
        self._text_colour = [QColor("#1d2430")] * len(self._palette)
        for i in range(len(CATEGORY_COLOURS) + HEAT_BINS // 2, len(CATEGORY_COLOURS) + HEAT_BINS):
            self._text_colour[i] = QColor("#ffffff")
        category = {op: k for k, ops in CATEGORY_OPS.items() for op in ops}
        self.base_colour = np.array([category.get(op, 0) for op in self.op_types], dtype=np.int64)
        self.colour = self.base_colour.copy()
        self._colour_version = 0
        self._cache_key: tuple[float, int] | None = None
        self._cache = np.zeros(0, dtype=np.int64)
        self._seg_cache_scale: float | None = None
        self._seg_cache = np.zeros(0, dtype=np.int64)
        self.font = QFont()
        self.font.setPixelSize(11)
        self.name_font = QFont()
        self.name_font.setPixelSize(9)

    # --- data -------------------------------------------------------------------------------
    def set_heat(self, share: np.ndarray | None) -> None:
        """Colour by latency share (0..1 per node, NaN = not measured), or back to op types."""
        if share is None:
            self.colour = self.base_colour.copy()
        else:
            share = np.asarray(share, dtype=np.float64)
            top = np.nanmax(share) if np.isfinite(share).any() else 0.0
            scaled = np.sqrt(np.clip(share / top, 0, 1)) if top > 0 else np.zeros_like(share)
            bins = np.minimum((np.nan_to_num(scaled) * HEAT_BINS).astype(np.int64), HEAT_BINS - 1)
            self.colour = np.where(np.isfinite(share), len(CATEGORY_COLOURS) + bins,
                                   len(self._palette) - 1)
        self._colour_version += 1
        self.update()

    def set_frames(self, frames: list[tuple[LayerKey, str, np.ndarray, np.ndarray]]) -> None:
        """Frame boxes by layer: (layer, label, its boxes, the graph nodes they show)."""
        self.frames = []
        for k, (key, label, boxes, nodes) in enumerate(frames):
            rect = QRectF(QPointF(float(self._left[boxes].min()), float(self._top[boxes].min())),
                          QPointF(float(self._right[boxes].max()),
                                  float(self._bottom[boxes].max())))
            self.frames.append(LayerFrame(
                label, nodes, rect.adjusted(-FRAME_PAD, -FRAME_PAD, FRAME_PAD, FRAME_PAD), k % 2,
                key))
        self.update()

    def boundingRect(self) -> QRectF:
        return self._bounds

    def visible_nodes(self, rect: QRectF) -> np.ndarray:
        return np.flatnonzero((self._right >= rect.left()) & (self._left <= rect.right())
                              & (self._bottom >= rect.top()) & (self._top <= rect.bottom()))

    def visible_segments(self, rect: QRectF) -> np.ndarray:
        lo, hi = self._seg_lo, self._seg_hi
        return np.flatnonzero((hi[:, 0] >= rect.left()) & (lo[:, 0] <= rect.right())
                              & (hi[:, 1] >= rect.top()) & (lo[:, 1] <= rect.bottom()))

    # --- painting ---------------------------------------------------------------------------
    def paint(self, painter: QPainter, option: QStyleOptionGraphicsItem,
              widget: QWidget | None = None) -> None:
        rect = option.exposedRect
        scale = max(painter.worldTransform().m22(), 1e-9)
        box_px = float(self.layout.height[0]) * scale if self.layout.n_nodes else 0.0
        detail = box_px >= DETAIL_PX
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, detail)
        self._paint_frames(painter, rect)
        self._paint_edges(painter, rect, detail)
        nodes = self.visible_nodes(rect)
        if detail:
            self._paint_boxes(painter, nodes, box_px)
        else:
            self._paint_coarse(painter, nodes)

    def _paint_frames(self, painter: QPainter, rect: QRectF) -> None:
        if not self.frames:
            return
        pen = QPen(FRAME_BORDER, 1.0, Qt.PenStyle.DashLine)
        pen.setCosmetic(True)
        painter.setPen(pen)
        for f in self.frames:
            if f.rect.intersects(rect):
                painter.setBrush(FRAME_FILLS[f.tint])
                painter.drawRect(f.rect)

    def _paint_edges(self, painter: QPainter, rect: QRectF, detail: bool) -> None:
        scale = painter.worldTransform().m22()
        idx = self.visible_segments(rect)
        if not idx.size:
            return
        if idx.size > 20000:
            # far out on a big graph: reuse the per-scale choice of one piece per pixel path
            keep = self._segment_cache(scale)
            idx = keep[np.isin(keep, idx, assume_unique=True)] if keep.size < idx.size else idx
        # Long edges (a mask feeding every block) would be stroked over their whole length,
        # far outside the screen: clip them to the exposed area first. Clipped, they run side
        # by side, and zoomed out most pieces share pixels: draw one line per pixel path.
        margin = 20 / max(scale, 1e-9)
        clip = rect.adjusted(-margin, -margin, margin, margin)
        seg = _dedupe_on_pixels(_clip_segments(self.segments[idx], clip), scale, clip)
        xs = seg[:, [0, 2]].reshape(-1)
        ys = seg[:, [1, 3]].reshape(-1)
        pen = QPen(EDGE_COLOUR, 1.2 if detail else 1.0)
        pen.setCosmetic(True)
        painter.setPen(pen)
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.drawPath(pg.arrayToQPath(xs, ys, connect="pairs", finiteCheck=False))

    def _segment_cache(self, scale: float) -> np.ndarray:
        if self._seg_cache_scale != scale:
            p = np.round(self.segments * scale).astype(np.int64)
            p -= p.min(axis=0)
            span = p.max(axis=0) + 1
            key = ((p[:, 0] * span[1] + p[:, 1]) * span[2] + p[:, 2]) * span[3] + p[:, 3]
            _, first = np.unique(key, return_index=True)
            self._seg_cache = np.sort(first)
            self._seg_cache_scale = scale
        return self._seg_cache

    def _coarse_cache(self, scale: float) -> np.ndarray:
        """Nodes to draw at this scale when zoomed out: one per pixel and colour (the choice
        depends on the scale only, so pans reuse it)."""
        key = (scale, self._colour_version)
        if self._cache_key != key:
            lay = self.layout
            px = np.round(lay.x * scale).astype(np.int64)
            py = np.round(lay.y * scale).astype(np.int64)
            node_key = ((px - px.min()) * (int(py.max() - py.min()) + 1) + (py - py.min())) \
                * 64 + self.colour
            _, first = np.unique(node_key, return_index=True)
            self._cache = np.sort(first)
            self._cache_key = key
        return self._cache

    def _rect_path(self, idx: np.ndarray) -> QPainterPath:
        x0, x1, y0, y1 = self._left[idx], self._right[idx], self._top[idx], self._bottom[idx]
        xs = np.column_stack([x0, x1, x1, x0, x0]).reshape(-1)
        ys = np.column_stack([y0, y0, y1, y1, y0]).reshape(-1)
        connect = np.tile(np.array([1, 1, 1, 1, 0], dtype=np.int32), len(idx))
        return pg.arrayToQPath(xs, ys, connect=connect, finiteCheck=False)

    def _paint_coarse(self, painter: QPainter, nodes: np.ndarray) -> None:
        if not nodes.size:
            return
        keep = self._coarse_cache(painter.worldTransform().m22())
        if nodes.size > 2000 and keep.size < nodes.size:
            nodes = np.intersect1d(nodes, keep, assume_unique=True)
        colours = self.colour[nodes]
        painter.setPen(Qt.PenStyle.NoPen)
        for c in np.unique(colours):
            group = nodes[colours == c]
            col = self._palette[c]
            if c < len(CATEGORY_COLOURS):
                col = col.darker(118)  # light fills vanish when boxes are tiny
            painter.fillPath(self._rect_path(group), QBrush(col))
        sel = nodes[self.selected[nodes]]
        if sel.size:
            pen = QPen(SELECT_COLOUR, 2.0)
            pen.setCosmetic(True)
            painter.setPen(pen)
            painter.setBrush(Qt.BrushStyle.NoBrush)
            painter.drawPath(self._rect_path(sel))

    def _paint_boxes(self, painter: QPainter, nodes: np.ndarray, box_px: float) -> None:
        lay = self.layout
        border = QPen(BORDER_COLOUR, 1.0)
        border.setCosmetic(True)
        sel_pen = QPen(SELECT_COLOUR, 2.5)
        sel_pen.setCosmetic(True)
        labels = box_px >= LABEL_PX
        names = box_px >= NAME_PX
        fm = QFontMetricsF(self.font)
        name_fm = QFontMetricsF(self.name_font)
        brushes = [QBrush(c) for c in self._palette]
        for i in nodes.tolist():
            r = QRectF(self._left[i], self._top[i], lay.width[i], lay.height[i])
            selected = bool(self.selected[i])
            painter.setPen(sel_pen if selected else border)
            painter.setBrush(brushes[self.colour[i]])
            painter.drawRoundedRect(r, 5, 5)
            if not labels:
                continue
            painter.setPen(self._text_colour[self.colour[i]])
            if names:
                painter.setFont(self.font)
                top = QRectF(r.left() + 3, r.top() + 1, r.width() - 6, r.height() * 0.55)
                painter.drawText(top, Qt.AlignmentFlag.AlignCenter,
                                 fm.elidedText(self.op_types[i], Qt.TextElideMode.ElideRight,
                                               top.width()))
                painter.setFont(self.name_font)
                bottom = QRectF(r.left() + 3, r.top() + r.height() * 0.5, r.width() - 6,
                                r.height() * 0.48)
                painter.drawText(bottom, Qt.AlignmentFlag.AlignCenter,
                                 name_fm.elidedText(self.names[i], Qt.TextElideMode.ElideMiddle,
                                                    bottom.width()))
            else:
                painter.setFont(self.font)
                painter.drawText(r, Qt.AlignmentFlag.AlignCenter,
                                 fm.elidedText(self.op_types[i], Qt.TextElideMode.ElideRight,
                                               r.width() - 6))

    # --- hit tests ---------------------------------------------------------------------------
    def edge_near(self, p: QPointF, tolerance: float) -> int | None:
        """Index into ``graph.edges`` of the edge piece nearest to ``p`` within ``tolerance``."""
        rect = QRectF(p.x() - tolerance, p.y() - tolerance, 2 * tolerance, 2 * tolerance)
        idx = self.visible_segments(rect)
        if not idx.size:
            return None
        s = self.segments[idx]
        a, b = s[:, :2], s[:, 2:]
        d = b - a
        pt = np.array([p.x(), p.y()])
        t = np.clip(((pt - a) * d).sum(1) / np.maximum((d * d).sum(1), 1e-12), 0, 1)
        dist = np.hypot(*(a + d * t[:, None] - pt).T)
        k = int(np.argmin(dist))
        return int(self.segment_edge[idx[k]]) if dist[k] <= tolerance else None


class LayerFrame:
    """One layer's box in the scene: its label, its nodes and where its label was drawn."""

    __slots__ = ("key", "label", "label_rect", "nodes", "rect", "tint")

    def __init__(self, label: str, nodes: np.ndarray, rect: QRectF, tint: int,
                 key: LayerKey | None = None) -> None:
        self.label, self.nodes, self.rect, self.tint, self.key = label, nodes, rect, tint, key
        self.label_rect = QRect()  # viewport pixels, set on each paint


class HeatLegend:
    """The colour scale drawn in the corner of the view once a profile is shown."""

    def __init__(self) -> None:
        self.visible = False
        self.max_share = 0.0

    def paint(self, painter: QPainter, viewport: QRect) -> None:
        if not self.visible:
            return
        w, h = 190, 46
        box = QRect(viewport.right() - w - 12, viewport.bottom() - h - 12, w, h)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        painter.setPen(QPen(QColor("#c9ced6")))
        painter.setBrush(QColor(255, 255, 255, 235))
        painter.drawRoundedRect(box, 6, 6)
        bar = QRect(box.left() + 10, box.top() + 22, w - 20, 10)
        grad = QLinearGradient(QPointF(bar.topLeft()), QPointF(bar.topRight()))
        for i, c in enumerate(HEAT_STOPS):
            grad.setColorAt(i / (len(HEAT_STOPS) - 1), QColor(c))
        painter.fillRect(bar, grad)
        f = QFont()
        f.setPixelSize(11)
        painter.setFont(f)
        painter.setPen(QColor("#2a3240"))
        painter.drawText(QRect(box.left() + 10, box.top() + 4, w - 20, 16),
                         Qt.AlignmentFlag.AlignLeft, "share of latency")
        painter.drawText(QRect(box.left() + 10, box.top() + 4, w - 20, 16),
                         Qt.AlignmentFlag.AlignRight, f"max {self.max_share * 100:.1f}%")


class GraphView(QGraphicsView):
    """Shows one graph; emits ``selectionChanged`` with node indices when the user selects."""

    selectionChanged = Signal(list)
    nodeActivated = Signal(int)  # double click

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setScene(QGraphicsScene(self))
        self.setRenderHint(QPainter.RenderHint.Antialiasing, False)
        self.setViewportUpdateMode(QGraphicsView.ViewportUpdateMode.FullViewportUpdate)
        self.setTransformationAnchor(QGraphicsView.ViewportAnchor.AnchorUnderMouse)
        self.setOptimizationFlag(QGraphicsView.OptimizationFlag.DontSavePainterState, True)
        self.setBackgroundBrush(QColor("#fbfbfc"))
        self.setMouseTracking(True)
        self.setMinimumSize(QSize(200, 200))
        self.item: GraphItem | None = None
        self.graph: GraphInfo | None = None
        self.layout_: Layout | None = None  # of the whole graph, every node a box
        # while layers are folded: what the boxes show, and their layout
        self.folded: Collapsed | None = None
        self._shown_layout: Layout | None = None
        self.grouping: LayerGrouping | None = None
        # more tooltip lines for a node (by index), set by the window: its profile and plan
        self.node_tooltip_extra: Callable[[int], str] | None = None
        self._selected = np.zeros(0, dtype=bool)  # by graph node, folded or not
        self._share: np.ndarray | None = None
        # per-node shares with a fused group's share on one of its nodes only (for sums)
        self.share_once: Callable[[], np.ndarray] | None = None
        self.legend = HeatLegend()
        self._band = QRubberBand(QRubberBand.Shape.Rectangle, self.viewport())
        self._band_origin: QPoint | None = None
        self._pan_from: QPoint | None = None
        self._press_pos: QPoint | None = None

    # --- content ------------------------------------------------------------------------------
    def set_graph(self, graph: GraphInfo, layout: Layout | None = None) -> None:
        self.graph = graph
        self.layout_ = layout or compute_layout(graph)
        self.folded, self.grouping, self._share = None, None, None
        self._selected = np.zeros(len(graph.nodes), dtype=bool)
        self._show(graph, self.layout_)
        self.legend.visible = False
        self.fit()

    def _show(self, graph: GraphInfo, layout: Layout) -> None:
        self.scene().clear()
        self._shown_layout = layout
        self.item = GraphItem(graph, layout)
        self.scene().addItem(self.item)
        self.scene().setSceneRect(self.item.boundingRect())
        self._sync_selection()
        self._apply_heat()
        self._apply_frames()

    def clear(self) -> None:
        self.scene().clear()
        self.item = None
        self.graph = None
        self.layout_ = self._shown_layout = None
        self.folded, self.grouping, self._share = None, None, None
        self._selected = np.zeros(0, dtype=bool)
        self.legend.visible = False

    def set_heat(self, share: np.ndarray | None) -> None:
        if self.item is None:
            return
        self._share = None if share is None else np.asarray(share, dtype=np.float64)
        self._apply_heat()
        self.legend.visible = share is not None
        if share is not None and np.isfinite(share).any():
            self.legend.max_share = float(np.nanmax(share))
        self.viewport().update()

    def _apply_heat(self) -> None:
        if self.item is None:
            return
        share = self._share
        if share is None:
            self.item.set_heat(None)
            return
        if self.folded is not None:
            # a folded layer is as hot as its operators together; a fused group's time is
            # shown on each of its nodes, so the sum takes it once (``share_once``) if it can
            once = self.share_once() if self.share_once is not None else share
            if len(once) != len(share):
                once = share
            boxes = self.folded.box_of
            known = np.isfinite(once)
            total = np.bincount(boxes[known], weights=once[known],
                                minlength=len(self.folded.members))
            seen = np.bincount(boxes[known], minlength=len(self.folded.members))
            by_box = share[[int(m[0]) for m in self.folded.members]]
            for b in self.folded.layers:
                by_box[b] = total[b] if seen[b] else np.nan
            share = by_box
        self.item.set_heat(share)

    # --- layers -------------------------------------------------------------------------------
    def show_layers(self, grouping: LayerGrouping | None) -> None:
        """Frame and label each layer (a click on a label selects the layer, a double click
        folds it into one box), or stop showing layers (every layer unfolded)."""
        if self.graph is None:
            return
        if grouping is not None and len(grouping.scopes) != len(self.graph.nodes):
            grouping = None
        self.grouping = grouping
        if grouping is None and self.folded is not None:
            self.set_folded(())
        else:
            self._apply_frames()
            self.viewport().update()

    def _apply_frames(self) -> None:
        if self.item is None:
            return
        frames = []
        g = self.grouping
        if g is not None:
            folded = self.folded.keys if self.folded is not None else set()
            for key in g.layers():
                if key in folded:
                    continue
                nodes = np.array(g.layer_nodes(key), dtype=np.int64)
                boxes = nodes if self.folded is None else self.folded.box_of[nodes]
                frames.append((key, g.layer_label(key), boxes, nodes))
        self.item.set_frames(frames)

    def layer_frames(self) -> list[LayerFrame]:
        """The frames shown, their labels placed for the current view."""
        self._place_labels()
        return [] if self.item is None else list(self.item.frames)

    def folded_layers(self) -> set[LayerKey]:
        return set() if self.folded is None else self.folded.keys

    def set_folded(self, keys: Iterable[LayerKey]) -> set[LayerKey]:
        """Fold these layers into one box each (the others open); returns the layers folded
        (one that a path leaves and re-enters can't be folded)."""
        if self.graph is None or self.layout_ is None:
            return set()
        wanted = set(keys) if self.grouping is not None else set()
        if wanted == self.folded_layers():
            return wanted
        if not wanted:
            self.folded = None
            self._show(self.graph, self.layout_)
            return set()
        assert self.grouping is not None
        self.folded = collapse_layers(self.graph, self.grouping, wanted)
        folded = self.folded.graph
        widths = label_width([n.op_type for n in folded.nodes])
        widths[list(self.folded.layers)] = FOLDED_WIDTH
        e = np.asarray([(a, b) for a, b, _ in folded.edges], dtype=np.int64).reshape(-1, 2)
        self._show(folded, layout_arrays(len(folded.nodes), e[:, 0], e[:, 1], widths))
        return self.folded.keys

    def fold_all(self) -> None:
        if self.grouping is not None:
            self.set_folded(self.grouping.layers())
            self.fit()

    def unfold_all(self) -> None:
        self.set_folded(())
        self.fit()

    def toggle_fold(self, key: LayerKey) -> None:
        """Fold an open layer or open a folded one, keeping it where the eye is."""
        if self.grouping is None:
            return
        folded = self.folded_layers()
        self.set_folded(folded - {key} if key in folded else folded | {key})
        first = self.grouping.layer_nodes(key)
        if first:
            self.center_on(first[0], zoom_in=False)

    # --- boxes and nodes ----------------------------------------------------------------------
    def box_of(self, index: int) -> int:
        """The box showing graph node ``index`` (its own, or its folded layer's)."""
        return index if self.folded is None else int(self.folded.box_of[index])

    def nodes_of(self, boxes: Iterable[int]) -> list[int]:
        boxes = list(boxes)
        if self.folded is None:
            return sorted(boxes)
        members = self.folded.members
        return sorted(int(i) for b in boxes for i in members[b])

    # --- selection ----------------------------------------------------------------------------
    def selected(self) -> list[int]:
        return np.flatnonzero(self._selected).tolist()

    def set_selection(self, indices: Iterable[int], emit: bool = False) -> None:
        if self.item is None:
            return
        sel = np.zeros_like(self._selected)
        idx = np.fromiter(indices, dtype=np.int64)
        sel[idx] = True
        if np.array_equal(sel, self._selected):
            return
        self._selected = sel
        self._sync_selection()
        if emit:
            self.selectionChanged.emit(self.selected())

    def _sync_selection(self) -> None:
        if self.item is None:
            return
        if self.folded is None:
            self.item.selected = self._selected.copy()
        else:
            # a folded layer is outlined when any of its operators is selected
            boxes = np.zeros(len(self.folded.members), dtype=bool)
            boxes[self.folded.box_of[self._selected]] = True
            self.item.selected = boxes
        self.item.update()

    # not ``find``: that is QWidget's static lookup of a widget by window id
    def find_nodes(self, text: str) -> list[int]:
        """Nodes whose op type equals ``text`` or whose name contains it (case-insensitive)."""
        if self.graph is None or not text.strip():
            return []
        t = text.strip().lower()
        exact = [n.index for n in self.graph.nodes if n.op_type.lower() == t]
        return exact or [n.index for n in self.graph.nodes if t in n.name.lower()]

    def search(self, text: str) -> list[int]:
        found = self.find_nodes(text)
        if found:
            self.set_selection(found, emit=True)
            self.center_on(found[0])
        return found

    def center_on(self, index: int, zoom_in: bool = True) -> None:
        if self._shown_layout is None:
            return
        lay, box = self._shown_layout, self.box_of(index)
        if zoom_in and self.transform().m22() * lay.height[box] < NAME_PX:
            self._set_scale(NAME_PX / float(lay.height[box]) * 1.05)
        self.centerOn(QPointF(float(lay.x[box]), float(lay.y[box])))

    # --- view ---------------------------------------------------------------------------------
    def fit(self) -> None:
        """The whole graph if it is readable that way, else its top at a readable zoom."""
        if self.item is None:
            return
        rect = self.item.boundingRect()
        lay = self._shown_layout
        assert lay is not None
        vw, vh = max(self.viewport().width(), 50), max(self.viewport().height(), 50)
        whole = min(vw / rect.width(), vh / rect.height(), 1.2)
        readable = LABEL_PX / float(lay.height[0]) if lay.n_nodes else 1.0
        if whole >= readable:
            self._set_scale(whole)
            self.centerOn(rect.center())
            return
        scale = max(min(vw / rect.width(), 1.0), readable)
        self._set_scale(scale)
        self.centerOn(QPointF(rect.center().x(), rect.top() + vh / scale / 2))

    def fit_all(self) -> None:
        if self.item is not None:
            self.fitInView(self.item.boundingRect(), Qt.AspectRatioMode.KeepAspectRatio)

    def zoom(self, factor: float) -> None:
        self._set_scale(self.transform().m22() * factor)

    def _set_scale(self, scale: float) -> None:
        scale = float(min(max(scale, 1e-4), 8.0))
        t = self.transform()
        self.setTransform(t.fromScale(scale, scale))

    def wheelEvent(self, event: QWheelEvent) -> None:
        steps = event.angleDelta().y() / 120.0
        if steps:
            self.zoom(1.2 ** steps)
        event.accept()

    def mousePressEvent(self, event: QMouseEvent) -> None:
        pos = event.position().toPoint()
        if event.button() in (Qt.MouseButton.MiddleButton, Qt.MouseButton.RightButton):
            self._pan_from = pos
            self.viewport().setCursor(Qt.CursorShape.ClosedHandCursor)
            event.accept()
            return
        if event.button() != Qt.MouseButton.LeftButton or self.item is None:
            return super().mousePressEvent(event)
        self._press_pos = pos
        frame = self.layer_label_at(pos)
        if frame is not None:
            self.set_selection(frame.nodes.tolist(), emit=True)
            event.accept()
            return
        box = self.box_at_view(pos)
        ctrl = bool(event.modifiers() & (Qt.KeyboardModifier.ControlModifier
                                         | Qt.KeyboardModifier.MetaModifier))
        if box is not None:
            hit = set(self.nodes_of([box]))  # a folded layer: all its operators
            current = set(self.selected())
            if ctrl:
                current = current - hit if hit <= current else current | hit
            else:
                current = hit
            self.set_selection(sorted(current), emit=True)
        else:
            self._band_origin = pos
            self._band_additive = ctrl
            self._band.setGeometry(QRect(pos, QSize()))
            self._band.show()
        event.accept()

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        pos = event.position().toPoint()
        if self._pan_from is not None:
            delta = pos - self._pan_from
            self._pan_from = pos
            self.horizontalScrollBar().setValue(self.horizontalScrollBar().value() - delta.x())
            self.verticalScrollBar().setValue(self.verticalScrollBar().value() - delta.y())
            return
        if self._band_origin is not None:
            self._band.setGeometry(QRect(self._band_origin, pos).normalized())
            return
        self._hover(event)
        super().mouseMoveEvent(event)

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        if self._pan_from is not None:
            self._pan_from = None
            self.viewport().unsetCursor()
            return
        if self._band_origin is not None and self.item is not None:
            rect = QRect(self._band_origin, event.position().toPoint()).normalized()
            self._band.hide()
            self._band_origin = None
            if rect.width() < 4 and rect.height() < 4:
                if not self._band_additive:
                    self.set_selection([], emit=True)  # a click on the background clears
                return
            scene = self.mapToScene(rect).boundingRect()
            assert self._shown_layout is not None
            found = self._shown_layout.nodes_in_rect(scene.left(), scene.top(), scene.right(),
                                                     scene.bottom())
            chosen = set(self.nodes_of(found.tolist()))
            if self._band_additive:
                chosen |= set(self.selected())
            self.set_selection(sorted(chosen), emit=True)
            return
        super().mouseReleaseEvent(event)

    def mouseDoubleClickEvent(self, event: QMouseEvent) -> None:
        pos = event.position().toPoint()
        frame = self.layer_label_at(pos)
        if frame is not None and frame.key is not None:
            self.toggle_fold(frame.key)  # a layer's label folds it
            return
        box = self.box_at_view(pos)
        if box is None:
            return
        key = self.folded.layers.get(box) if self.folded is not None else None
        if key is not None:
            self.toggle_fold(key)  # a folded layer opens
        else:
            self.nodeActivated.emit(self.nodes_of([box])[0])

    def box_at_view(self, pos: QPoint) -> int | None:
        if self._shown_layout is None:
            return None
        p = self.mapToScene(pos)
        return self._shown_layout.node_at(p.x(), p.y())

    def node_at_view(self, pos: QPoint) -> int | None:
        """The graph node under ``pos`` (the first of a folded layer)."""
        box = self.box_at_view(pos)
        return None if box is None else self.nodes_of([box])[0]

    def view_pos_of(self, index: int) -> QPoint:
        """Where node ``index`` is on screen (its box's centre), in viewport coordinates."""
        lay = self._shown_layout
        assert lay is not None
        box = self.box_of(index)
        return self.mapFromScene(QPointF(float(lay.x[box]), float(lay.y[box])))

    def _hover(self, event: QMouseEvent) -> None:
        if self.item is None or self.graph is None:
            return
        pos = event.position().toPoint()
        text = ""
        box = self.box_at_view(pos)
        shown = self.item.graph  # the folded graph while layers are folded
        layer = self.folded.layers.get(box) if self.folded is not None and box is not None \
            else None
        if self.layer_label_at(pos) is not None:
            text = "click: select the layer · double-click: fold it into one box"
        elif layer is not None:
            assert box is not None
            n = shown.nodes[box]
            text = f"<b>{n.op_type}</b>: {n.name}<br>double-click to open it"
        elif box is not None:
            hit = self.nodes_of([box])[0]
            n = self.graph.nodes[hit]
            shape = ", ".join(_shape(s) for s in n.output_shapes)
            text = f"<b>{n.op_type}</b> {n.name}<br>output {shape}"
            if self.node_tooltip_extra is not None:
                more = self.node_tooltip_extra(hit)
                if more:
                    text += "<br>" + more
        else:
            tol = 5.0 / max(self.transform().m22(), 1e-9)
            e = self.item.edge_near(self.mapToScene(pos), tol)
            if e is not None:
                s, d, tensor = shown.edges[e]
                info = shown.tensors.get(tensor)
                desc = f"{info.dtype or '?'} {_shape(info.shape)}" if info else "?"
                ends = [shown.nodes[b].op_type if self.folded is not None
                        and b in self.folded.layers else shown.nodes[b].name for b in (s, d)]
                text = f"<b>{tensor}</b><br>{desc}<br>{ends[0]} → {ends[1]}"
        if text:
            QToolTip.showText(event.globalPosition().toPoint(), text, self)
        else:
            QToolTip.hideText()

    def layer_label_at(self, pos: QPoint) -> LayerFrame | None:
        self._place_labels()
        frames = [] if self.item is None else self.item.frames
        return next((f for f in frames if f.label_rect.contains(pos)), None)

    def drawForeground(self, painter: QPainter, rect: QRectF | QRect) -> None:
        painter.save()
        painter.resetTransform()
        self._paint_layer_labels(painter)
        self.legend.paint(painter, self.viewport().rect())
        painter.restore()

    def _place_labels(self) -> None:
        """Where each layer's label goes, in viewport pixels: beside its frame (inside it when
        the frame reaches the left edge), at a constant size so it reads at any zoom."""
        if self.item is None:
            return
        fm = QFontMetricsF(_label_font())
        port = self.viewport().rect()
        for frame in self.item.frames:
            box = self.mapFromScene(frame.rect).boundingRect()
            frame.label_rect = QRect()
            if not box.intersects(port) or box.height() < 14:
                continue
            w, h = int(fm.horizontalAdvance(frame.label)) + 10, 18
            x = box.left() - w - 6 if box.left() - w - 6 >= port.left() else box.left() + 4
            y = max(box.top() + 2, port.top() + 2)
            y = min(y, box.bottom() - h)
            frame.label_rect = QRect(x, y, w, h)

    def _paint_layer_labels(self, painter: QPainter) -> None:
        if self.item is None or not self.item.frames:
            return
        self._place_labels()
        painter.setFont(_label_font())
        for frame in self.item.frames:
            if frame.label_rect.isEmpty():
                continue
            painter.setPen(QPen(FRAME_BORDER))
            painter.setBrush(QColor(255, 255, 255, 230))
            painter.drawRoundedRect(frame.label_rect, 4, 4)
            painter.setPen(QColor("#2a3240"))
            painter.drawText(frame.label_rect, Qt.AlignmentFlag.AlignCenter, frame.label)


def _label_font() -> QFont:
    f = QFont()
    f.setPixelSize(12)
    f.setBold(True)
    return f


def _clip_segments(seg: np.ndarray, rect: QRectF) -> np.ndarray:
    """Liang–Barsky clipping of (S, 4) segments to ``rect``; segments fully outside are dropped."""
    inside = ((seg[:, [0, 2]] >= rect.left()) & (seg[:, [0, 2]] <= rect.right())
              & (seg[:, [1, 3]] >= rect.top()) & (seg[:, [1, 3]] <= rect.bottom())).all(axis=1)
    if inside.all():
        return seg
    rest = seg[~inside]
    x0, y0, x1, y1 = rest.T
    dx, dy = x1 - x0, y1 - y0
    t0 = np.zeros(len(rest))
    t1 = np.ones(len(rest))
    keep = np.ones(len(rest), dtype=bool)
    for p, q in ((-dx, x0 - rect.left()), (dx, rect.right() - x0),
                 (-dy, y0 - rect.top()), (dy, rect.bottom() - y0)):
        parallel = p == 0
        keep &= ~(parallel & (q < 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(parallel, 0.0, q / np.where(parallel, 1.0, p))
        t0 = np.where(~parallel & (p < 0), np.maximum(t0, r), t0)
        t1 = np.where(~parallel & (p > 0), np.minimum(t1, r), t1)
    keep &= t0 <= t1
    t0, t1 = t0[keep], t1[keep]
    x0, y0, dx, dy = x0[keep], y0[keep], dx[keep], dy[keep]
    clipped = np.column_stack([x0 + t0 * dx, y0 + t0 * dy, x0 + t1 * dx, y0 + t1 * dy])
    return np.concatenate([seg[inside], clipped])


def _dedupe_on_pixels(seg: np.ndarray, scale: float, rect: QRectF) -> np.ndarray:
    """Drop segments that land on the same pixels as another one at this scale."""
    if len(seg) < 200:
        return seg
    # clipped to ``rect``: pixel offsets from its corner fit in 16 bits each
    p = np.round((seg - [rect.left(), rect.top(), rect.left(), rect.top()]) * scale)
    p = np.clip(p, 0, 65535).astype(np.uint64)
    key = (p[:, 0] << np.uint64(48)) | (p[:, 1] << np.uint64(32)) | (p[:, 2] << np.uint64(16)) \
        | p[:, 3]
    _, first = np.unique(key, return_index=True)
    return seg[np.sort(first)]


def _shape(shape: Sequence | None) -> str:
    if shape is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
