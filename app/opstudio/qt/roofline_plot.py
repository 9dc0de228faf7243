"""The roofline chart: every profiled operator at its arithmetic intensity and achieved GFLOP/s,
under this machine's two ceilings (memory bandwidth × intensity, and peak GFLOP/s).

Both axes are logarithmic, as rooflines are read: a point far below the roof is a kernel that
neither ceiling explains (overheads, poor kernels); a point near the sloped part is limited by
memory, near the flat part by arithmetic. Integer kernels (squares) sit under the INT8 roof,
drawn dashed when there are any. Clicking a point selects its operator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QWidget

from opstudio.qt.theme import TEXT, TITLE_SIZE

MEMORY = "#2f7ed8"
COMPUTE = "#e07b39"
ROOF = "#1f2933"


class RooflinePlot(pg.PlotWidget):
    nodeClicked = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent=parent)
        self.data: dict[str, Any] = {"points": [], "machine": None}
        self.setMinimumSize(200, 90)
        pi = self.getPlotItem()
        pi.setTitle("Roofline: run a profile to place the operators", color=TEXT, size=TITLE_SIZE)
        pi.setLabel("bottom", "arithmetic intensity (FLOP / byte)")
        pi.setLabel("left", "achieved GFLOP/s")
        pi.setLogMode(x=True, y=True)
        pi.showGrid(x=True, y=True, alpha=0.15)
        pi.hideButtons()
        for axis in ("bottom", "left"):
            pi.getAxis(axis).enableAutoSIPrefix(False)
        self.roof = pg.PlotDataItem(pen=pg.mkPen(ROOF, width=2))
        pi.addItem(self.roof)
        self.int8_roof = pg.PlotDataItem(pen=pg.mkPen(ROOF, width=1.5,
                                                      style=Qt.PenStyle.DashLine))
        pi.addItem(self.int8_roof)
        self.scatter = pg.ScatterPlotItem(hoverable=True, tip=self._tip)
        self.scatter.sigClicked.connect(self._on_click)
        pi.addItem(self.scatter)
        # bottom right: high intensity at low GFLOP/s, the corner no kernel sits in
        self.legend = pi.addLegend(offset=(-10, -10))
        self.labels: list[pg.TextItem] = []

    def clear_points(self) -> None:
        self.scatter.clear()
        self.roof.setData([], [])
        self.int8_roof.setData([], [])
        self.legend.clear()
        for item in self.labels:
            self.getPlotItem().removeItem(item)
        self.labels = []
        self.data = {"points": [], "machine": None}
        self.getPlotItem().setTitle("Roofline: run a profile to place the operators",
                                    color=TEXT, size=TITLE_SIZE)

    def set_points(self, points: Sequence[Any], machine: Any) -> None:
        self.clear_points()
        if machine is None:
            return
        self.data = {"points": list(points), "machine": machine}
        pi = self.getPlotItem()
        pi.setTitle(f"Roofline: {machine.peak_gflops:.0f} GFLOP/s peak, "
                    f"{machine.bandwidth_gbs:.1f} GB/s, ridge {machine.ridge:.1f} FLOP/byte",
                    color=TEXT, size=TITLE_SIZE)
        if points:
            lo = min(p.intensity for p in points) / 2
            hi = max(p.intensity for p in points) * 2
        else:
            lo, hi = machine.ridge / 100, machine.ridge * 100
        lo, hi = min(lo, machine.ridge / 4), max(hi, machine.ridge * 4)
        xs = np.array([lo, machine.ridge, hi])
        self.roof.setData(xs, np.minimum(machine.peak_gflops, xs * machine.bandwidth_gbs))
        int8_peak = machine.peak_int8_gops
        integer = [p for p in points if p.precision == "int8"]
        if integer and int8_peak:
            ridge8 = int8_peak / machine.bandwidth_gbs
            xs8 = np.array([min(lo, ridge8 / 4), ridge8, max(hi, ridge8 * 4)])
            self.int8_roof.setData(xs8, np.minimum(int8_peak, xs8 * machine.bandwidth_gbs))
            pi.setTitle(f"Roofline: {machine.peak_gflops:.0f} GFLOP/s peak (INT8 "
                        f"{int8_peak:.0f} GOP/s), {machine.bandwidth_gbs:.1f} GB/s",
                        color=TEXT, size=TITLE_SIZE)
        if not points:
            return
        total = sum(p.ms for p in points) or 1.0
        spots = []
        for p in points:
            colour = COMPUTE if p.bound == "compute" else MEMORY
            size = 6 + 18 * math.sqrt(p.ms / total)  # area ~ share of the time
            spots.append({"pos": (math.log10(p.intensity), math.log10(max(p.achieved_gflops,
                                                                         1e-6))),
                          "data": p.name, "size": size, "brush": pg.mkBrush(colour + "b0"),
                          "pen": pg.mkPen(colour),
                          "symbol": "s" if p.precision == "int8" else "o"})
        self.scatter.addPoints(spots)
        for bound, colour in (("memory", MEMORY), ("compute", COMPUTE)):
            if any(p.bound == bound for p in points):
                sample = pg.ScatterPlotItem(brush=pg.mkBrush(colour), pen=pg.mkPen(None), size=9)
                self.legend.addItem(sample, f"{bound}-bound")
        if integer and int8_peak:
            self.legend.addItem(self.int8_roof, "INT8 roof (squares)")
        # name the operator that takes the most time (more names pile up: MatMuls of one
        # model sit close together; hovering names every point)
        for p in sorted(points, key=lambda p: -p.ms)[:1]:
            label = pg.TextItem(p.name if len(p.name) <= 24 else p.name[:23] + "…",
                                color=TEXT, anchor=(1, 1))
            label.setPos(math.log10(p.intensity), math.log10(max(p.achieved_gflops, 1e-6)))
            pi.addItem(label)
            self.labels.append(label)
        pi.autoRange()

    def _point(self, name: str) -> Any:
        return next((p for p in self.data["points"] if p.name == name), None)

    def _tip(self, x: float, y: float, data: Any) -> str:
        p = self._point(str(data))
        if p is None:
            return str(data)
        return (f"{p.name} ({p.op_type})\n{p.ms:.4f} ms, {p.intensity:.2f} FLOP/byte\n"
                f"{p.achieved_gflops:.1f} of {p.attainable_gflops:.1f} GFLOP/s attainable "
                f"({p.efficiency:.0%}{' of the INT8 roof' if p.precision == 'int8' else ''})"
                f"\n{p.describe_bound()}-bound")

    def _on_click(self, _item: Any, points: Any, *_: Any) -> None:
        if len(points):
            self.nodeClicked.emit(str(points[0].data()))
