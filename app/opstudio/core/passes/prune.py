"""Sparsification: zero the smallest weights, or remove whole output channels.

Unstructured (``structured: false``) zeroes the ``⌊sparsity · n + ½⌋`` weights of smallest
magnitude in the node's constant weight (ties: the earlier element in row-major order goes
first). The graph keeps its shapes, and onnxruntime's dense CPU kernels multiply the zeros like
any other number: **no speedup on CPU**, only a smaller file when the weight is stored sparse.

``storage: "sparse"`` stores the pruned weight as the list of its non-zeros (float values plus
int64 linear indices, 12 bytes per float32 non-zero against 4 bytes per dense weight, so it pays
off above ~67% sparsity). It is written as a ``Constant`` node with ``sparse_value`` (opset ≥ 11),
which outputs the dense tensor the op expects: a ``graph.sparse_initializer`` feeding
MatMul/Gemm/Conv directly loads in onnxruntime but fails ``onnx.checker`` full check, because
shape inference sees a sparse tensor type where the op takes a dense one. onnxruntime expands the
constant to a dense tensor when it loads the model.

Structured (``structured: true``) removes the output channels (Conv output channels, MatMul/Gemm
output columns) with the smallest L2 norms and shrinks everything the channels flow into so
FLOPs really drop: the node's own bias, a BatchNormalization, elementwise ops with a per-channel
constant (Add/Sub/Mul/Div/PRelu/Max/Min/Pow/Sum) or joining two pruned branches (x·sigmoid(x)),
per-channel activations and pools, up to the next MatMul/Gemm/Conv, whose weight loses the
matching input channels. A Flatten (or a Reshape to [batch, -1 | C·H·W]) between a Conv and
the next MatMul/Gemm, as in a classic CNN head, is followed too: channel c is then the block of
H·W consecutive features c·H·W … (c+1)·H·W − 1, and the head's weight loses those rows (the
dims after the channel must be static; a constant Reshape shape is rewritten). Where the
channels reach anything else (a residual Add with another branch, a Reshape that splits them,
Concat, a graph output, a weight shared with another node…) the node is skipped with the reason.

LLM MLPs are pruned jointly. In a gated MLP (SwiGLU/GeGLU: ``down(act(gate(x)) · up(x))``) the
intermediate channels of gate_proj and up_proj meet channel by channel (act: x·Sigmoid(x), Gelu,
FastGelu, QuickGelu, Relu…) before down_proj, so the same channels must leave the output
columns of both and the input rows of down_proj. Selecting any one projection of such an MLP
(or the second layer of a plain fc1 → act → fc2 MLP, whose own outputs reach the residual)
rewrites the whole MLP; the notes and details name its members. ``importance`` ranks the
channels: ``"magnitude"`` by the L2 norm of each channel's weights across every matrix that
loses it (a Conv, or a node whose channels reach no MatMul/Gemm MLP, by its own output channel
as before), ``"activation"`` Wanda-style (Sun et al. 2023, S = |W|·‖X‖, summed over the
channel's weights): |W| of each source column times the norms of that projection's input
features, plus the intermediate activation's norm ‖z_j‖ times down_proj's row j, measured on
``calibration`` samples (``"random"`` or an .npz of model inputs, as for int8-static).
Weights behind fp16 + Cast are read folded; a pruned one is a fresh initializer, stored
in float16 behind a new Cast when its original was.

Attention projections go by whole query heads where the graph allows (``_heads``): behind an
onnxruntime ``GroupQueryAttention`` or transformers' ``repeat_kv``, selecting the q (or packed
q|k|v) or output projection removes ``sparsity`` of the query heads of every KV group from
both, leaving the KV cache as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.errors import OpstudioError
from opstudio.core.model import graph_utils, provenance
from opstudio.core.model.graph import analyze
from opstudio.core.passes import _heads as heads
from opstudio.core.passes import _weights as w
from opstudio.core.passes._calibration import (
    calibration_params,
    calibration_samples,
    check_calibration,
)
from opstudio.core.passes.base import ParamSpec, Pass, PassContext, PassResult

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
_MATMULS = ("MatMul", "Gemm")
IMPORTANCE = ("magnitude", "activation")
CPU_NOTE = ("unstructured sparsity does not make onnxruntime's dense CPU kernels faster: "
            "the zeros are multiplied like any other weight")


class PrunePass(Pass):
    technique = "prune"
    plan_order = 10
    helps_when = "compute"
    because = "structured pruning cuts the FLOPs"
    colour = "#16a085"
    label = "Prune"
    description = ("Zero the smallest weights (unstructured: no faster on CPU's dense kernels, "
                   "smaller only with sparse storage) or remove whole output channels and shrink "
                   "the layers they feed (structured: fewer FLOPs)")
    params = (
        ParamSpec("sparsity", "float", 0.5, "Sparsity",
                  "fraction of weights (or output channels) removed, in [0, 1)",
                  minimum=0.0, maximum=1.0),
        ParamSpec("structured", "bool", False, "Structured",
                  "remove whole output channels instead of single weights"),
        ParamSpec("storage", "choice", "dense", "Storage",
                  "how the pruned weight is written: dense, or as its list of non-zeros",
                  choices=("dense", "sparse")),
        ParamSpec("importance", "choice", "magnitude", "Importance",
                  "how structured pruning ranks channels: weight norms, or Wanda-style "
                  "|weight| × input activation norm on calibration samples",
                  choices=IMPORTANCE),
        *calibration_params(8),
    )

    def validate_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        out = super().validate_params(params)
        if out["sparsity"] >= 1.0:
            raise OpstudioError("prune: parameter 'sparsity' must be below 1, not "
                                f"{out['sparsity']}")
        if out["structured"] and out["storage"] == "sparse":
            raise OpstudioError("prune: storage 'sparse' applies to unstructured pruning only; "
                                "structured pruning leaves a smaller dense weight")
        if out["importance"] == "activation":
            if not out["structured"]:
                raise OpstudioError("prune: importance 'activation' applies to structured "
                                    "pruning (structured: true)")
            check_calibration(self.technique, out)
        return out

    def check(self, model: onnx.ModelProto, node: onnx.NodeProto,
              params: Mapping[str, Any] | None = None) -> str | None:
        given = self.given_params(params)
        found = _own_weight(model, node)
        if isinstance(found, str):
            return found
        if given["structured"]:
            plan = _plan_any(model, node, found)
            if isinstance(plan, str):
                return _or_heads(model, node, plan)
        elif given["storage"] == "sparse" and w.opset(model) < 11:
            return (f"sparse storage needs a Constant with sparse_value (opset 11); the model "
                    f"has opset {w.opset(model)}")
        return None

    def _partition(self, work: onnx.ModelProto, nodes: Sequence[str],
                   params: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
        if not params["structured"]:
            return super()._partition(work, nodes, params)
        # Whether a node's channels can go depends on what this step rewrote before it (the
        # second layer of a pruned MLP or Conv chain goes with the first): ``_rewrite`` plans
        # node after node on the graph as it is then. Here only the weight is checked.
        return super()._partition(work, nodes, {**params, "structured": False})

    def remark(self, model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto]) -> str | None:
        """What structured pruning of ``nodes`` would rewrite besides them, in words: the whole
        MLP a selected projection belongs to (shown next to the technique)."""
        seen: set[str] = set()
        plans: list[_Plan] = []
        matmuls = [n for n in nodes if n.op_type in _MATMULS]
        chosen = matmuls[:_REMARKED]
        cons = graph_utils.consumers(model.graph) if chosen else {}
        for node in chosen:
            if node.name in seen:
                continue
            found = _own_weight(model, node)
            plan = found if isinstance(found, str) else _plan_any(model, node, found, cons)
            if isinstance(plan, str) and not isinstance(found, str) and not plans:
                head_plan = heads.plan_heads(model, node, cons,
                                             graph_utils.producers(model.graph))
                if not isinstance(head_plan, str):
                    return (f"structured: removes query heads of "
                            f"{head_plan.label} ({head_plan.heads} heads, "
                            f"{head_plan.group} per KV group) from "
                            f"{' and '.join(head_plan.members)} jointly; the KV cache keeps "
                            "its shape")
            if isinstance(plan, str) or not _is_mlp(plan):
                continue
            seen.update(_members(plan))
            plans.append(plan)
        if not plans:
            return None
        # the reason once; a selection across 30 layers would repeat it 30 times
        text = "structured: " + _joint_remark(plans[0])
        others = [_mlp_label(_members(plan))[0] for plan in plans[1:]]
        if others:
            text += "; likewise " + ", ".join(others)
        if len(matmuls) > len(chosen):
            text += " and the MLPs of the other selected projections"
        return text

    def _rewrite(self, work: onnx.ModelProto, chosen: Sequence[str], params: Mapping[str, Any],
                 ctx: PassContext) -> PassResult:
        size_before = work.ByteSize()
        if params["structured"]:
            result = _apply_structured(work, chosen, params, ctx)
        else:
            result = _apply_unstructured(work, chosen, params["sparsity"], params["storage"], ctx)
        if result.applied:
            size_after = work.ByteSize()
            result.notes.append(
                f"model size {size_before:,} → {size_after:,} bytes "
                f"({(size_after - size_before) / max(size_before, 1):+.1%}, "
                f"{params['storage']} storage)")
            if not params["structured"]:
                result.notes.append(CPU_NOTE)
        return result


PASS = PrunePass()
_REMARKED = 4  # selected projections described in the remark (each is planned: keep it cheap)


def _own_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray | str:
    weight = w.float_weight(model, node, "prune")
    if isinstance(weight, str):
        return weight
    if weight.ndim < 2:
        return f"its weight '{node.input[1]}' has {weight.ndim} dims; prune needs 2 or more"
    return weight


def _n_removed(sparsity: float, n: int) -> int:
    return math.floor(sparsity * n + 0.5)


def _sharers(model: onnx.ModelProto, tensor: str, node: onnx.NodeProto,
             cons: dict[str, list[onnx.NodeProto]] | None = None) -> list[str]:
    cons = graph_utils.consumers(model.graph) if cons is None else cons
    return [u.name for u in cons.get(tensor, []) if u.name != node.name]


# ---------------------------------------------------------------- unstructured


def _apply_unstructured(work: onnx.ModelProto, nodes: Sequence[str], sparsity: float,
                        storage: str, ctx: PassContext) -> PassResult:
    result = PassResult(model=work)
    by_name = {n.name: n for n in work.graph.node}
    chosen = [by_name[name] for name in nodes]  # ``check`` took them
    # A weight shared by several nodes is pruned once when all of them are chosen; shared with a
    # node left alone it would need a second, pruned copy.
    cons = graph_utils.consumers(work.graph)
    chosen_names = {n.name for n in chosen}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in chosen:
        others = [u.name for u in cons.get(node.input[1], []) if u.name not in chosen_names]
        if others:
            result.skipped[node.name] = (
                f"the weight '{node.input[1]}' is also used by '{others[0]}', which is not being "
                "pruned; pruning it here would need a second copy of the weight")
        else:
            groups.setdefault(node.input[1], []).append(node)
    if not groups:
        return result
    taken = w.all_names(work.graph)
    holders = _holder_bytes(work)
    position = {n.name: k for k, n in enumerate(work.graph.node)}
    first_user = {t: min(users, key=lambda n: position[n.name]) for t, users in groups.items()}
    replacements: dict[str, list[onnx.NodeProto]] = {}
    for k, (tensor, users) in enumerate(groups.items()):
        ctx.check_cancelled()
        ctx.report(k / len(groups), f"prune: {tensor}")
        weight, _ = w.constant_array(work, tensor)
        assert weight is not None
        flat = weight.reshape(-1).copy()
        removed = _n_removed(sparsity, flat.size)
        order = np.argsort(np.abs(flat), kind="stable")
        flat[order[:removed]] = 0
        pruned = flat.reshape(weight.shape)
        new_name = w.unique_name(taken, f"{tensor}_pruned")
        origins: list[str] = []
        for user in users:
            origins.extend(provenance.get_origin(user))
        if storage == "sparse":
            const = _sparse_constant(pruned, new_name, w.unique_name(taken, f"{new_name}_sparse"))
            provenance.set_origin(const, origins)
            anchor = first_user[tensor]
            replacements[anchor.name] = [const, anchor]
            bytes_after = const.ByteSize()
        else:
            w.add_initializer(work, pruned, new_name)
            bytes_after = work.graph.initializer[-1].ByteSize()
        for user in users:
            user.input[1] = new_name
        nonzero_before = int(np.count_nonzero(weight))
        nonzero_after = int(np.count_nonzero(pruned))
        for user in users:
            result.applied.append(user.name)
            result.details[user.name] = {
                "weight": tensor, "weights": int(flat.size), "zeroed": removed,
                "sparsity": float(1.0 - nonzero_after / flat.size) if flat.size else 0.0,
                "params_before": nonzero_before, "params_after": nonzero_after,
                "storage": storage, "bytes_before": holders.get(tensor, weight.nbytes),
                "bytes_after": bytes_after, "speed_note": CPU_NOTE,
                "shared_with": [u.name for u in users if u is not user],
            }
    w.replace_nodes(work.graph, replacements)
    w.remove_unused(work, list(groups))
    result.applied.sort(key=list(nodes).index)
    return result


def _holder_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Serialized bytes of whatever holds each constant (initializer or Constant node)."""
    sizes = {i.name: i.ByteSize() for i in model.graph.initializer}
    sizes.update({s.values.name: s.ByteSize() for s in model.graph.sparse_initializer})
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            sizes[node.output[0]] = node.ByteSize()
    return sizes


