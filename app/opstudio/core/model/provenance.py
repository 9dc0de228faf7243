"""Which original node a node of an optimized model came from.

Passes record it on every node they create, in the node's ``metadata_props`` under
``ORIGIN_KEY``, as a comma-separated list of original node names. The profiler reads it back so
that time measured on ``mm0_lowrank_a`` and ``mm0_lowrank_b`` is reported against ``mm0``.
Nodes without the key are their own origin.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import onnx

ORIGIN_KEY = "opstudio.origin"


def get_origin(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == ORIGIN_KEY and prop.value:
            return prop.value.split(",")
    return [node.name]


def set_origin(node: onnx.NodeProto, origins: Iterable[str]) -> None:
    names: list[str] = []
    for name in origins:
        if name and name not in names:
            names.append(name)
    for prop in list(node.metadata_props):
        if prop.key == ORIGIN_KEY:
            node.metadata_props.remove(prop)
    if names:
        entry = node.metadata_props.add()
        entry.key = ORIGIN_KEY
        entry.value = ",".join(names)


def derived_nodes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Original node name -> the top-level nodes of ``model`` that stand for it now (only for
    nodes a pass rewrote: every other node stands for itself). Profiles of an optimized model
    are reported per original node; this puts their rows back on the nodes a user sees."""
    out: dict[str, list[str]] = {}
    for node in model.graph.node:
        origins = get_origin(node)
        if origins != [node.name]:
            for origin in origins:
                out.setdefault(origin, []).append(node.name)
    return out


def standing_for(derived: Mapping[str, Sequence[str]], names: Iterable[str]) -> list[str]:
    """The nodes that now stand for ``names`` (each name itself when no pass rewrote it), in
    order and once each; ``derived`` is ``derived_nodes`` of the model."""
    out: list[str] = []
    for name in names:
        for node in derived.get(name, [name]):
            if node not in out:
                out.append(node)
    return out


def origin_map(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Node name -> original node names, for every top-level node of ``model``."""
    return {node.name: get_origin(node) for node in model.graph.node}
