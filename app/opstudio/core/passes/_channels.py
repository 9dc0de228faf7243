"""Which output channels structured pruning can remove, and what else shrinks with them.

A plan follows a node's output channels through everything they reach (``Channels``): its bias,
per-channel elementwise ops, activations and pools, a Flatten into a head, up to the next
MatMul/Gemm/Conv, whose weight loses the matching input rows; or, for an LLM MLP, every
projection that produces or reads the same intermediate channels (gate, up and down jointly).
``plan_removal`` is the one question the pass asks of a node: its channels (its own or its
MLP's), else the query heads of the attention it belongs to (``_heads``), else why not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeAlias

import numpy as np
import onnx
from onnx import helper

from opstudio.core.model import graph_utils
from opstudio.core.model.graph import analyze
from opstudio.core.passes import _heads as heads
from opstudio.core.passes import _weights as w

# Per-element ops: output channel c depends only on input channel c.
_UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Clip", "Elu", "Selu", "Celu",
          "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Mish", "Erf", "Abs", "Neg",
          "Identity", "Dropout", "Cast"}
# onnxruntime's fused activations (com.microsoft), per element like _UNARY; FastGelu and BiasGelu
# take an optional per-channel bias as input 1.
_CONTRIB_UNARY = {"Gelu", "FastGelu", "QuickGelu", "BiasGelu"}
# Binary ops whose other operand may be a per-channel constant.
_BINARY = {"Add", "Sub", "Mul", "Div", "PRelu", "Max", "Min", "Pow", "Sum"}
# Spatial ops over NC… tensors that keep channels apart.
_POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
          "GlobalLpPool"}
MATMULS = ("MatMul", "Gemm")


def own_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray | str:
    weight = w.float_weight(model, node, "prune")
    if isinstance(weight, str):
        return weight
    if weight.ndim < 2:
        return f"its weight '{node.input[1]}' has {weight.ndim} dims; prune needs 2 or more"
    return weight


def _sharers(model: onnx.ModelProto, tensor: str, node: onnx.NodeProto,
             cons: dict[str, list[onnx.NodeProto]] | None = None) -> list[str]:
    cons = graph_utils.consumers(model.graph) if cons is None else cons
    return [u.name for u in cons.get(tensor, []) if u.name != node.name]


@dataclass
class Channels:
    """What removing output channels of one node touches."""

    node: onnx.NodeProto
    weight_axis: int  # output-channel axis of the node's weight
    channels: int
    # node, input, axis, block: the input loses ``block`` consecutive entries per pruned channel
    edits: list[tuple[onnx.NodeProto, int, int, int]] = field(default_factory=list)
    # Reshape node, shape input, position, block: that entry becomes channels kept × block
    shape_edits: list[tuple[onnx.NodeProto, int, int, int]] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)  # tensors whose shape changes
    touched: list[str] = field(default_factory=list)  # nodes whose cost changes
    # nodes whose weight loses output channels (node, axis) and input channels (node, axis,
    # block): the matrices that rank the channels
    sources: list[tuple[onnx.NodeProto, int]] = field(default_factory=list)
    terminals: list[tuple[onnx.NodeProto, int, int]] = field(default_factory=list)
    joined_at: str = ""  # the node where the branches of several sources meet


def plan_channels(model: onnx.ModelProto, node: onnx.NodeProto, weight: np.ndarray,
                     cons: dict[str, list[onnx.NodeProto]] | None = None) -> Channels | str:
    op = node.op_type
    graph = model.graph
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    # reading who consumes what walks the whole graph (7000 nodes in an LLM): once per plan
    cons = graph_utils.consumers(graph) if cons is None else cons
    sharers = _sharers(model, node.input[1], node, cons)
    if sharers:
        return (f"the weight '{node.input[1]}' is shared with '{sharers[0]}'; removing channels "
                f"of '{node.name}' alone would need a second copy of it")
    if op == "Conv":
        if attrs.get("group", 1) != 1:
            return (f"it is a grouped/depthwise Conv (group={attrs['group']}); structured "
                    "pruning handles group=1")
        plan = Channels(node, 0, weight.shape[0])
        neg_axis, rank = 1 - weight.ndim, weight.ndim
        if len(node.input) > 2 and node.input[2]:
            plan.edits.append((node, 2, 0, 1))
    elif op == "MatMul":
        if weight.ndim != 2:
            return f"its weight '{node.input[1]}' has {weight.ndim} dims; structured pruning " \
                   "needs a 2-D weight"
        plan = Channels(node, 1, weight.shape[1])
        neg_axis, rank = -1, None
    else:  # Gemm
        trans_b = attrs.get("transB", 0)
        plan = Channels(node, 0 if trans_b else 1, weight.shape[0 if trans_b else 1])
        neg_axis, rank = -1, 2
        if len(node.input) > 2 and node.input[2]:
            bias, why = w.constant_array(model, node.input[2])
            if bias is None:
                return f"its bias C: {why}"
            if bias.ndim >= 1 and bias.shape[-1] == plan.channels and plan.channels > 1:
                plan.edits.append((node, 2, bias.ndim - 1, 1))
    plan.touched.append(node.name)
    plan.edits.insert(0, (node, 1, plan.weight_axis, 1))
    plan.sources.append((node, plan.weight_axis))
    if plan.channels < 2:
        return f"it has {plan.channels} output channel; nothing to remove"
    why = _follow(model, graph, plan, node.output[0], neg_axis, rank, cons)
    return why if why else plan


def _follow(model: onnx.ModelProto, graph: onnx.GraphProto, plan: Channels, start: str,
            neg_axis: int, start_rank: int | None, cons: dict[str, list[onnx.NodeProto]]) -> str | None:
    """Collect every node the channels of ``start`` reach; a reason if one cannot shrink."""
    outputs = {o.name for o in graph.output}
    name, n = plan.node.name, plan.channels
    ranks: dict[str, int | None] = {start: start_rank}
    # Where the channels are in each tensor (counted from the end) and how many consecutive
    # entries each channel spans there (1 until a Flatten folds the spatial dims in).
    axes: dict[str, int] = {start: neg_axis}
    blocks: dict[str, int] = {start: 1}
    inferred: list[Any] = []  # the graph analysis, run once if a Flatten/Reshape is met
    queue = [start]
    seen_nodes: set[str] = set()
    deferred: list[tuple[onnx.NodeProto, str]] = []
    late: list[str] = []

    def flows(user: onnx.NodeProto, what: str = "which structured pruning cannot shrink") -> str:
        return (f"output channels of '{name}' flow into {user.op_type} '{user.name}', {what}; "
                "structured pruning would change its shape")

    def channel_first(tensor: str) -> bool:
        rank = ranks.get(tensor)
        return rank is not None and axes[tensor] == 1 - rank and blocks[tensor] == 1

    def static_shape(tensor: str) -> list[int] | None:
        if not inferred:
            inferred.append(analyze(model, w.unit_dims(model)))
        return inferred[0].static_shape(tensor)

    while queue:
        t = queue.pop(0)
        plan.tensors.append(t)
        if t in outputs:
            return (f"output channels of '{name}' reach the graph output '{t}'; structured "
                    "pruning would change the model's output shape")
        for user in cons.get(t, []):
            if t not in user.input:
                return (f"output channels of '{name}' are read inside the subgraph of "
                        f"{user.op_type} '{user.name}'")
            op = user.op_type
            if user.domain not in ("", "ai.onnx"):
                return flows(user)
            if op in ("MatMul", "Gemm", "Conv") and user.input[0] == t:
                if len(user.input) > 1 and user.input[1] in ranks:
                    return flows(user, "which multiplies two of its branches")
                if user.name in seen_nodes:
                    continue
                why = _terminal(model, user, t, n, axes[t], blocks[t], channel_first(t), plan,
                                cons)
                if why:  # reported after a branch that joins back in, the likelier cause
                    late.append(why)
                seen_nodes.add(user.name)
                continue
            if user.name in seen_nodes:
                continue
            seen_nodes.add(user.name)
            rank = ranks.get(t)
            axis_out, block_out = axes[t], blocks[t]
            if op in _UNARY or op in _POOLS or op == "BatchNormalization":
                if user.input[0] != t:
                    return flows(user)
                if op in _POOLS and not channel_first(t):
                    return flows(user, "which pools over the pruned axis")
                if op == "MaxPool" and len(user.output) > 1 and user.output[1]:
                    return flows(user, "whose Indices output counts the channels")
                if op == "BatchNormalization":
                    if not channel_first(t):
                        return flows(user, "which normalizes axis 1, not the pruned axis")
                    if any(user.output[1:]):
                        return flows(user, "which also outputs running statistics")
                    for j in range(1, 5):
                        value, why = w.constant_array(model, user.input[j])
                        if value is None:
                            return f"BatchNormalization '{user.name}': {why}"
                        plan.edits.append((user, j, 0, 1))
                outs = [o for o in user.output if o] if op in _UNARY else [user.output[0]]
            elif op in _BINARY:
                for j, other in enumerate(user.input):
                    if other == t or not other:
                        continue
                    value, _ = w.constant_array(model, other)
                    if value is None:
                        deferred.append((user, other))
                        continue
                    axis = value.ndim + axes[t]
                    if axis >= 0 and value.shape[axis] == n * blocks[t]:
                        plan.edits.append((user, j, axis, blocks[t]))
                    elif axis >= 0 and value.shape[axis] != 1:
                        return flows(user, f"whose constant '{other}' has {value.shape[axis]} "
                                     f"entries on the pruned axis, not {n * blocks[t]}")
                    if rank is not None:
                        rank = max(rank, value.ndim)
                outs = [user.output[0]]
            elif op in ("Flatten", "Reshape"):
                if user.input[0] != t:
                    return flows(user, "which takes them as its shape")
                folded = _fold_channels(model, user, axes[t], blocks[t],
                                        partial(static_shape, t), plan)
                if isinstance(folded, str):
                    return flows(user, folded)
                rank, axis_out, block_out = 2, -1, folded
                outs = [user.output[0]]
            else:
                return flows(user)
            plan.touched.append(user.name)
            for out in outs:
                ranks[out] = rank
                axes[out], blocks[out] = axis_out, block_out
                queue.append(out)
    for user, other in deferred:
        if other not in ranks:
            return flows(user, f"which also takes another branch ('{other}')")
    return late[0] if late else None


def _fold_channels(model: onnx.ModelProto, user: onnx.NodeProto, neg_axis: int, block: int,
                   shape_of: Callable[[], list[int] | None], plan: Channels) -> int | str:
    """How many consecutive features each channel becomes when ``user`` (Flatten or Reshape)
    folds [N, C, d…] into [N, C·d…]; a reason in words when it does anything else. The input's
    shape (``shape_of``, shape inference: seconds on a large model) is asked for last."""
    not_a_fold = "which does not reshape them to [batch, channels × the rest]"
    if block != 1:
        return "which folds the channels a second time"
    target: list[int] = []
    if user.op_type == "Reshape":
        value, why = w.constant_array(model, user.input[1])
        if value is None:
            return f"whose shape is not a constant ({why})"
        target = [int(v) for v in np.asarray(value).reshape(-1)]
        if len(target) != 2:
            return not_a_fold
    shape = shape_of()
    if shape is None:
        return "whose input shape is not static, so the pruned features cannot be located"
    rank = len(shape)
    channel = rank + neg_axis
    spatial = math.prod(shape[channel + 1:])
    if user.op_type == "Flatten":
        attrs = {a.name: helper.get_attribute_value(a) for a in user.attribute}
        axis = attrs.get("axis", 1)
        axis = axis + rank if axis < 0 else axis
        if axis != channel:
            return "which does not start its flattened dims at the channel axis"
        return spatial
    allowzero = any(a.name == "allowzero" and a.i for a in user.attribute)
    lead = math.prod(shape[:channel])
    if channel != 1 or target[0] not in ((lead,) if allowzero else (0, lead)):
        return not_a_fold
    if target[1] == math.prod(shape[channel:]):
        plan.shape_edits.append((user, 1, 1, spatial))
    elif target[1] != -1:
        return not_a_fold
    return spatial


def _terminal(model: onnx.ModelProto, user: onnx.NodeProto, t: str, n: int, neg_axis: int,
              block: int, channel_first: bool, plan: Channels, cons: dict[str, list[onnx.NodeProto]]) -> str | None:
    """The next MatMul/Gemm/Conv: its weight loses the pruned input channels."""
    op = user.op_type
    attrs = {a.name: helper.get_attribute_value(a) for a in user.attribute}
    where = f"output channels of '{plan.node.name}' feed {op} '{user.name}'"
    weight, why = w.constant_array(model, user.input[1])
    if weight is None:
        return f"{where}, whose weight is not a constant ({why})"
    sharers = _sharers(model, user.input[1], user, cons)
    if sharers:
        return (f"{where}, whose weight '{user.input[1]}' is shared with '{sharers[0]}'; "
                "slicing it would need a second copy")
    if op == "Conv":
        if not channel_first:
            return f"{where} on an axis that is not its channel axis"
        if attrs.get("group", 1) != 1:
            return f"{where}, a grouped/depthwise Conv (group={attrs['group']})"
        axis = 1
    elif op == "MatMul":
        if neg_axis != -1 or weight.ndim != 2:
            return f"{where} on an axis that is not its reduction axis"
        axis = 0
    else:
        if neg_axis != -1 or attrs.get("transA", 0):
            return f"{where} on an axis that is not its reduction axis"
        axis = 1 if attrs.get("transB", 0) else 0
    if weight.shape[axis] != n * block:
        return f"{where}, whose weight has {weight.shape[axis]} input channels, not {n * block}"
    plan.edits.append((user, 1, axis, block))
    plan.terminals.append((user, axis, block))
    plan.touched.append(user.name)
    return None


# ---------------------------------------------------------------- channels or heads

# What structured pruning removes for one selected node: channels, or the query heads of an
# attention (``_heads``).
Removal: TypeAlias = Channels | heads.Heads


def plan_removal(model: onnx.ModelProto, node: onnx.NodeProto,
                 cons: dict[str, list[onnx.NodeProto]] | None = None,
                 prods: dict[str, onnx.NodeProto] | None = None,
                 weight: np.ndarray | None = None) -> Removal | str:
    """The channels ``node``'s removal takes (its own, or its MLP's jointly), else the query
    heads of the attention it belongs to, else the reason that says most. ``cons``/``prods``
    and ``weight`` (``own_weight``) may be passed when the caller has them."""
    found = own_weight(model, node) if weight is None else weight
    if isinstance(found, str):
        return found
    cons = graph_utils.consumers(model.graph) if cons is None else cons
    plan = _plan_any(model, node, found, cons)
    if not isinstance(plan, str):
        return plan
    prods = graph_utils.producers(model.graph) if prods is None else prods
    head_plan = heads.plan_heads(model, node, cons, prods)
    if not isinstance(head_plan, str):
        return head_plan
    # the attention's own reason when the node belongs to one, else the channels' one
    return plan if head_plan.startswith("it neither") else head_plan


def removed_channels(plan: Channels, sparsity: float) -> int:
    """How many of the plan's channels go: ``⌊sparsity · n + ½⌋``, one always kept."""
    return min(math.floor(sparsity * plan.channels + 0.5), plan.channels - 1)