def _sparse_constant(dense: np.ndarray, output: str, node_name: str) -> onnx.NodeProto:
    flat = dense.reshape(-1)
    indices = np.flatnonzero(flat).astype(np.int64)  # ascending, as the format requires
    values = numpy_helper.from_array(flat[indices], output)
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(indices),
                                       list(dense.shape))
    return helper.make_node("Constant", [], [output], name=node_name, sparse_value=sparse)


# ---------------------------------------------------------------- structured


@dataclass
class _Plan:
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


def _plan_structured(model: onnx.ModelProto, node: onnx.NodeProto, weight: np.ndarray,
                     cons: dict[str, list[onnx.NodeProto]] | None = None) -> _Plan | str:
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
        plan = _Plan(node, 0, weight.shape[0])
        neg_axis, rank = 1 - weight.ndim, weight.ndim
        if len(node.input) > 2 and node.input[2]:
            plan.edits.append((node, 2, 0, 1))
    elif op == "MatMul":
        if weight.ndim != 2:
            return f"its weight '{node.input[1]}' has {weight.ndim} dims; structured pruning " \
                   "needs a 2-D weight"
        plan = _Plan(node, 1, weight.shape[1])
        neg_axis, rank = -1, None
    else:  # Gemm
        trans_b = attrs.get("transB", 0)
        plan = _Plan(node, 0 if trans_b else 1, weight.shape[0 if trans_b else 1])
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


