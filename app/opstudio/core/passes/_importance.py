"""How structured pruning ranks the channels it may remove: ``"magnitude"``, the L2 norm of each
channel's weights across every matrix that loses it, or ``"activation"`` (Wanda-style, |W| times
the norms of the features reaching it on calibration samples). Heads are ranked in ``_heads``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from opstudio.core.model import graph_utils
from opstudio.core.passes import _heads as heads
from opstudio.core.passes import _weights as w
from opstudio.core.passes._calibration import calibration_samples
from opstudio.core.passes._channels import Channels, is_mlp, members, plan_removal
from opstudio.core.passes.base import PassContext


def channel_scores(work: onnx.ModelProto, plan: Channels, importance: str,
                   norms: Mapping[str, np.ndarray]) -> np.ndarray | str:
    """Per channel of ``plan``: the larger, the more it matters."""
    n = plan.channels

    def moved(node: onnx.NodeProto, axis: int) -> np.ndarray:
        value, _ = w.constant_array(work, node.input[1])
        assert value is not None
        return np.moveaxis(value.astype(np.float64), axis, 0)

    if importance == "magnitude":
        if not is_mlp(plan):  # a Conv's filters, as always: the node's own output channels
            node, axis = plan.sources[0]
            return np.linalg.norm(moved(node, axis).reshape(n, -1), axis=1)
        sq = np.zeros(n)
        for node, axis in plan.sources:
            sq += np.square(moved(node, axis).reshape(n, -1)).sum(axis=1)
        for node, axis, _ in plan.terminals:
            sq += np.square(moved(node, axis).reshape(n, -1)).sum(axis=1)
        return np.sqrt(sq)
    if not is_mlp(plan):
        return ("importance 'activation' handles channels from MatMul/Gemm to MatMul/Gemm "
                f"(an MLP); these reach {', '.join(members(plan))}")
    score = np.zeros(n)
    for node, axis in plan.sources:
        weight = np.abs(moved(node, axis).reshape(n, -1))  # [channels, input features]
        x = norms.get(node.name)
        if x is None or x.size != weight.shape[1]:
            return (f"the input of '{node.name}' has {None if x is None else x.size} measured "
                    f"features, its weight {weight.shape[1]}")
        score += weight @ x
    for node, axis, _ in plan.terminals:
        rows = np.abs(moved(node, axis).reshape(n, -1)).sum(axis=1)  # [channels]
        z = norms.get(node.name)
        if z is None or z.size != n:
            return (f"the input of '{node.name}' has {None if z is None else z.size} measured "
                    f"features, not {n}")
        score += z * rows
    return score


def activation_norms(work: onnx.ModelProto, nodes: Sequence[str], params: Mapping[str, Any],
                     ctx: PassContext) -> tuple[dict[str, np.ndarray], int]:
    """Input feature norms of every projection the chosen nodes' plans rank channels by,
    measured once on the unpruned model; and the number of calibration samples."""
    from opstudio.core.passes._activations import input_stats

    by_name = {n.name: n for n in work.graph.node}
    cons = graph_utils.consumers(work.graph)
    wanted: list[str] = []
    prods = graph_utils.producers(work.graph)
    for name in nodes:
        node = by_name.get(name)
        if node is None:
            continue
        plan = plan_removal(work, node, cons, prods)
        if isinstance(plan, heads.Heads):
            wanted.extend(m for m in plan.members if m not in wanted)
        elif not isinstance(plan, str) and is_mlp(plan):
            wanted.extend(m for m in members(plan) if m not in wanted)
    if not wanted:
        return {}, 0
    samples = calibration_samples(work, params["calibration"], params["samples"], ctx)
    stats = input_stats(work, wanted, samples, ctx=ctx)
    return {name: s.norm for name, s in stats.items()}, len(samples)
