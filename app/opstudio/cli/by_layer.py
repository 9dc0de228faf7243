"""``--by-layer`` of ``inspect`` and ``profile``: totals per layer, per module and per module
over every layer, from the operators' name scopes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from opstudio.cli.common import print_table
from opstudio.core.model.layers import MODULE_LABELS, MODULES, LayerGrouping, Totals, group_layers

# a column: header, value per node name, and how to print a sum
Column = tuple[str, Mapping[str, float | None], Callable[[float], str]]


def print_by_layer(names: Sequence[str], columns: Sequence[Column], file: Any = None, *,
                   every_node: Collection[str] = ()) -> None:
    """``every_node``: headers of the columns whose sums are unknown ("–") as soon as one
    node's value is (``GraphInfo.sums_need_every_node``)."""
    file = file or sys.stdout
    g = group_layers(names)
    if not g.has_layers():
        print("by layer: no node name carries a layer index (like /model/layers.3/… or "
              "transformer.h.3.…), so there are no layers to total", file=file)
        return
    totals = [g.totals(values, every_node=header in every_node) for header, values, _ in columns]
    fmts = [fmt for _, _, fmt in columns]
    headers = ("layer / module", "ops", *(h for h, _, _ in columns))
    align = "lr" + "r" * len(columns)
    print_table(headers, _layer_rows(g, totals, fmts), align, file=file)
    print(file=file)
    # the question an LLM user asks first: how the time splits between attention and MLP
    rows = []
    for m in _modules_everywhere(g):
        count = len(g.module_everywhere(m))
        rows.append([f"{MODULE_LABELS[m]} (all {len(g.layers())} layers)", str(count),
                     *(_cell(t.by_module.get(m), f) for t, f in zip(totals, fmts, strict=True))])
    for m in g.modules_of(None):
        rows.append([f"{MODULE_LABELS[m]} (no layer)", str(len(g.module_nodes(None, m))),
                     *(_cell(t.outside.get(m), f) for t, f in zip(totals, fmts, strict=True))])
    rows.append(["total", str(len(g.scopes)),
                 *(_cell(t.total, f) for t, f in zip(totals, fmts, strict=True))])
    print_table(("module", "ops", *(h for h, _, _ in columns)), rows, align, file=file)


def _modules_everywhere(g: LayerGrouping) -> list[str]:
    present = {m for key in g.layers() for m in g.modules_of(key)}
    return [m for m in MODULES if m in present]


def _layer_rows(g: LayerGrouping, totals: list[Totals],
                fmts: list[Callable[[float], str]]) -> list[list[str]]:
    rows: list[list[str]] = []
    for key in g.layers():
        rows.append([g.layer_label(key), str(len(g.layer_nodes(key))),
                     *(_cell(t.by_layer.get(key), f) for t, f in zip(totals, fmts, strict=True))])
        for m in g.modules_of(key):
            rows.append([f"  {MODULE_LABELS[m]}", str(len(g.module_nodes(key, m))),
                         *(_cell(t.by_layer_module.get((key, m)), f)
                           for t, f in zip(totals, fmts, strict=True))])
    return rows


def _cell(v: float | None, fmt: Callable[[float], str]) -> str:
    return "–" if v is None else fmt(v)


def weights_once(info: Any) -> dict[str, int]:
    """Weight bytes per node, each tensor on the first node reading it, so that layer totals
    add up to the model's (rotary caches read by every attention node count in layer 0)."""
    if not info.constant_bytes:
        return {n.name: n.param_bytes for n in info.nodes}
    seen: set[str] = set()
    out: dict[str, int] = {}
    for n in info.nodes:
        new = [x for x in dict.fromkeys(n.inputs) if x in info.constant_bytes and x not in seen]
        seen.update(new)
        out[n.name] = sum(info.constant_bytes[x] for x in new)
    return out