def _follow(model: onnx.ModelProto, graph: onnx.GraphProto, plan: _Plan, start: str,
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
                   shape_of: Callable[[], list[int] | None], plan: _Plan) -> int | str:
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
              block: int, channel_first: bool, plan: _Plan, cons: dict[str, list[onnx.NodeProto]]) -> str | None:
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


# ---------------------------------------------------------------- joint (MLPs)


def _plan_any(model: onnx.ModelProto, node: onnx.NodeProto, weight: np.ndarray,
              cons: dict[str, list[onnx.NodeProto]] | None = None) -> _Plan | str:
    """The node's own output channels if they can go; else the MLP it belongs to, pruned
    jointly; else the reason in words."""
    cons = graph_utils.consumers(model.graph) if cons is None else cons
    plan = _plan_structured(model, node, weight, cons)
    if not isinstance(plan, str) or node.op_type not in _MATMULS:
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
                prods: dict[str, onnx.NodeProto]) -> tuple[_Plan | str, int]:
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
    plan = _Plan(node, 1, n)
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

    def add_source(p: onnx.NodeProto) -> str | None:
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
        visited.add(p.name)
        return None

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

    def is_per_element(u: onnx.NodeProto) -> bool:
        if u.domain == "com.microsoft":
            return u.op_type in _CONTRIB_UNARY
        return u.domain in ("", "ai.onnx") and (u.op_type in _UNARY or u.op_type in _BINARY)

    if as_source:
        why = add_source(node)
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
            if user.op_type in _MATMULS and user.domain in ("", "ai.onnx") \
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
            elif is_per_element(user):
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
        if is_per_element(producer):
            why = per_element(producer)
        elif producer.op_type in _MATMULS and producer.domain in ("", "ai.onnx") \
                and producer.output[0] == t:
            why = add_source(producer)
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


