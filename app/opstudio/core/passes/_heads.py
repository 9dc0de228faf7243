"""Whole attention heads removed, for structured pruning of an attention projection.

Where the graph allows it: onnxruntime's ``GroupQueryAttention`` (onnxruntime-genai and Olive
exports), fed by a packed q|k|v projection or by a separate q projection, and read by one
output projection. Query head h attends with KV head ``h // (num_heads / kv_num_heads)``, so
the same number of query heads leaves every KV group: the q columns of those heads (and their
bias), the o_proj rows they fed, and ``num_heads`` shrink together, while the KV heads and so
the cache the runtime allocates (``past_key_values.N.*``/``present.N.*``) keep their shape.
Removing whole KV groups would change that cache, so it is not done.

Heads are ranked per group by ``importance``: ``"magnitude"``, the norm of the head's q
columns and o_proj rows; ``"activation"`` (Wanda-style), |W| times the norms of the inputs of
the two projections, as for MLP channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from opstudio.core.passes import _weights as w

_GQA = ("GroupQueryAttention", "com.microsoft")
# GroupQueryAttention inputs that hold one value per query head: a model feeding them is left
_PER_HEAD_INPUTS = {10: "attention_bias", 11: "head_sink"}


@dataclass
class HeadPlan:
    """What removing query heads behind one attention node touches."""

    attention: onnx.NodeProto
    q_proj: onnx.NodeProto
    o_proj: onnx.NodeProto
    heads: int
    kv_heads: int
    head_dim: int
    packed: bool  # q_proj writes q|k|v: its first heads·head_dim columns are the queries
    q_bias: tuple[onnx.NodeProto, int] | None = None  # an Add and its constant's input slot

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def members(self) -> list[str]:
        return [self.q_proj.name, self.o_proj.name]


def plan_heads(model: onnx.ModelProto, node: onnx.NodeProto,
               cons: Mapping[str, list[onnx.NodeProto]],
               prods: Mapping[str, onnx.NodeProto]) -> HeadPlan | str:
    """The heads plan of the attention ``node`` feeds (as its q or q|k|v projection) or reads
    (as its output projection), or why there is none."""
    attention: onnx.NodeProto | None = None
    if node.output and len(cons.get(node.output[0], [])) == 1:
        user = cons[node.output[0]][0]
        if user.op_type == "Add" and len(cons.get(user.output[0], [])) == 1:
            user = cons[user.output[0]][0]
        if (user.op_type, user.domain) == _GQA and _reaches(user.input[0], node, prods):
            attention = user
    if attention is None and node.input:
        source = prods.get(node.input[0])
        if source is not None and (source.op_type, source.domain) == _GQA \
                and source.output[0] == node.input[0]:
            attention = source
    if attention is None:
        kv = next((u for u in cons.get(node.output[0], []) if (u.op_type, u.domain) == _GQA),
                  None) if node.output else None
        if kv is not None:
            return (f"it writes the keys or values of GroupQueryAttention '{kv.name}': removing "
                    "KV heads would change the KV cache the runtime feeds; prune its query "
                    "heads through the q or output projection")
        return "it neither feeds the queries of a GroupQueryAttention nor reads its output"
    return _plan_for(model, attention, cons, prods)


def _reaches(tensor: str, node: onnx.NodeProto, prods: Mapping[str, onnx.NodeProto]) -> bool:
    """``tensor`` is ``node``'s output, or an Add's of it."""
    source = prods.get(tensor)
    if source is node:
        return True
    return source is not None and source.op_type == "Add" and any(
        prods.get(i) is node for i in source.input)


def _plan_for(model: onnx.ModelProto, attention: onnx.NodeProto,
              cons: Mapping[str, list[onnx.NodeProto]],
              prods: Mapping[str, onnx.NodeProto]) -> HeadPlan | str:
    attrs = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    heads, kv_heads = int(attrs.get("num_heads", 0)), int(attrs.get("kv_num_heads", 0))
    where = f"GroupQueryAttention '{attention.name}'"
    if heads < 2 or kv_heads < 1 or heads % kv_heads:
        return f"{where} has {heads} query heads for {kv_heads} KV heads"
    if heads == kv_heads:
        return (f"{where} has one query head per KV head: a head could only go with its KV "
                "head, which would change the KV cache the runtime feeds")
    for slot, what in _PER_HEAD_INPUTS.items():
        if len(attention.input) > slot and attention.input[slot]:
            return f"{where} takes a per-head {what}, which head pruning does not rewrite"
    readers = cons.get(attention.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "MatMul" or readers[0].input[0] != \
            attention.output[0]:
        return (f"the output of {where} is read by "
                f"{', '.join(r.op_type for r in readers) or 'nothing'}, not one output MatMul")
    o_proj = readers[0]
    query = attention.input[0]
    q_bias: tuple[onnx.NodeProto, int] | None = None
    q_proj = prods.get(query)
    if q_proj is not None and q_proj.op_type == "Add":
        add = q_proj
        slots = [k for k in (0, 1) if prods.get(add.input[k]) is not None
                 and prods[add.input[k]].op_type == "MatMul"]
        if len(slots) != 1 or w.constant_array(model, add.input[1 - slots[0]])[0] is None:
            return f"the queries of {where} come from an Add that is not a projection's bias"
        q_proj, q_bias = prods[add.input[slots[0]]], (add, 1 - slots[0])
        if len(cons.get(q_proj.output[0], [])) != 1:
            return f"the queries' projection '{q_proj.name}' has other readers"
    if q_proj is None or q_proj.op_type != "MatMul":
        return f"the queries of {where} are not written by a MatMul"
    packed = len(attention.input) < 2 or not attention.input[1]
    weights = {}
    for proj in (q_proj, o_proj):
        value, why = w.constant_array(model, proj.input[1])
        if value is None or value.ndim != 2:
            return f"'{proj.name}': {why or 'its weight is not 2-D'}"
        if any(u.name != proj.name for u in cons.get(proj.input[1], [])):
            return f"the weight of '{proj.name}' is shared with another node"
        weights[proj.name] = value
    rows = weights[o_proj.name].shape[0]
    if rows % heads:
        return f"'{o_proj.name}' reads {rows} features, not a multiple of {heads} heads"
    head_dim = rows // heads
    width = weights[q_proj.name].shape[1]
    expected = (heads + 2 * kv_heads) * head_dim if packed else heads * head_dim
    if width != expected:
        return f"'{q_proj.name}' writes {width} columns; {where} expects {expected}"
    if q_bias is not None:
        bias, _ = w.constant_array(model, q_bias[0].input[q_bias[1]])
        if bias is None or bias.shape[-1:] != (width,) or any(d != 1 for d in bias.shape[:-1]):
            return f"the bias of '{q_proj.name}' is not one value per column"
    return HeadPlan(attention, q_proj, o_proj, heads, kv_heads, head_dim, packed, q_bias)


def removed_per_group(plan: HeadPlan, sparsity: float) -> int | str:
    """Query heads to remove from each KV group: ``sparsity`` of a group, at least one kept."""
    count = min(math.floor(sparsity * plan.group + 0.5), plan.group - 1)
    if count < 1:
        return (f"sparsity {sparsity:g} of the {plan.group} query heads per KV group of "
                f"'{plan.attention.name}' removes none")
    return count


def head_scores(model: onnx.ModelProto, plan: HeadPlan, importance: str,
                norms: Mapping[str, np.ndarray]) -> np.ndarray | str:
    """Per query head: the larger, the more it matters."""
    d, h = plan.head_dim, plan.heads
    q, _ = w.constant_array(model, plan.q_proj.input[1])
    o, _ = w.constant_array(model, plan.o_proj.input[1])
    assert q is not None and o is not None
    q_heads = np.abs(q[:, : h * d].astype(np.float64)).reshape(q.shape[0], h, d)
    o_heads = np.abs(o.astype(np.float64)).reshape(h, d, o.shape[1])
    if importance == "magnitude":
        return np.sqrt(np.square(q_heads).sum(axis=(0, 2)) + np.square(o_heads).sum(axis=(1, 2)))
    x, z = norms.get(plan.q_proj.name), norms.get(plan.o_proj.name)
    if x is None or z is None or x.size != q.shape[0] or z.size != h * d:
        return (f"the inputs of '{plan.q_proj.name}' and '{plan.o_proj.name}' were not "
                "measured on the calibration samples")
    return np.einsum("khd,k->h", q_heads, x) + (z.reshape(h, d) * o_heads.sum(axis=2)).sum(axis=1)


def heads_kept(plan: HeadPlan, scores: np.ndarray, per_group: int) -> np.ndarray:
    """The query heads kept, ascending: the ``per_group`` lowest-scoring of every KV group go."""
    keep: list[int] = []
    for g in range(plan.kv_heads):
        members = np.arange(g * plan.group, (g + 1) * plan.group)
        order = np.argsort(scores[members], kind="stable")
        keep.extend(int(m) for m in np.sort(members[order[per_group:]]))
    return np.array(keep, dtype=np.int64)


def q_columns(plan: HeadPlan, keep: np.ndarray) -> np.ndarray:
    """The q projection's columns (and bias entries) that stay: the kept heads' queries, then
    every key and value column of a packed projection."""
    d = plan.head_dim
    cols = (keep[:, None] * d + np.arange(d)).reshape(-1)
    if plan.packed:
        tail = np.arange(plan.heads * d, (plan.heads + 2 * plan.kv_heads) * d)
        cols = np.concatenate([cols, tail])
    return cols


def o_rows(plan: HeadPlan, keep: np.ndarray) -> np.ndarray:
    d = plan.head_dim
    return (keep[:, None] * d + np.arange(d)).reshape(-1)


def set_heads(plan: HeadPlan, heads: int) -> None:
    for attr in plan.attention.attribute:
        if attr.name == "num_heads":
            attr.i = heads
