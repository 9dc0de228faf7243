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

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.errors import OpstudioError
from opstudio.core.model import graph_utils, provenance
from opstudio.core.model.graph import analyze
from opstudio.core.model.model_io import model_size
from opstudio.core.passes import _heads as heads
from opstudio.core.passes import _weights as w
from opstudio.core.passes._calibration import calibration_params, check_calibration
from opstudio.core.passes._channels import (
    MATMULS,
    Channels,
    is_mlp,
    joint_remark,
    members,
    mlp_label,
    own_weight,
    plan_channels,
    plan_removal,
    removed_channels,
)
from opstudio.core.passes._importance import activation_norms, channel_scores
from opstudio.core.passes._sparse import CPU_NOTE, apply_unstructured
from opstudio.core.passes.base import ParamSpec, Pass, PassContext, PassResult

IMPORTANCE = ("magnitude", "activation")


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

    def reads_lazy(self, params: Mapping[str, Any]) -> bool:
        # unstructured and dense: one weight at a time from its memory map into a scratch
        # file; structured pruning plans across nodes and may measure activations
        return not params["structured"] and params["storage"] == "dense"

    def check(self, model: onnx.ModelProto, node: onnx.NodeProto,
              params: Mapping[str, Any] | None = None) -> str | None:
        given = self.given_params(params)
        if given["structured"]:
            plan = plan_removal(model, node)
            return plan if isinstance(plan, str) else None
        found = own_weight(model, node)
        if isinstance(found, str):
            return found
        if given["storage"] == "sparse" and w.opset(model) < 11:
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
        plans: list[Channels] = []
        matmuls = [n for n in nodes if n.op_type in MATMULS]
        chosen = matmuls[:_REMARKED]
        cons = graph_utils.consumers(model.graph) if chosen else {}
        prods = graph_utils.producers(model.graph) if chosen else {}
        for node in chosen:
            if node.name in seen:
                continue
            plan = plan_removal(model, node, cons, prods)
            if isinstance(plan, heads.Heads) and not plans:
                return (f"structured: removes query heads of {plan.label} ({plan.heads} heads, "
                        f"{plan.group} per KV group) from {' and '.join(plan.members)} "
                        "jointly; the KV cache keeps its shape")
            if not isinstance(plan, Channels) or not is_mlp(plan):
                continue
            seen.update(members(plan))
            plans.append(plan)
        if not plans:
            return None
        # the reason once; a selection across 30 layers would repeat it 30 times
        text = "structured: " + joint_remark(plans[0])
        others = [mlp_label(members(plan))[0] for plan in plans[1:]]
        if others:
            text += "; likewise " + ", ".join(others)
        if len(matmuls) > len(chosen):
            text += " and the MLPs of the other selected projections"
        return text

    def _rewrite(self, work: onnx.ModelProto, chosen: Sequence[str], params: Mapping[str, Any],
                 ctx: PassContext) -> PassResult:
        size_before = model_size(work)
        if params["structured"]:
            result = _apply_structured(work, chosen, params, ctx)
        else:
            result = apply_unstructured(work, chosen, params["sparsity"], params["storage"], ctx)
        if result.applied:
            size_after = model_size(work)
            result.notes.append(
                f"model size {size_before:,} → {size_after:,} bytes "
                f"({(size_after - size_before) / max(size_before, 1):+.1%}, "
                f"{params['storage']} storage)")
            if not params["structured"]:
                result.notes.append(CPU_NOTE)
        return result


PASS = PrunePass()
_REMARKED = 4  # selected projections described in the remark (each is planned: keep it cheap)


def _apply_structured(work: onnx.ModelProto, nodes: Sequence[str], params: Mapping[str, Any],
                      ctx: PassContext) -> PassResult:
    result = PassResult(model=work)
    sparsity, importance = params["sparsity"], params["importance"]
    norms: dict[str, np.ndarray] = {}
    if importance == "activation":
        norms, count = activation_norms(work, nodes, params, ctx)
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
        found = "no such node" if node is None else own_weight(work, node)
        if isinstance(found, str):
            result.skipped[name] = found
            continue
        assert node is not None
        if name in done_with:
            _record_part_of(result, name, done_with[name])
            continue
        cons = graph_utils.consumers(work.graph)  # the graph changed with the previous node
        own = plan_channels(work, node, found, cons)
        if isinstance(own, str) and name in fed_by:
            _record_part_of(result, name, fed_by[name])
            continue
        plan = own if not isinstance(own, str) else plan_removal(work, node, cons, weight=found)
        if isinstance(plan, str):
            result.skipped[name] = plan
            continue
        if isinstance(plan, heads.Heads):
            if before is None:
                dims = w.unit_dims(work)
                before = analyze(work, dims)
            why = _prune_heads(work, name, plan, params, norms, result, replaced)
            if why:
                result.skipped[name] = why
                continue
            touched[name] = list(result.details[name]["touched"])
            joint_notes.append(result.details[name]["note"])
            for member in plan.members:
                if member != name:
                    done_with[member] = name
            continue
        scores = channel_scores(work, plan, importance, norms)
        if isinstance(scores, str):
            result.skipped[name] = scores
            continue
        if before is None:
            dims = w.unit_dims(work)
            before = analyze(work, dims)
        removed = removed_channels(plan, sparsity)
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
        if is_mlp(plan):
            joint = members(plan)
            label, short = mlp_label(joint)
            note = (f"pruned {removed / plan.channels:.0%} of the {plan.channels} intermediate "
                    f"channels of {label} jointly: {', '.join(short)}")
            result.details[name]["joint"] = joint
            result.details[name]["note"] = note
            joint_notes.append(note)
            for member in joint:
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