def _is_mlp(plan: _Plan) -> bool:
    """Channels made by MatMul/Gemm and read by MatMul/Gemm, one row each: an MLP's."""
    return (all(p.op_type in _MATMULS for p, _ in plan.sources) and bool(plan.terminals)
            and all(t.op_type in _MATMULS and block == 1 for t, _, block in plan.terminals))


def _members(plan: _Plan) -> list[str]:
    return [p.name for p, _ in plan.sources] + [t.name for t, _, _ in plan.terminals]


def _mlp_label(names: Sequence[str]) -> tuple[str, list[str]]:
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


def _joint_remark(plan: _Plan) -> str:
    label, short = _mlp_label(_members(plan))
    n_src = len(plan.sources)
    srcs, terms = short[:n_src], short[n_src:]
    if n_src > 1:
        why = (f"the outputs of {' and '.join(srcs)} meet channel by channel in "
               f"'{plan.joined_at}' before {', '.join(terms)}")
    else:
        why = f"{srcs[0]}'s output channels are {', '.join(terms)}'s input rows"
    return (f"prunes {label} jointly ({', '.join(short)}): the same intermediate channels "
            f"leave all of them, because {why}")


def _channel_scores(work: onnx.ModelProto, plan: _Plan, importance: str,
                    norms: Mapping[str, np.ndarray]) -> np.ndarray | str:
    """Per channel of ``plan``: the larger, the more it matters."""
    n = plan.channels

    def moved(node: onnx.NodeProto, axis: int) -> np.ndarray:
        value, _ = w.constant_array(work, node.input[1])
        assert value is not None
        return np.moveaxis(value.astype(np.float64), axis, 0)

    if importance == "magnitude":
        if not _is_mlp(plan):  # a Conv's filters, as always: the node's own output channels
            node, axis = plan.sources[0]
            return np.linalg.norm(moved(node, axis).reshape(n, -1), axis=1)
        sq = np.zeros(n)
        for node, axis in plan.sources:
            sq += np.square(moved(node, axis).reshape(n, -1)).sum(axis=1)
        for node, axis, _ in plan.terminals:
            sq += np.square(moved(node, axis).reshape(n, -1)).sum(axis=1)
        return np.sqrt(sq)
    if not _is_mlp(plan):
        return ("importance 'activation' handles channels from MatMul/Gemm to MatMul/Gemm "
                f"(an MLP); these reach {', '.join(_members(plan))}")
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