# ---------------------------------------------------------------- joint (MLPs)


def _plan_any(model: onnx.ModelProto, node: onnx.NodeProto, weight: np.ndarray,
              cons: dict[str, list[onnx.NodeProto]] | None = None) -> Channels | str:
    """The node's own output channels if they can go; else the MLP it belongs to, pruned
    jointly; else the reason in words."""
    cons = graph_utils.consumers(model.graph) if cons is None else cons
    plan = plan_channels(model, node, weight, cons)
    if not isinstance(plan, str) or node.op_type not in MATMULS:
        return plan
    prods = graph_utils.producers(model.graph)
    as_source, _ = _plan_joint(model, node, weight, True, cons, prods)
    if not isinstance(as_source, str):
        return as_source
    as_terminal, reached = _plan_joint(model, node, weight, False, cons, prods)
    if not isinstance(as_terminal, str):
        return as_terminal
    if "also takes another branch" in plan:  # a gated MLP that cannot be pruned: say why
        return as_source
    if reached:  # it is the second layer of an MLP that cannot be pruned: say why
        return f"{plan}; pruned jointly with its MLP, {as_terminal}"
    return plan


def _plan_joint(model: onnx.ModelProto, node: onnx.NodeProto, weight: np.ndarray,
                as_source: bool, cons: dict[str, list[onnx.NodeProto]],
                prods: dict[str, onnx.NodeProto]) -> tuple[Channels | str, int]:
    """The channels shared by MatMul/Gemm projections through per-element ops: every
    projection producing them (sources) and every one reading them (terminals), found from
    ``node``'s output (``as_source``) or its input. Also how many nodes besides ``node`` the
    search reached (none: ``node`` is not part of an MLP at all)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if weight.ndim != 2:
        return f"its weight '{node.input[1]}' has {weight.ndim} dims, not 2", 0
    trans_b = node.op_type == "Gemm" and attrs.get("transB", 0)
    if as_source:
        n = weight.shape[0 if trans_b else 1]
    else:
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            return f"Gemm '{node.name}' transposes its input (transA)", 0
        n = weight.shape[1 if trans_b else 0]
    plan = Channels(node, 1, n)
    region: set[str] = set()
    queue: list[str] = []
    visited: set[str] = set()
    terminal_names: set[str] = set()
    joins: list[str] = []  # binary nodes taking two branches of the channels
    where = f"the channels of '{node.name}'" if as_source else "its input channels"

    def flows(user: onnx.NodeProto, what: str = "which structured pruning cannot shrink") -> str:
        return f"{where} flow into {user.op_type} '{user.name}', {what}"

    def add(tensor: str) -> None:
        if tensor not in region:
            region.add(tensor)
            queue.append(tensor)

    def per_element(u: onnx.NodeProto) -> str | None:
        if u.name in visited:
            return None
        visited.add(u.name)
        contrib = u.domain == "com.microsoft"
        binary = u.op_type in _BINARY and not contrib
        live = 0
        for j, name in enumerate(u.input):
            if not name:
                continue
            if name in region:
                live += 1
                continue
            value, _ = w.constant_array(model, name)
            if value is None:
                if j > 0 and not binary:
                    return flows(u, f"whose input '{name}' is computed at run time")
                add(name)  # another branch: its channels must be the same ones
                live += 1
                continue
            if not binary and (j == 0 or not contrib):
                continue  # Clip bounds, Dropout ratio: scalars
            axis = value.ndim - 1
            if axis >= 0 and value.shape[axis] == n:
                plan.edits.append((u, j, axis, 1))
            elif axis >= 0 and value.shape[axis] != 1:
                return flows(u, f"whose constant '{name}' has {value.shape[axis]} entries on "
                             f"the pruned axis, not {n}")
        if binary and live > 1:
            joins.append(u.name)
        for out in (u.output if not binary else u.output[:1]):
            if out:
                add(out)
        plan.touched.append(u.name)
        return None

    if as_source:
        why = _add_source(model, node, n, plan, where, cons)
        visited.add(node.name)
        if why:
            return why, 0
        add(node.output[0])
    else:
        visited.add(node.name)
        terminal_names.add(node.name)
        why = _terminal(model, node, node.input[0], n, -1, 1, False, plan, cons)
        if why:
            return why, 0
        add(node.input[0])
    while queue:
        t = queue.pop(0)
        plan.tensors.append(t)
        if t in outputs:
            return (f"{where} reach the graph output '{t}'; structured pruning would change "
                    "the model's output shape"), len(plan.touched) - 1
        for user in cons.get(t, []):
            if t not in user.input:
                return (f"{where} are read inside the subgraph of {user.op_type} "
                        f"'{user.name}'"), len(plan.touched) - 1
            if user.op_type in MATMULS and user.domain in ("", "ai.onnx") \
                    and user.input[0] == t and user.input[1] not in region:
                if user.name in terminal_names:
                    continue
                if any(user is p for p, _ in plan.sources):
                    return flows(user, "which both produces and reads them"), len(plan.touched) - 1
                why = _terminal(model, user, t, n, -1, 1, False, plan, cons)
                if why:
                    return why, len(plan.touched) - 1
                terminal_names.add(user.name)
                visited.add(user.name)
            elif _is_per_element(user):
                why = per_element(user)
                if why:
                    return why, len(plan.touched) - 1
            else:
                return flows(user), len(plan.touched) - 1
        producer = prods.get(t)
        if producer is None:
            return (f"{where} come from the graph input '{t}', not from a projection "
                    "structured pruning can shrink"), len(plan.touched) - 1
        if producer.name in visited:
            continue
        if _is_per_element(producer):
            why = per_element(producer)
        elif producer.op_type in MATMULS and producer.domain in ("", "ai.onnx") \
                and producer.output[0] == t:
            why = _add_source(model, producer, n, plan, where, cons)
            visited.add(producer.name)
        else:
            why = (f"{where} come from {producer.op_type} '{producer.name}', which structured "
                   "pruning cannot shrink")
        if why:
            return why, len(plan.touched) - 1
    if not plan.sources or not plan.terminals:
        return f"{where} do not pass from one projection to another", len(plan.touched) - 1
    if n < 2:
        return f"it has {n} intermediate channel; nothing to remove", len(plan.touched) - 1
    position = {n.name: k for k, n in enumerate(graph.node)}
    plan.sources.sort(key=lambda s: position.get(s[0].name, -1))  # named in graph order
    plan.terminals.sort(key=lambda t: position.get(t[0].name, -1))
    if joins:  # the last join before the terminals is where the sources meet (x·σ(x) is earlier)
        plan.joined_at = max(joins, key=lambda name: position.get(name, -1))
    return plan, len(plan.touched) - 1


def _add_source(model: onnx.ModelProto, p: onnx.NodeProto, n: int, plan: Channels, where: str,
                cons: dict[str, list[onnx.NodeProto]]) -> str | None:
    """``p`` joins ``plan`` as a projection producing its ``n`` channels (``where``: them, in
    words); the reason if its weight cannot lose them."""
    found = w.float_weight(model, p, "prune")
    if isinstance(found, str):
        return f"{where} come from {p.op_type} '{p.name}': {found}"
    p_attrs = {a.name: helper.get_attribute_value(a) for a in p.attribute}
    if found.ndim != 2:
        return f"{where} come from '{p.name}', whose weight has {found.ndim} dims, not 2"
    sharers = _sharers(model, p.input[1], p, cons)
    if sharers:
        return (f"{where} come from '{p.name}', whose weight '{p.input[1]}' is shared with "
                f"'{sharers[0]}'; slicing it would need a second copy")
    axis = 0 if p.op_type == "Gemm" and p_attrs.get("transB", 0) else 1
    if found.shape[axis] != n:
        return (f"{where} come from '{p.name}', whose weight has {found.shape[axis]} output "
                f"channels, not {n}")
    plan.edits.append((p, 1, axis, 1))
    if p.op_type == "Gemm" and len(p.input) > 2 and p.input[2]:
        bias, why = w.constant_array(model, p.input[2])
        if bias is None:
            return f"the bias C of '{p.name}': {why}"
        if bias.ndim >= 1 and bias.shape[-1] == n:
            plan.edits.append((p, 2, bias.ndim - 1, 1))
    plan.sources.append((p, axis))
    plan.touched.append(p.name)
    return None


def _is_per_element(u: onnx.NodeProto) -> bool:
    if u.domain == "com.microsoft":
        return u.op_type in _CONTRIB_UNARY
    return u.domain in ("", "ai.onnx") and (u.op_type in _UNARY or u.op_type in _BINARY)


def is_mlp(plan: Channels) -> bool:
    """Channels made by MatMul/Gemm and read by MatMul/Gemm, one row each: an MLP's."""
    return (all(p.op_type in MATMULS for p, _ in plan.sources) and bool(plan.terminals)
            and all(t.op_type in MATMULS and block == 1 for t, _, block in plan.terminals))


