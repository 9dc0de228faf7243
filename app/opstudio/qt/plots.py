"""Before/after plots (pyqtgraph): top operators, op types, total, accuracy, one run's timeline.

Each plot keeps the numbers it shows in ``data`` (tests read them) and can be saved as PNG
through pyqtgraph's exporter.

Bars carry error bars (the 95 % interval of each median, ``timing.median_interval``); a
before/after difference with no verdict of faster or slower (``Ratio.verdict``) is greyed out and
labelled "≈ 1×", or "too few runs" when the pairs cannot tell.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from pyqtgraph import exporters
from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import QColor, QFont, QFontMetrics
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QToolTip,
    QVBoxLayout,
    QWidget,
)

from opstudio.qt.roofline_plot import RooflinePlot
from opstudio.qt.theme import TEXT

BEFORE = QColor("#9aa8bb")
AFTER = QColor("#2f7ed8")
AFTER_NOISE = QColor("#c5ced9")  # an after bar within the noise of its before bar
NEUTRAL = "#8a94a3"
TOP_N = 15


def _elide(text: str, n: int = 34) -> str:
    return text if len(text) <= n else text[: n // 2 - 1] + "…" + text[-(n // 2 - 1):]


def _coloured(ratio: float, paired: Any = None) -> str:
    """A speedup in green/red (a slowdown said in words), or in grey "≈ 1×" / "too few runs
    to tell (…)" when the paired ratio gives no verdict."""
    from opstudio.core.measure.compare import speedup_label
    from opstudio.core.measure.timing import SLOWER, UNDECIDED

    if paired is not None and not paired.significant:
        text = paired.too_few() if paired.verdict == UNDECIDED else paired.label()
        return (f"<span style='color:{NEUTRAL}'><b>{text}</b> "
                f"[{paired.low:.2f}–{paired.high:.2f}]</span>")
    colour = "#1b7f3b" if ratio >= 1 else "#b3261e"
    ci = "" if paired is None else f" [{paired.low:.2f}–{paired.high:.2f}]"
    text = speedup_label(ratio, paired)
    if paired is not None and paired.verdict == SLOWER:
        text += f", {paired.words()}"
    return f"<span style='color:{colour}'><b>{text}</b>{ci}</span>"


def _interval(series: Sequence[float] | None, value: float) -> tuple[float, float] | None:
    """95 % interval of the median of ``series``, stretched to hold ``value`` (a row's value
    is its members' medians summed, the series their sum per run)."""
    from opstudio.core.measure.timing import median_interval

    if series is None or len(series) < 2:
        return None
    lo, hi = median_interval(series)
    return min(lo, value), max(hi, value)


def _bare_speedup(before: float, after: float) -> float | None:
    """The speedup of rows a comparison made without paired runs (older saved ones)."""
    return before / after if before > 0 and after > 0 else None


def _ci_text(ci: Sequence[float] | None) -> str:
    return "" if not ci else f" [{_ms(ci[0])}–{_ms(ci[1])}]"


def _ms(v: float) -> str:
    return f"{v:.3f} ms" if v < 100 else f"{v:.1f} ms"