def _activation_norms(work: onnx.ModelProto, nodes: Sequence[str], params: Mapping[str, Any],
                      ctx: PassContext) -> tuple[dict[str, np.ndarray], int]:
    """Input feature norms of every projection the chosen nodes' plans rank channels by,
    measured once on the unpruned model; and the number of calibration samples."""
    from opstudio.core.passes._activations import input_stats

    by_name = {n.name: n for n in work.graph.node}
    cons = graph_utils.consumers(work.graph)
    wanted: list[str] = []
    for name in nodes:
        node = by_name.get(name)
        found = "no such node" if node is None else _own_weight(work, node)
        if isinstance(found, str):
            continue
        assert node is not None
        plan = _plan_any(work, node, found, cons)
        if not isinstance(plan, str) and _is_mlp(plan):
            wanted.extend(m for m in _members(plan) if m not in wanted)
        elif isinstance(plan, str):
            head_plan = heads.plan_heads(work, node, cons, graph_utils.producers(work.graph))
            if not isinstance(head_plan, str):
                wanted.extend(m for m in head_plan.members if m not in wanted)
    if not wanted:
        return {}, 0
    samples = calibration_samples(work, params["calibration"], params["samples"], ctx)
    stats = input_stats(work, wanted, samples, ctx=ctx)
    return {name: s.norm for name, s in stats.items()}, len(samples)