def members(plan: Channels) -> list[str]:
    return [p.name for p, _ in plan.sources] + [t.name for t, _, _ in plan.terminals]


def mlp_label(names: Sequence[str]) -> tuple[str, list[str]]:
    """'layers.3's MLP' and ['gate_proj', 'up_proj', 'down_proj'] from scoped node names."""
    parts = [name.split("/") for name in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    scope = [p for p in parts[0][:common] if p]
    short = [p[common] if common else "/".join(p) for p in parts]
    if len(set(short)) < len(short):
        short = list(names)
    if scope and scope[-1].lower() in ("mlp", "ffn", "feed_forward", "feedforward") \
            and len(scope) > 1:
        return f"{scope[-2]}'s MLP", short
    if scope:
        return f"the MLP in '{'/'.join(scope)}'", short
    return "the MLP", short


def joint_remark(plan: Channels) -> str:
    label, short = mlp_label(members(plan))
    n_src = len(plan.sources)
    srcs, terms = short[:n_src], short[n_src:]
    if n_src > 1:
        why = (f"the outputs of {' and '.join(srcs)} meet channel by channel in "
               f"'{plan.joined_at}' before {', '.join(terms)}")
    else:
        why = f"{srcs[0]}'s output channels are {', '.join(terms)}'s input rows"
    return (f"prunes {label} jointly ({', '.join(short)}): the same intermediate channels "
            f"leave all of them, because {why}")