class BarsPlot(pg.PlotWidget):
    """Horizontal grouped bars, one row per label, largest first; optional "after" bars."""

    def __init__(self, title: str = "", parent: QWidget | None = None,
                 legend_in_title: bool = True) -> None:
        super().__init__(parent=parent)
        self.data: dict[str, Any] = {"labels": [], "before": [], "after": None, "speedup": [],
                                     "ratios": [], "before_ci": [], "after_ci": [],
                                     "greyed": []}
        self._title = title
        self._legend_in_title = legend_in_title
        self.setMinimumSize(200, 90)
        pi = self.getPlotItem()
        pi.setTitle(title, color=TEXT, size="11pt")
        pi.invertY(True)
        pi.showGrid(x=True, y=False, alpha=0.25)
        pi.setMenuEnabled(False)
        pi.hideButtons()
        pi.setLabel("bottom", "latency (ms)")
        # every row keeps its label: pyqtgraph drops labels that fill more than 80% of the axis
        pi.getAxis("left").setStyle(autoExpandTextSpace=True, tickTextOffset=6,
                                    textFillLimits=[(0, 1.0)])
        self._tick_font = QFont()
        self._tick_font.setPixelSize(11)
        pi.getAxis("left").setTickFont(self._tick_font)
        pi.getAxis("bottom").enableAutoSIPrefix(False)
        for axis in ("left", "bottom"):
            pi.getAxis(axis).setTextPen(TEXT)
            pi.getAxis(axis).setPen(QColor("#b8c0cc"))
        self.setMouseEnabled(x=False, y=False)
        self.scene().sigMouseMoved.connect(self._on_hover)
        self._items: list[Any] = []

    def set_bars(self, labels: Sequence[str], before: Sequence[float],
                 after: Sequence[float] | None = None, speedup: Sequence[float | None] = (),
                 names: Sequence[str] | None = None, ratios: Sequence[Any] = (),
                 before_ci: Sequence[Sequence[float] | None] = (),
                 after_ci: Sequence[Sequence[float] | None] = ()) -> None:
        """``ratios``: each row's paired ``timing.Ratio`` (None: not measured in pairs);
        ``before_ci``/``after_ci``: (low, high) of each bar, drawn as error bars."""
        pi = self.getPlotItem()
        for it in self._items:
            pi.removeItem(it)
        self._items = []
        before_a = np.asarray(before, dtype=float)
        after_a = None if after is None else np.asarray(after, dtype=float)
        ratios = list(ratios) + [None] * (len(labels) - len(ratios))
        greyed = [r is not None and not r.significant for r in ratios]
        self.data = {"labels": list(labels), "before": before_a.tolist(),
                     "after": None if after_a is None else after_a.tolist(),
                     "speedup": list(speedup), "names": list(names or labels),
                     "ratios": ratios, "greyed": greyed,
                     "before_ci": [None if c is None else tuple(c) for c in before_ci],
                     "after_ci": [None if c is None else tuple(c) for c in after_ci]}
        n = len(labels)
        if n == 0:
            pi.getAxis("left").setTicks([[]])
            return
        y = np.arange(n, dtype=float)
        h = 0.38 if after_a is not None else 0.7
        b = pg.BarGraphItem(x0=0, y=y - (h / 2 if after_a is not None else 0), height=h,
                            width=before_a, brush=BEFORE, pen=pg.mkPen(None))
        self._add(b)
        top = float(before_a.max()) if n else 1.0
        if after_a is not None:
            a = pg.BarGraphItem(x0=0, y=y + h / 2, height=h, width=after_a,
                                brushes=[AFTER_NOISE if g else AFTER for g in greyed],
                                pen=pg.mkPen(None))
            self._add(a)
            top = max(top, float(after_a.max()))
        for cis, offset in ((self.data["before_ci"], -h / 2 if after_a is not None else 0.0),
                            (self.data["after_ci"], h / 2)):
            rows = [i for i, c in enumerate(cis[:n]) if c is not None]
            if not rows:
                continue
            lo = np.array([cis[i][0] for i in rows])
            hi = np.array([cis[i][1] for i in rows])
            mid = (lo + hi) / 2
            self._add(pg.ErrorBarItem(x=mid, y=y[rows] + offset, left=mid - lo, right=hi - mid,
                                      beam=h * 0.5, pen=pg.mkPen("#3e4c59", width=1)))
            top = max(top, float(hi.max()))
        font = QFont()
        font.setPixelSize(11)
        from opstudio.core.measure.compare import speedup_label

        for i in range(n):
            s = speedup[i] if i < len(speedup) else None
            if s is None:
                continue
            end = max(before_a[i], after_a[i] if after_a is not None else 0.0)
            cis = [c[i] for c in (self.data["before_ci"], self.data["after_ci"])
                   if i < len(c) and c[i] is not None]
            end = max([end, *(c[1] for c in cis)])
            colour = NEUTRAL if greyed[i] else ("#1b7f3b" if s >= 1.0 else "#b3261e")
            t = pg.TextItem(speedup_label(s, ratios[i]), color=colour, anchor=(0, 0.5))
            t.setFont(font)
            t.setPos(end + top * 0.01, y[i])
            self._add(t)
        ticks = [(float(i), _elide(str(lbl))) for i, lbl in enumerate(labels)]
        pi.getAxis("left").setTicks([ticks])
        # size the axis for its labels now: pyqtgraph widens it only after a paint, and skips
        # the labels that do not fit until then (or forever, on a tab that is not shown)
        fm = QFontMetrics(self._tick_font)
        pi.getAxis("left").setWidth(max(fm.horizontalAdvance(t) for _, t in ticks) + 16)
        pi.setXRange(0, top * 1.3 if top > 0 else 1.0, padding=0)
        if after_a is not None and self._legend_in_title:
            pi.setTitle(f"<span style='color:{BEFORE.name()}'>■</span> before &nbsp;"
                        f"<span style='color:{AFTER.name()}'>■</span> after", color=TEXT,
                        size="10pt")
        else:
            pi.setTitle(self._title, color=TEXT, size="11pt")
        pi.setYRange(-0.6, n - 0.4, padding=0)

    def _add(self, item: Any) -> None:
        self.getPlotItem().addItem(item)
        self._items.append(item)

    def _on_hover(self, pos: QPointF) -> None:
        labels = self.data.get("labels") or []
        if not labels or not self.getPlotItem().sceneBoundingRect().contains(pos):
            return
        p = self.getPlotItem().vb.mapSceneToView(pos)
        i = round(p.y())
        if not 0 <= i < len(labels):
            QToolTip.hideText()
            return
        def ci(key: str) -> str:
            cis = self.data.get(key) or []
            return _ci_text(cis[i]) if i < len(cis) else ""

        lines = [f"<b>{self.data['names'][i]}</b>",
                 f"before: {_ms(self.data['before'][i])}{ci('before_ci')}"]
        if self.data["after"] is not None:
            lines.append(f"after: {_ms(self.data['after'][i])}{ci('after_ci')}")
            s = self.data["speedup"][i] if i < len(self.data["speedup"]) else None
            r = self.data["ratios"][i] if i < len(self.data["ratios"]) else None
            if s is not None:
                from opstudio.core.measure.compare import interval_text, speedup_label

                lines.append(f"speedup: {speedup_label(s, r)}")
                if r is not None:
                    lines.append(interval_text(r))
        view_pos = self.mapFromScene(pos)
        QToolTip.showText(self.mapToGlobal(view_pos), "<br>".join(lines), self)

    def save_png(self, path: str | Path, width: int | None = None) -> Path:
        """PNG of the plot at twice its size on screen (text scales with it), or ``width``."""
        exp = exporters.ImageExporter(self.getPlotItem())
        exp.parameters()["width"] = int(width or max(2 * self.width(), 800))
        exp.export(str(path))
        return Path(path)