def _apply_structured(work: onnx.ModelProto, nodes: Sequence[str], params: Mapping[str, Any],
                      ctx: PassContext) -> PassResult:
    result = PassResult(model=work)
    sparsity, importance = params["sparsity"], params["importance"]
    norms: dict[str, np.ndarray] = {}
    if importance == "activation":
        norms, count = _activation_norms(work, nodes, params, ctx)
        if count:
            result.notes.append(f"channels ranked by |weight| × input activation norm on "
                                f"{count} calibration sample(s) ({params['calibration']})")
    before = None
    touched: dict[str, list[str]] = {}
    # a projection already rewritten with its MLP in this step: the node that led the rewrite
    done_with: dict[str, str] = {}
    # second layers (terminals) of channels pruned here: pruned again only for their own outputs
    fed_by: dict[str, str] = {}
    joint_notes: list[str] = []
    replaced: list[str] = []  # dropped once at the end: each sweep walks the whole graph
    kept_half = 0  # pruned weights stored in float16 behind a Cast, as their originals
    for k, name in enumerate(nodes):
        ctx.check_cancelled()
        ctx.report(k / max(len(nodes), 1), f"prune: {name}")
        node = next((n for n in work.graph.node if n.name == name), None)
        found = "no such node" if node is None else _own_weight(work, node)
        if isinstance(found, str):
            result.skipped[name] = found
            continue
        assert node is not None
        if name in done_with:
            _record_part_of(result, name, done_with[name])
            continue
        cons = graph_utils.consumers(work.graph)  # the graph changed with the previous node
        plan = _plan_structured(work, node, found, cons)
        if isinstance(plan, str) and name in fed_by:
            _record_part_of(result, name, fed_by[name])
            continue
        if isinstance(plan, str):
            plan = _plan_any(work, node, found, cons)
        if isinstance(plan, str):
            head_plan = heads.plan_heads(work, node, cons, graph_utils.producers(work.graph))
            if isinstance(head_plan, str):
                result.skipped[name] = _telling(plan, head_plan)
                continue
            if before is None:
                dims = w.unit_dims(work)
                before = analyze(work, dims)
            why = _prune_heads(work, name, head_plan, params, norms, result, replaced)
            if why:
                result.skipped[name] = why
                continue
            touched[name] = list(result.details[name]["touched"])
            joint_notes.append(result.details[name]["note"])
            for member in head_plan.members:
                if member != name:
                    done_with[member] = name
            continue
        scores = _channel_scores(work, plan, importance, norms)
        if isinstance(scores, str):
            result.skipped[name] = scores
            continue
        if before is None:
            dims = w.unit_dims(work)
            before = analyze(work, dims)
        removed = min(_n_removed(sparsity, plan.channels), plan.channels - 1)
        drop = np.argsort(scores, kind="stable")[:removed]
        keep = np.setdiff1d(np.arange(plan.channels), drop)  # ascending: channel order kept
        taken = w.all_names(work.graph)
        params_before = params_after = 0
        old: list[str] = []
        prods = graph_utils.producers(work.graph)
        inits = {i.name: i for i in work.graph.initializer}
        for target, j, axis, block in plan.edits:
            rows = (keep[:, None] * block + np.arange(block)).reshape(-1)
            size_before, size_after, half = _take(work, target, j, axis, rows, taken, prods,
                                                  inits, old)
            kept_half += half
            params_before += size_before
            params_after += size_after
        for target, j, position, block in plan.shape_edits:
            value, _ = w.constant_array(work, target.input[j])
            assert value is not None
            shape = np.array(value, dtype=np.int64).reshape(-1)
            shape[position] = keep.size * block
            new_name = w.unique_name(taken, f"{target.input[j]}_pruned")
            w.add_initializer(work, shape, new_name)
            old.append(target.input[j])
            target.input[j] = new_name
        w.drop_value_info(work.graph, plan.tensors)
        replaced.extend(old)
        for terminal, _, block in plan.terminals:
            fed_by[terminal.name] = name
            if terminal.name in norms:  # its input lost the pruned features
                rows = (keep[:, None] * block + np.arange(block)).reshape(-1)
                norms[terminal.name] = norms[terminal.name][rows]
        result.applied.append(name)
        touched[name] = list(plan.touched)
        result.details[name] = {
            "channels_before": plan.channels, "channels_after": int(keep.size),
            "removed_channels": [int(c) for c in np.sort(drop)],
            "params_before": params_before, "params_after": params_after,
            "touched": list(plan.touched), "importance": importance,
        }
        if _is_mlp(plan):
            members = _members(plan)
            label, short = _mlp_label(members)
            note = (f"pruned {removed / plan.channels:.0%} of the {plan.channels} intermediate "
                    f"channels of {label} jointly: {', '.join(short)}")
            result.details[name]["joint"] = members
            result.details[name]["note"] = note
            joint_notes.append(note)
            for member in members:
                if member != name and any(member == p.name for p, _ in plan.sources):
                    done_with[member] = name
    w.remove_unused(work, replaced)
    result.notes.extend(_summarize(joint_notes))
    if kept_half:
        result.notes.append(f"{kept_half} pruned weight(s) kept in float16 behind a Cast, as "
                            "the originals were")
    if before is not None:
        # Shape inference of a large model takes seconds: analyse once before and once after
        # the step. A node touched by two prunings counts in both of their figures.
        after = analyze(work, dims)
        for name, names in touched.items():
            result.details[name]["flops_before"] = _sum_flops(before, names)
            result.details[name]["flops_after"] = _sum_flops(after, names)
            if dims:
                result.details[name]["flops_dims"] = dims  # named dims set to 1
    return result


