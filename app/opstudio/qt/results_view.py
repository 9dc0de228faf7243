"""Shows the document's measurements: the operator table's times, the result plots, the
graph's heat map and the roofline, and the node tooltips that sum them up.

It subscribes to the document's ``profiled``, ``compared`` and ``not_compared`` events; nothing else writes
results into these widgets."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PySide6.QtWidgets import QStatusBar

from opstudio.core.measure.compare import Comparison, NotCompared
from opstudio.core.measure.profiler import Profile
from opstudio.core.measure.roofline import Machine, cached_machine, profile_roofline
from opstudio.core.session.document import (
    Document,
    comparison_summary,
    not_compared_summary,
    profile_summary,
)
from opstudio.qt.graph_view import GraphView
from opstudio.qt.op_table import OpTable
from opstudio.qt.plots import PlotsPanel


class ResultsView:
    def __init__(self, doc: Document, table: OpTable, plots: PlotsPanel, graph_view: GraphView,
                 status: Callable[[], QStatusBar]) -> None:
        self.doc, self.table, self.plots, self.graph_view = doc, table, plots, graph_view
        self.status = status
        graph_view.node_tooltip_extra = self.node_tooltip
        doc.profiled.connect(self._on_profiled)
        doc.compared.connect(self._on_compared)
        doc.not_compared.connect(self._on_not_compared)

    def machine(self) -> Machine | None:
        """This machine's ceilings: measured by a profile from the toolbar, else from the cache
        or the advisor."""
        return cached_machine(self.doc.settings.threads) or self.doc.machine

    def show_roofline(self, profile: Profile) -> None:
        machine = self.machine()
        if machine is None or self.doc.graph is None:
            return
        points = profile_roofline(self.doc.graph, profile, machine, self.table.model.derived)
        self.plots.show_roofline(points, machine)
        self.table.model.set_roofline(points)

    def _on_profiled(self, profile: Profile) -> None:
        self.table.model.set_profile(profile)
        self.table.model.set_comparison(None)
        self.plots.show_profile(profile)
        self._show_measured(profile)
        self.status().showMessage(profile_summary(profile), 30000 if profile.notes else 8000)

    def _on_compared(self, comparison: Comparison) -> None:
        self.table.model.set_profile(comparison.before)
        self.table.model.set_comparison(comparison)
        self.plots.show_comparison(comparison)
        self._show_measured(comparison.before)
        self.status().showMessage(comparison_summary(comparison), 10000)

    def _on_not_compared(self, not_compared: NotCompared) -> None:
        self.table.model.set_comparison(None)
        message = not_compared_summary(not_compared)
        self.plots.show_not_compared(not_compared.reason, message)
        self.status().showMessage(message, 30000)

    def _show_measured(self, profile: Profile) -> None:
        self.show_roofline(profile)
        graph = self.doc.graph
        if graph is None:
            return
        share = np.full(len(graph.nodes), np.nan)
        for s in profile.nodes:
            # in a file an optimization wrote, a row names the original node: the nodes
            # standing for it now carry its time
            for name in self.table.model.shown_as([s.name, *(s.group or [])]):
                if graph.has_node(name):
                    share[graph.node(name).index] = s.share
        self.graph_view.set_heat(share)
        if np.isfinite(share).any():
            self.graph_view.center_on(int(np.nanargmax(share)), zoom_in=False)

    def node_tooltip(self, index: int) -> str:
        if self.doc.graph is None:
            return ""
        name = self.doc.graph.nodes[index].name
        parts = []
        s = self.table.model.profile.get(name)
        if s is not None:
            parts.append(f"p50 {s.p50_ms:.3f} ms ({s.share * 100:.1f}% of the run)")
        after = self.table.model.after.get(name)
        if after is not None and after[2] is not None:
            parts.append(f"{after[0]:.3f} ms → {after[1]:.3f} ms, {after[2]:.2f}×")
        tech = self.table.model.techniques.get(name)
        if tech:
            parts.append(f"plan: {tech}")
        return "<br>".join(parts)