class TimelinePlot(pg.PlotWidget):
    """Kernels of one run over time, one lane per thread."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent=parent)
        self.data: dict[str, Any] = {"events": 0, "lanes": []}
        pi = self.getPlotItem()
        pi.setTitle("One run: kernels over time per thread", color=TEXT, size="11pt")
        pi.setLabel("bottom", "time (ms)")
        pi.getAxis("bottom").enableAutoSIPrefix(False)
        pi.getAxis("left").setStyle(autoExpandTextSpace=True)
        pi.invertY(True)
        pi.hideButtons()
        self.setMouseEnabled(x=True, y=False)
        self._events: list[dict[str, Any]] = []
        self._bars: pg.BarGraphItem | None = None
        self.scene().sigMouseMoved.connect(self._on_hover)

    def set_events(self, events: Sequence[Any]) -> None:
        pi = self.getPlotItem()
        if self._bars is not None:
            pi.removeItem(self._bars)
            self._bars = None
        evs = [e if isinstance(e, dict) else vars(e) for e in events]
        self._events = evs
        tids = sorted({e.get("tid", 0) for e in evs})
        lane = {t: i for i, t in enumerate(tids)}
        self.data = {"events": len(evs), "lanes": tids}
        if not evs:
            pi.getAxis("left").setTicks([[]])
            return
        t0 = min(float(e["start_us"]) for e in evs)
        x0 = np.array([(float(e["start_us"]) - t0) / 1000 for e in evs])
        w = np.array([max(float(e["dur_us"]), 0.5) / 1000 for e in evs])
        y = np.array([lane[e.get("tid", 0)] for e in evs], dtype=float)
        ops = sorted({str(e.get("op", "")) for e in evs})
        cmap = pg.colormap.get("CET-C6")  # cyclic, distinct hues for op types
        colour = {op: cmap.map((k + 0.5) / max(len(ops), 1), mode="qcolor")
                  for k, op in enumerate(ops)}
        brushes = [pg.mkBrush(colour[str(e.get("op", ""))]) for e in evs]
        self._bars = pg.BarGraphItem(x0=x0, y=y, height=0.7, width=w, brushes=brushes,
                                     pen=pg.mkPen(None))
        self._x0, self._w, self._y = x0, w, y
        pi.addItem(self._bars)
        pi.getAxis("left").setTicks([[(float(i), f"thread {i + 1}") for i in range(len(tids))]])
        pi.setYRange(-0.6, len(tids) - 0.4, padding=0)
        pi.setXRange(0, float((x0 + w).max()), padding=0.02)

    def _on_hover(self, pos: QPointF) -> None:
        if not self._events:
            return
        p = self.getPlotItem().vb.mapSceneToView(pos)
        hit = np.flatnonzero((self._x0 <= p.x()) & (self._x0 + self._w >= p.x())
                             & (np.abs(self._y - p.y()) <= 0.35))
        if hit.size:
            e = self._events[int(hit[0])]
            QToolTip.showText(self.mapToGlobal(self.mapFromScene(pos)),
                              f"<b>{e.get('name')}</b><br>{e.get('op')}<br>"
                              f"{float(e['dur_us']) / 1000:.3f} ms", self)


class AccuracyTable(QTableWidget):
    HEADERS = ("output", "max abs err", "cosine", "SNR dB", "top-1", "KL nats")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(0, len(self.HEADERS), parent)
        self.setHorizontalHeaderLabels(self.HEADERS)
        self.verticalHeader().setVisible(False)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.horizontalHeader().setStretchLastSection(True)
        self.rows: list[dict[str, Any]] = []

    def set_not_measured(self, why: str) -> None:
        """One row saying the accuracy was not measured, and why."""
        self.set_report(None)
        self.setRowCount(1)
        item = QTableWidgetItem(f"not measured: {why}")
        item.setToolTip(why)
        self.setItem(0, 0, item)
        self.setSpan(0, 0, 1, len(self.HEADERS))

    def set_report(self, report: Any | None) -> None:
        self.clearSpans()
        outputs = list(getattr(report, "outputs", []) or [])
        self.setRowCount(len(outputs))
        self.rows = []
        for r, o in enumerate(outputs):
            kl = getattr(o, "kl_divergence", None)  # logits outputs only
            vals = [o.name, _sci(o.max_abs_err), _fixed(o.cosine, 6), _fixed(o.snr_db, 1),
                    "" if o.top1_agreement is None else f"{o.top1_agreement * 100:.1f}%",
                    "" if kl is None else _sci(kl)]
            self.rows.append({"name": o.name, "max_abs_err": o.max_abs_err,
                              "cosine": o.cosine, "snr_db": o.snr_db,
                              "top1_agreement": o.top1_agreement, "kl_divergence": kl})
            for c, v in enumerate(vals):
                item = QTableWidgetItem(v)
                item.setToolTip(f"{o.name}: shape {'×'.join(str(d) for d in (o.shape or []))}, "
                                f"mean abs err {_sci(o.mean_abs_err)}")
                if c >= 1:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.setItem(r, c, item)


def _bytes(n: float) -> str:
    for factor, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= factor:
            return f"{n / factor:.1f} {suffix}"
    return f"{int(n)} B"


def _sci(v: float | None) -> str:
    return "" if v is None else f"{v:.3g}"


def _fixed(v: float | None, digits: int) -> str:
    if v is None or not np.isfinite(v):
        return "∞" if v is not None and v > 0 else ("" if v is None else str(v))
    return f"{v:.{digits}f}"


def _memory_html(profile: Any, side: str = "") -> str:
    """The memory line of a profile (``core.memory``) on a line of its own, or nothing."""
    memory = getattr(profile, "memory", None)
    return f"<br>{side}{html.escape(memory.line())}" if memory is not None else ""


def _step_prefix(result: Any) -> str:
    """ "Prefill of 128 tokens: " before a decoder's figures, which are that step's."""
    step = getattr(result, "step", "")
    return f"{step[:1].upper()}{step[1:]}: " if step else ""


def _tokens_html(accuracy: Any) -> str:
    """The next-token line; judged on synthetic tokens, in warning colour with what to do."""
    summary = getattr(accuracy, "summary", None) if accuracy is not None else None
    line = html.escape(summary()) if callable(summary) else ""
    if not line:
        return ""
    if getattr(accuracy, "synthetic", False):
        return f"<span style='color:#a15c00'>{line} — give a prompt in Run settings</span>"
    return line


def _noise_html(message: str, noise: dict[str, Any]) -> str:
    """The noise verdict under a total: red-brown when the machine was busy."""
    if not message:
        return ""
    colour = "#a15c00" if noise.get("busy") else NEUTRAL
    return f"<br><span style='color:{colour}'>{message}</span>"


class PlotsPanel(QWidget):
    """All plots in tabs; ``show_profile`` after a baseline, ``show_comparison`` after a run."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.top_n = TOP_N
        self.profile: Any = None
        self.comparison: Any = None
        self.ops = BarsPlot("Slowest operators")
        self.op_types = BarsPlot("By op type")
        self.total = BarsPlot("Total (p50)", legend_in_title=False)
        self.total.setMinimumHeight(90)
        self.timeline = TimelinePlot()
        self.timeline.setMinimumSize(200, 90)
        self.accuracy = AccuracyTable()
        self.summary = QLabel("Run a profile to see where the time goes.")
        self.summary.setObjectName("summary")
        self.summary.setWordWrap(True)
        # a decoder's request before → after, when the comparison estimated one
        self.request = QLabel()
        self.request.setObjectName("summary")
        # short lines, never wrapped: the label keeps its height and the plot below gives way
        self.request.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        self.request.hide()
        self.request_data: dict[str, Any] | None = None
        # the next-token line, by the accuracy table: what it was judged on is part of it
        self.tokens = QLabel()
        self.tokens.setWordWrap(True)
        self.tokens.hide()

        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(0, 0, 0, 0)
        # a decoder's request first: time to first token and tokens/s are what its users feel
        rl.addWidget(self.request)
        rl.addWidget(self.summary)
        rl.addWidget(self.total, 2)
        acc_label = QLabel("Accuracy per output (after vs before)")
        acc_label.setObjectName("sectionLabel")
        acc_label.setWordWrap(True)  # the column may be narrow: no line sets its width
        rl.addWidget(acc_label)
        rl.addWidget(self.tokens)
        rl.addWidget(self.accuracy, 3)
        # a short dock scrolls the column rather than clip its words
        column = QScrollArea()
        column.setWidget(right)
        column.setWidgetResizable(True)
        column.setFrameShape(QFrame.Shape.NoFrame)
        column.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.ops)
        split.addWidget(column)
        split.setStretchFactor(0, 5)
        split.setStretchFactor(1, 4)
        split.setSizes([550, 450])
        split.setChildrenCollapsible(False)
        self.ops.setMinimumWidth(280)
        column.setMinimumWidth(220)

        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(split, "Operators")
        self.tabs.addTab(self.op_types, "Op types")
        self.tabs.addTab(self.timeline, "Timeline")
        self.roofline = RooflinePlot()
        self.tabs.addTab(self.roofline, "Roofline")

        bar = QHBoxLayout()
        bar.addWidget(QLabel("Top"))
        self.top_spin = QSpinBox()
        self.top_spin.setRange(3, 100)
        self.top_spin.setValue(self.top_n)
        self.top_spin.valueChanged.connect(self._on_top_n)
        bar.addWidget(self.top_spin)
        bar.addWidget(QLabel("operators"))
        bar.addStretch(1)
        self.save_button = QPushButton("Save plot as PNG…")
        self.save_button.clicked.connect(self._on_save)
        bar.addWidget(self.save_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 4, 6, 6)
        lay.addLayout(bar)
        lay.addWidget(self.tabs, 1)

    def clear(self) -> None:
        self.profile = self.comparison = None
        for p in (self.ops, self.op_types, self.total):
            p.set_bars([], [])
        self.timeline.set_events([])
        self.roofline.clear_points()
        self.accuracy.set_report(None)
        self._show_tokens(None)
        self.summary.setText("Run a profile to see where the time goes.")
        self.show_request(None)

    def show_roofline(self, points: Sequence[Any], machine: Any) -> None:
        self.roofline.set_points(points, machine)

    def show_profile(self, profile: Any) -> None:
        self.profile, self.comparison = profile, None
        nodes = sorted(profile.nodes, key=lambda s: -s.p50_ms)[: self.top_n]
        self.ops.set_bars([s.name for s in nodes], [s.p50_ms for s in nodes],
                          before_ci=[_interval(getattr(s, "series_ms", None), s.p50_ms) for s in nodes])
        ops = sorted(profile.op_types, key=lambda r: -r["mean_ms"])[: self.top_n]
        self.op_types.set_bars([f"{r['op_type']} ×{r['count']}" for r in ops],
                               [r["mean_ms"] for r in ops])
        total = profile.total_ms.get("p50") or profile.total_ms.get("mean", 0.0)
        noise = getattr(profile, "noise", None) or {}
        self.total.set_bars(["model"], [total], before_ci=[noise.get("total_ci")])
        self.timeline.set_events(getattr(profile, "kernel_events", []) or [])
        self.accuracy.set_report(None)
        self._show_tokens(None)
        self.show_request(None)
        plain = (getattr(profile, "plain_ms", None) or {}).get("p50")
        extra = (f"; {_ms(plain)}{_ci_text(noise.get('plain_ci'))} without the profiler"
                 if plain else "")
        step = _step_prefix(profile)
        self.summary.setText(f"{step}<b>{_ms(total)}</b>{_ci_text(noise.get('total_ci'))} per run "
                             f"(median, profiled){extra}; {len(profile.nodes)} operators "
                             f"measured.{_noise_html(noise.get('message', ''), noise)}"
                             f"{_memory_html(profile)}")

    def show_not_compared(self, reason: str, message: str) -> None:
        """Optimized without measuring: the baseline stays in the plots, the accuracy table
        says why it is empty."""
        self.comparison = None
        self.accuracy.set_not_measured(reason)
        self.show_request(None)
        self.summary.setText(message)

    def show_comparison(self, comparison: Any) -> None:
        self.comparison = comparison
        self.profile = comparison.before
        rows = comparison.nodes[: self.top_n]
        # a removed node has no after time, an added one no before time: no bar
        self.ops.set_bars(
            [r.name for r in rows], [r.before_ms or 0.0 for r in rows],
            [r.after_ms or 0.0 for r in rows], [r.speedup for r in rows],
            ratios=[getattr(r, "ratio", None) for r in rows],
            before_ci=[None if r.before_ms is None else
                       _interval(getattr(r, "before_series", None), r.before_ms) for r in rows],
            after_ci=[None if r.after_ms is None else
                      _interval(getattr(r, "after_series", None), r.after_ms) for r in rows])
        ops = comparison.op_types()[: self.top_n]
        self.op_types.set_bars(
            [r["op_type"] for r in ops], [r["before_ms"] for r in ops], [r["after_ms"] for r in ops],
            [r["speedup"] if "speedup" in r else _bare_speedup(r["before_ms"], r["after_ms"])
             for r in ops], ratios=[r.get("ratio") for r in ops])
        b = comparison.before.total_ms.get("p50") or comparison.before.total_ms.get("mean", 0.0)
        a = comparison.after.total_ms.get("p50") or comparison.after.total_ms.get("mean", 0.0)
        b_noise = getattr(comparison.before, "noise", None) or {}
        a_noise = getattr(comparison.after, "noise", None) or {}
        total_ratio = getattr(comparison, "total_ratio", None)
        self.total.set_bars(["model"], [b], [a], [comparison.speedup], ratios=[total_ratio],
                            before_ci=[b_noise.get("total_ci")], after_ci=[a_noise.get("total_ci")])
        self.timeline.set_events(getattr(comparison.after, "kernel_events", []) or [])
        self.accuracy.set_report(comparison.accuracy)
        self.show_request(getattr(comparison, "request", None))
        s = comparison.speedup
        sizes = comparison.size_bytes or {}
        size = ""
        if sizes.get("before") and sizes.get("after"):
            size = f"; file {_bytes(sizes['before'])} → {_bytes(sizes['after'])}"
        plain = ""
        ps = getattr(comparison, "plain_speedup", None)
        if ps:
            # On sub-millisecond models the profiler's per-kernel cost dominates, and a rewrite
            # into more kernels looks slower profiled than it runs: show the plain runs too.
            plain = (f"; without the profiler {_ms(comparison.before.plain_ms['p50'])} → "
                     f"{_ms(comparison.after.plain_ms['p50'])} "
                     f"{_coloured(ps, getattr(comparison, 'plain_ratio', None))}")
        self._show_tokens(comparison.accuracy)
        noise_fn = getattr(comparison, "noise", None)
        noise = _noise_html(noise_fn() if callable(noise_fn) else "",
                            b_noise if b_noise.get("busy") else a_noise)
        # a decoder's totals are one step's: say which, beside the request's figures
        step = _step_prefix(comparison)
        memory = (_memory_html(comparison.before, "before ")
                  + _memory_html(comparison.after, "after "))
        self.summary.setText(
            f"{step}<b>{_ms(b)} → {_ms(a)}</b>  {_coloured(s, total_ratio)}{plain}{size}{noise}"
            f"{memory}" if s else f"{step}{_ms(b)} → {_ms(a)}{plain}{size}{noise}{memory}")

    def _show_tokens(self, accuracy: Any) -> None:
        text = _tokens_html(accuracy)
        self.tokens.setText(text)
        self.tokens.setVisible(bool(text))

    def show_request(self, request: Any | None) -> None:
        """Time to first token, tokens/s and the whole request, before → after
        (a ``request.RequestComparison``), or nothing."""
        from opstudio.core.measure.request import duration, rate

        # with a request, the totals of its one step stay in words; their plot gives way
        self.total.setVisible(request is None)
        if request is None:
            self.request_data = None
            self.request.clear()
            self.request.hide()
            return
        b, a = request.before, request.after
        self.request_data = {
            "prompt": b.prompt, "generate": b.generate,
            "ttft_ms": (b.ttft_ms, a.ttft_ms), "tokens_per_s": (b.tokens_per_s, a.tokens_per_s),
            "total_ms": (b.total_ms, a.total_ms),
            "labels": {k: (r.label() if r is not None else "")
                       for k, r in (("ttft", request.ttft), ("tokens_per_s", request.decode),
                                    ("total", request.total))}}

        def speedup(r: Any) -> str:
            """The label alone ("1.52×", "≈ 1×", "too few runs"), coloured; the interval is in
            the tooltip."""
            if r is None:
                return ""
            colour = NEUTRAL if not r.significant else ("#1b7f3b" if r.median >= 1 else "#b3261e")
            return f" <span style='color:{colour}'><b>{r.label()}</b></span>"

        self.request.setText(
            f"<b>Per request</b> of {b.prompt} + {b.generate} tokens<br>"
            f"first token {duration(b.ttft_ms)} → {duration(a.ttft_ms)}"
            f"{speedup(request.ttft)}<br>"
            f"{rate(b.tokens_per_s)} → {rate(a.tokens_per_s)} tokens/s"
            f"{speedup(request.decode)}<br>"
            f"total {duration(b.total_ms)} → {duration(a.total_ms)}"
            f"{speedup(request.total)}")
        from opstudio.core.measure.compare import interval_text

        self.request.setToolTip(
            f"A prompt of {b.prompt} tokens, then {b.generate} generated. "
            "First token: the prefill of the prompt. Tokens/s: one decode step per "
            f"further token, timed after a past of {b.prompt} and {b.prompt + b.generate} "
            "tokens and linear in between. Medians over rounds timed in turns.<br>"
            f"time to first token: {interval_text(request.ttft)}<br>"
            f"tokens/s: {interval_text(request.decode)}<br>"
            f"whole request: {interval_text(request.total)}")
        self.request.show()

    def _on_top_n(self, n: int) -> None:
        self.top_n = n
        if self.comparison is not None:
            self.show_comparison(self.comparison)
        elif self.profile is not None:
            self.show_profile(self.profile)

    def current_plot(self) -> pg.PlotWidget:
        w = self.tabs.currentWidget()
        return self.ops if isinstance(w, QSplitter) else w

    def _on_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save plot", "plot.png", "PNG image (*.png)")
        if path:
            plot = self.current_plot()
            if isinstance(plot, BarsPlot):
                plot.save_png(path)
            else:
                exp = exporters.ImageExporter(plot.getPlotItem())
                exp.parameters()["width"] = max(2 * plot.width(), 800)
                exp.export(path)