def _take(work: onnx.ModelProto, target: onnx.NodeProto, j: int, axis: int, index: np.ndarray,
          taken: set[str], prods: Mapping[str, onnx.NodeProto],
          inits: Mapping[str, onnx.TensorProto], old: list[str]) -> tuple[int, int, bool]:
    """``target``'s input ``j`` replaced by the entries ``index`` of it along ``axis`` (the old
    tensor's name added to ``old``): its sizes before and after, and whether it stayed float16
    behind a Cast."""
    tensor = target.input[j]
    value, _ = w.constant_array(work, tensor)
    assert value is not None
    sliced = np.take(value, index, axis=axis)
    new_name = w.unique_name(taken, f"{tensor}_pruned")
    half = _half_precision(prods.get(tensor), inits)
    if half is None:
        w.add_initializer(work, sliced, new_name)
    else:  # stored as it was: fp16 + Cast, half the bytes of a float32 copy
        stored = w.unique_name(taken, f"{half.name}_pruned")
        w.add_initializer(work, np.take(numpy_helper.to_array(half), index, axis=axis), stored)
        cast = helper.make_node("Cast", [stored], [new_name], to=TensorProto.FLOAT,
                                name=w.unique_name(taken, f"{new_name}_Cast"))
        provenance.set_origin(cast, provenance.get_origin(target))
        work.graph.node.insert(0, cast)  # reads only an initializer: first is in order
    target.input[j] = new_name
    old.append(tensor)
    return int(value.size), int(sliced.size), half is not None


def _or_heads(model: onnx.ModelProto, node: onnx.NodeProto, why: str) -> str | None:
    """None when ``node``'s attention heads can go though its channels cannot (``why``);
    else the reason that says most."""
    found = heads.plan_heads(model, node, graph_utils.consumers(model.graph),
                             graph_utils.producers(model.graph))
    return None if not isinstance(found, str) else _telling(why, found)


def _telling(why: str, head_why: str) -> str:
    """The attention's own reason when the node belongs to one, else the channels' one."""
    return why if head_why.startswith("it neither") else head_why


def _prune_heads(work: onnx.ModelProto, name: str, plan: heads.Heads,
                 params: Mapping[str, Any], norms: Mapping[str, np.ndarray], result: PassResult,
                 replaced: list[str]) -> str | None:
    """Query heads removed behind ``plan.attention`` (``_heads``), recorded as the work of
    the selected node ``name``; the reason if none can go."""
    per_group = heads.removed_per_group(plan, params["sparsity"])
    if isinstance(per_group, str):
        return per_group
    scores = heads.head_scores(work, plan, params["importance"], norms)
    if isinstance(scores, str):
        return scores
    keep = heads.heads_kept(plan, scores, per_group)
    taken = w.all_names(work.graph)
    prods = graph_utils.producers(work.graph)
    inits = {i.name: i for i in work.graph.initializer}
    before = after = 0
    cols = heads.q_columns(plan, keep)
    edits = [(plan.q_proj, 1, 1, cols), (plan.o_proj, 1, 0, heads.o_rows(plan, keep))]
    if plan.q_bias is not None:
        add, slot = plan.q_bias
        bias, _ = w.constant_array(work, add.input[slot])
        assert bias is not None
        edits.append((add, slot, bias.ndim - 1, cols))
    for target, j, axis, index in edits:
        b, a, _ = _take(work, target, j, axis, index, taken, prods, inits, replaced)
        before, after = before + b, after + a
    heads.set_heads(work, plan, plan.group - per_group, taken, replaced)
    w.drop_value_info(work.graph, plan.reshaped)
    removed = sorted(set(range(plan.heads)) - {int(k) for k in keep})
    note = (f"pruned {per_group} of the {plan.group} query heads per KV group of "
            f"{plan.label} ({plan.heads} → {keep.size} heads): "
            f"{plan.q_proj.name} and {plan.o_proj.name} jointly, the KV cache unchanged")
    result.applied.append(name)
    result.details[name] = {
        "heads_before": plan.heads, "heads_after": int(keep.size),
        "removed_heads": removed, "params_before": before, "params_after": after,
        "touched": plan.touched, "importance": params["importance"],
        "joint": plan.members, "note": note,
    }
    return None


def _half_precision(producer: onnx.NodeProto | None,
                    inits: Mapping[str, onnx.TensorProto]) -> onnx.TensorProto | None:
    """The float16 initializer a weight is cast to float32 from, as HF-style exports store
    them; None for any other weight."""
    if producer is None or producer.op_type != "Cast" or producer.domain not in ("", "ai.onnx"):
        return None
    to = next((a.i for a in producer.attribute if a.name == "to"), None)
    source = inits.get(producer.input[0])
    if to != TensorProto.FLOAT or source is None or source.data_type != TensorProto.FLOAT16:
        return None
    return source


def _record_part_of(result: PassResult, name: str, leader: str) -> None:
    """A selected projection rewritten with its MLP when ``leader`` was."""
    result.applied.append(name)
    result.details[name] = {"joint_with": leader,
                            "note": result.details[leader].get("note", "")}


_NOTED = 3  # joint rewrites listed one by one in the notes; more are summed up


def _summarize(notes: list[str]) -> list[str]:
    if len(notes) <= _NOTED:
        return notes
    what = "attentions" if all("query heads" in n for n in notes) else "MLPs"
    return [*notes[:_NOTED - 1], f"… and {len(notes) - _NOTED + 1} more {what} the same way "
                                 "(see each node's details)"]


def _sum_flops(info: Any, names: Sequence[str]) -> int | None:
    total = 0
    for name in names:
        if not info.has_node(name):
            return None
        flops = info.node(name).flops
        if flops is None:
            return None
        total += flops
    return total
