"""Whole attention heads removed, for structured pruning of an attention projection.

Where the graph allows it: onnxruntime's ``GroupQueryAttention`` (onnxruntime-genai and Olive
exports), fed by a packed q|k|v projection or by a separate q projection, and read by one
output projection; or an HF/optimum export's MatMul/Softmax attention whose KV heads are
repeated per query head by transformers' ``repeat_kv`` (Unsqueeze → Expand → Reshape, the
repeat factor a constant of their shapes), the queries reaching the scores through per-head
ops only (rotary halves, scaling). Query head h attends with KV head ``h // (num_heads / kv_num_heads)``, so
the same number of query heads leaves every KV group: the q columns of those heads (and their
bias), the o_proj rows they fed, and ``num_heads`` shrink together, while the KV heads and so
the cache the runtime allocates (``past_key_values.N.*``/``present.N.*``) keep their shape.
In an HF export the repeat factor (and a constant head count in the queries' or the merge's
Reshape) is rewritten instead of ``num_heads``. Removing whole KV groups would change that
cache, so it is not done.

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
class Heads:
    """What removing query heads between a q (or q|k|v) and an output projection touches."""

    q_proj: onnx.NodeProto
    o_proj: onnx.NodeProto
    heads: int
    kv_heads: int
    head_dim: int
    q_bias: tuple[onnx.NodeProto, int] | None = None  # an Add and its constant's input slot
    packed: bool = False  # q_proj writes q|k|v: its first heads·head_dim columns are queries

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def members(self) -> list[str]:
        return [self.q_proj.name, self.o_proj.name]

    @property
    def between(self) -> list[onnx.NodeProto]:
        """What runs per head between the two projections."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        return f"the attention after '{self.q_proj.name}'"

    @property
    def touched(self) -> list[str]:
        """The nodes whose cost changes."""
        return [self.q_proj.name, *(n.name for n in self.between), self.o_proj.name]

    @property
    def reshaped(self) -> list[str]:
        """Tensors whose declared shape no longer holds once heads go."""
        return [self.q_proj.output[0], *(o for n in self.between for o in n.output)] + (
            [self.q_bias[0].output[0]] if self.q_bias else [])


@dataclass(kw_only=True)
class HeadPlan(Heads):
    """Query heads behind one GroupQueryAttention node (its ``num_heads`` counts them)."""

    attention: onnx.NodeProto

    @property
    def between(self) -> list[onnx.NodeProto]:
        return [self.attention]

    @property
    def label(self) -> str:
        return f"'{self.attention.name}'"


def plan_heads(model: onnx.ModelProto, node: onnx.NodeProto,
               cons: Mapping[str, list[onnx.NodeProto]],
               prods: Mapping[str, onnx.NodeProto]) -> HeadPlan | RepeatPlan | str:
    """The heads plan of the attention ``node`` feeds (as its q or q|k|v projection) or reads
    (as its output projection), or why there is none."""
    found = _plan_gqa(model, node, cons, prods)
    if isinstance(found, str) and found.startswith("it neither"):
        return plan_repeat_heads(model, node, cons, prods)
    return found


def _plan_gqa(model: onnx.ModelProto, node: onnx.NodeProto,
              cons: Mapping[str, list[onnx.NodeProto]],
              prods: Mapping[str, onnx.NodeProto]) -> HeadPlan | str:
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
    return HeadPlan(q_proj, o_proj, heads, kv_heads, head_dim, q_bias, packed,
                    attention=attention)


def removed_per_group(plan: Heads, sparsity: float) -> int | str:
    """Query heads to remove from each KV group: ``sparsity`` of a group, at least one kept."""
    count = min(math.floor(sparsity * plan.group + 0.5), plan.group - 1)
    if count < 1:
        return (f"sparsity {sparsity:g} of the {plan.group} query heads per KV group of "
                f"'{plan.q_proj.name}' removes none")
    return count


def head_scores(model: onnx.ModelProto, plan: Heads, importance: str,
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


def heads_kept(plan: Heads, scores: np.ndarray, per_group: int) -> np.ndarray:
    """The query heads kept, ascending: the ``per_group`` lowest-scoring of every KV group go."""
    keep: list[int] = []
    for g in range(plan.kv_heads):
        members = np.arange(g * plan.group, (g + 1) * plan.group)
        order = np.argsort(scores[members], kind="stable")
        keep.extend(int(m) for m in np.sort(members[order[per_group:]]))
    return np.array(keep, dtype=np.int64)


def q_columns(plan: Heads, keep: np.ndarray) -> np.ndarray:
    """The q projection's columns (and bias entries) that stay: the kept heads' queries, then
    every key and value column of a packed projection."""
    d = plan.head_dim
    cols = (keep[:, None] * d + np.arange(d)).reshape(-1)
    if plan.packed:
        tail = np.arange(plan.heads * d, (plan.heads + 2 * plan.kv_heads) * d)
        cols = np.concatenate([cols, tail])
    return cols


def o_rows(plan: Heads, keep: np.ndarray) -> np.ndarray:
    d = plan.head_dim
    return (keep[:, None] * d + np.arange(d)).reshape(-1)


def set_heads(model: onnx.ModelProto, plan: Heads, kept_per_group: int,
              taken: set[str], old: list[str]) -> None:
    """The head count wherever the graph states it: GroupQueryAttention's ``num_heads``, or
    the constants of an HF attention's shapes (each scales with the heads kept per group; the
    replaced constants are added to ``old``)."""
    if not isinstance(plan, RepeatPlan):
        assert isinstance(plan, HeadPlan)
        for attr in plan.attention.attribute:
            if attr.name == "num_heads":
                attr.i = plan.kv_heads * kept_per_group
        return
    done: set[tuple[str, int]] = set()
    for node, slot, _ in plan.shape_edits:
        if (node.name, slot) in done:
            continue
        sites = [e for n, k, e in plan.shape_edits if n is node and k == slot]
        done.add((node.name, slot))
        value, _ = w.constant_array(model, node.input[slot])
        assert value is not None
        arr = np.array(value, copy=True)
        flat = arr.reshape(-1)
        for e in set(sites):
            flat[e or 0] = flat[e or 0] // plan.group * kept_per_group
        fresh = w.unique_name(taken, f"{node.input[slot]}_heads")
        w.add_initializer(model, flat.reshape(arr.shape), fresh)
        old.append(node.input[slot])
        node.input[slot] = fresh


# --- HF / optimum exports: MatMul/Softmax attention with the KV heads repeated -------------

# where a constant sits: node, input slot, entry of that input (None: a scalar)
Site = tuple[onnx.NodeProto, int, "int | None"]

# ops the queries pass through per head between their Reshape/Transpose and the scores
# MatMul (rotary embedding: halves sliced, negated, concatenated along the head dim)
_PER_HEAD = {"Mul", "Add", "Sub", "Div", "Neg", "Cast", "Slice", "Concat"}
# ops between the scores and the probabilities' MatMul with the values
_SCORES = {"Mul", "Add", "Sub", "Div", "Cast", "Softmax", "Where", "Max", "Min", "Tanh"}


@dataclass(kw_only=True)
class RepeatPlan(Heads):
    """Query heads of an HF-style attention: ``repeat_kv`` expands each KV head ``group``
    times (an ``Expand`` and a ``Reshape`` whose shapes hold that factor)."""

    # constants that count query heads (the repeat factor, heads, heads·dim): node, input
    # slot and entry (None: a scalar); each scales with the heads kept per group
    shape_edits: list[Site]
    inner: list[onnx.NodeProto]

    @property
    def between(self) -> list[onnx.NodeProto]:
        return self.inner


def plan_repeat_heads(model: onnx.ModelProto, node: onnx.NodeProto,
                      cons: Mapping[str, list[onnx.NodeProto]],
                      prods: Mapping[str, onnx.NodeProto]) -> RepeatPlan | str:
    """The heads plan of the HF-style attention whose q projection ``node`` is (or whose
    output projection), or why there is none."""
    q_proj = node
    if node.input and node.input[0] in prods and prods[node.input[0]].op_type == "Reshape":
        found = _q_proj_of_output(node, cons, prods)
        if found is None:
            return "it neither writes an attention's queries nor reads its heads"
        q_proj = found
    return _repeat_plan(model, q_proj, cons, prods)


def _q_proj_of_output(o_proj: onnx.NodeProto, cons: Mapping[str, list[onnx.NodeProto]],
                      prods: Mapping[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    """Back from an output projection: Reshape ← Transpose ← MatMul(probs, values) ← … ←
    MatMul(queries, keys) ← … ← the q projection."""
    t = prods.get(o_proj.input[0])
    t = prods.get(t.input[0]) if t is not None and t.op_type == "Reshape" else None
    pv = prods.get(t.input[0]) if t is not None and t.op_type == "Transpose" else None
    if pv is None or pv.op_type != "MatMul":
        return None
    seen: set[str] = set()
    todo = [pv.input[0]]
    while todo:
        tensor = todo.pop()
        p = prods.get(tensor)
        if p is None or p.name in seen or len(seen) > 64:
            continue
        seen.add(p.name)
        if p.op_type == "MatMul" and p is not pv:
            return _q_proj_of_queries(p.input[0], prods)
        if p.op_type in _SCORES | _PER_HEAD:
            todo.extend(p.input)
    return None


def _q_proj_of_queries(tensor: str, prods: Mapping[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    seen: set[str] = set()
    todo = [tensor]
    while todo:
        p = prods.get(todo.pop())
        if p is None or p.name in seen or len(seen) > 64:
            continue
        seen.add(p.name)
        if p.op_type == "Reshape":
            source = prods.get(p.input[0])
            if source is not None and source.op_type == "Add":
                source = next((prods[i] for i in source.input if i in prods
                               and prods[i].op_type == "MatMul"), None)
            return source if source is not None and source.op_type == "MatMul" else None
        if p.op_type in _PER_HEAD | {"Transpose"}:
            todo.append(p.input[0])
    return None


def _only_reader(tensor: str, cons: Mapping[str, list[onnx.NodeProto]]) -> onnx.NodeProto | None:
    readers = cons.get(tensor, [])
    return readers[0] if len(readers) == 1 else None


def _repeat_plan(model: onnx.ModelProto, q_proj: onnx.NodeProto,
                 cons: Mapping[str, list[onnx.NodeProto]],
                 prods: Mapping[str, onnx.NodeProto]) -> RepeatPlan | str:
    no = "it neither writes an attention's queries nor reads its heads"
    if q_proj.op_type != "MatMul":
        return no
    reshape = _only_reader(q_proj.output[0], cons)
    q_bias: tuple[onnx.NodeProto, int] | None = None
    if reshape is not None and reshape.op_type == "Add":
        slot = 1 if reshape.input[0] == q_proj.output[0] else 0
        if w.constant_array(model, reshape.input[slot])[0] is None:
            return no
        q_bias, reshape = (reshape, slot), _only_reader(reshape.output[0], cons)
    if reshape is None or reshape.op_type != "Reshape":
        return no
    entries = _shape_entries(model, reshape, 1, prods)
    if entries is None or len(entries) != 4 or entries[3] is None or entries[3][0] <= 0:
        return no
    head_dim = entries[3][0]
    weight, why = w.constant_array(model, q_proj.input[1])
    if weight is None or weight.ndim != 2 or weight.shape[1] % head_dim:
        return f"'{q_proj.name}': {why or 'its weight does not split into heads'}"
    heads = weight.shape[1] // head_dim
    edits: list[Site] = []
    if entries[2] is None or entries[2][0] not in (-1, heads):
        return f"the queries' Reshape in '{reshape.name}' does not give the heads as a constant"
    if entries[2][0] == heads:
        edits.append(entries[2][1])
    transpose = _only_reader(reshape.output[0], cons)
    if transpose is None or transpose.op_type != "Transpose" or _perm(transpose) != [0, 2, 1, 3]:
        return f"the queries of '{q_proj.name}' are not split into [batch, heads, seq, dim]"
    inner: list[onnx.NodeProto] = [reshape, transpose]
    scores = _follow_heads(model, transpose.output[0], cons, _PER_HEAD, 0, inner)
    if isinstance(scores, str):
        return scores
    pv = _follow_heads(model, scores.output[0], cons, _SCORES, 0, inner)
    if isinstance(pv, str):
        return pv
    inner += [scores, pv]
    group: int | None = None
    for mm in (scores, pv):
        found = _repeat_edits(model, mm.input[1], prods, inner)
        if isinstance(found, str):
            return found
        factor, more = found
        if group is not None and factor != group:
            return f"the keys and values of '{q_proj.name}' are repeated {group} and {factor} times"
        group = factor
        edits.extend(more)
    assert group is not None
    if group < 2 or heads % group:
        return (f"the attention of '{q_proj.name}' has one query head per KV head: a head "
                "could only go with its KV head, which would change the KV cache")
    back = _only_reader(pv.output[0], cons)
    if back is None or back.op_type != "Transpose" or _perm(back) != [0, 2, 1, 3]:
        return f"the heads after '{pv.name}' are not merged back by a Transpose and Reshape"
    merge = _only_reader(back.output[0], cons)
    if merge is None or merge.op_type != "Reshape":
        return f"the heads after '{pv.name}' are not merged back by a Reshape"
    out = _shape_entries(model, merge, 1, prods)
    if out is None or out[-1] is None or out[-1][0] not in (-1, heads * head_dim):
        return f"the heads' merge in '{merge.name}' is not [.., -1 | heads·dim]"
    if out[-1][0] == heads * head_dim:
        edits.append(out[-1][1])
    o_proj = _only_reader(merge.output[0], cons)
    if o_proj is None or o_proj.op_type != "MatMul" or o_proj.input[0] != merge.output[0]:
        return f"the merged heads of '{q_proj.name}' are not read by one output MatMul"
    o_weight, why = w.constant_array(model, o_proj.input[1])
    if o_weight is None or o_weight.ndim != 2 or o_weight.shape[0] != heads * head_dim:
        return f"'{o_proj.name}': {why or 'its weight does not take the heads'}"
    for proj in (q_proj, o_proj):
        if any(u.name != proj.name for u in cons.get(proj.input[1], [])):
            return f"the weight of '{proj.name}' is shared with another node"
    inner += [back, merge]
    return RepeatPlan(q_proj, o_proj, heads, heads // group, head_dim, q_bias,
                      shape_edits=edits, inner=inner)


def _perm(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _follow_heads(model: onnx.ModelProto, start: str, cons: Mapping[str, list[onnx.NodeProto]],
                  allowed: set[str], slot: int, visited: list[onnx.NodeProto]
                  ) -> onnx.NodeProto | str:
    """The one MatMul that the [batch, heads, seq, dim] tensor ``start`` reaches as input
    ``slot`` through per-head ``allowed`` ops (their shape reads may not look at the heads);
    the ops passed are added to ``visited``."""
    found: list[onnx.NodeProto] = []
    seen: set[str] = set()
    todo = [start]
    while todo:
        tensor = todo.pop()
        for user in cons.get(tensor, []):
            if user.name in seen:
                continue
            seen.add(user.name)
            if user.op_type == "MatMul":
                if user.input[slot] != tensor:
                    return f"'{user.name}' takes the heads as its other operand"
                found.append(user)
                continue
            if user.op_type == "Shape":
                readers = cons.get(user.output[0], [])
                for r in readers:
                    index = w.constant_array(model, r.input[1])[0] if r.op_type == "Gather" \
                        else None
                    if index is None or int(np.asarray(index).reshape(-1)[0]) in (1, -3):
                        return f"'{r.name}' reads the number of heads"
                continue
            if user.op_type not in allowed or not _per_head(model, user, tensor):
                return f"the heads reach {user.op_type} '{user.name}', which head pruning " \
                       "cannot follow"
            visited.append(user)
            todo.extend(o for o in user.output if o)
    if len(found) != 1:
        return f"the heads reach {len(found)} MatMuls, not one"
    return found[0]


def _per_head(model: onnx.ModelProto, node: onnx.NodeProto, tensor: str) -> bool:
    """``node`` treats the heads of ``tensor`` apart (no op along axis 1)."""
    if node.op_type == "Slice":
        if node.input[0] != tensor:
            return True  # a shape-derived bound
        axes = w.constant_array(model, node.input[3])[0] if len(node.input) > 3 \
            and node.input[3] else None
        return axes is not None and not ({int(a) for a in np.asarray(axes).reshape(-1)}
                                         & {1, -3})
    if node.op_type == "Concat":
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        return axis not in (1, -3)
    if node.op_type == "Softmax":
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        return axis in (-1, 3)
    return True


def _shape_entries(model: onnx.ModelProto, reader: onnx.NodeProto, slot: int,
                   prods: Mapping[str, onnx.NodeProto]) -> list[tuple[int, Site] | None] | None:
    """The entries of the shape ``reader`` takes as input ``slot``: per entry its constant
    value and where it is written (node, input slot, entry of that input), None for computed
    ones; None if unreadable."""
    tensor = reader.input[slot]
    value = w.constant_array(model, tensor)[0]
    if value is not None:
        return [(int(v), (reader, slot, j)) for j, v in enumerate(np.asarray(value).reshape(-1))]
    concat = prods.get(tensor)
    if concat is None or concat.op_type != "Concat":
        return None
    out: list[tuple[int, Site] | None] = []
    for k, name in enumerate(concat.input):
        part = w.constant_array(model, name)[0]
        if part is None:
            out.append(None)
            continue
        flat = np.asarray(part).reshape(-1)
        for j, v in enumerate(flat):
            out.append((int(v), (concat, k, j if flat.size > 1 or part.ndim else None)))
    return out


def _repeat_edits(model: onnx.ModelProto, tensor: str, prods: Mapping[str, onnx.NodeProto],
                  visited: list[onnx.NodeProto]) -> tuple[int, list[Site]] | str:
    """Back from the keys (or values) a scores MatMul reads: Transpose* ← Reshape ← Expand ←
    Unsqueeze(axis 2) is transformers' ``repeat_kv``. The repeat factor and the constants
    holding it (the Expand's [b, kv, group, s, d] entry and the Reshape's kv·group)."""
    p = prods.get(tensor)
    while p is not None and p.op_type == "Transpose":
        visited.append(p)
        p = prods.get(p.input[0])
    if p is None or p.op_type != "Reshape":
        return "the keys are not repeated per query head (transformers' repeat_kv)"
    expand = prods.get(p.input[0])
    if expand is None or expand.op_type != "Expand":
        return "the keys are not repeated per query head (transformers' repeat_kv)"
    found = _factor_in(model, expand.input[1], prods, concat_entry=2)
    if isinstance(found, str):
        return found
    factor, edit = found
    visited += [p, expand]
    merged = _factor_in(model, p.input[1], prods, concat_entry=None, factor=factor)
    if isinstance(merged, str):
        return merged
    return factor, [edit, merged[1]]


def _factor_in(model: onnx.ModelProto, tensor: str, prods: Mapping[str, onnx.NodeProto], *,
               concat_entry: int | None, factor: int | None = None
               ) -> tuple[int, Site] | str:
    """The constant ``factor`` upstream of a shape tensor: entry ``concat_entry`` of a Concat
    of shape pieces (the Expand's), or the constant a ``Mul`` multiplies the KV heads by (the
    Reshape's), searched a few nodes up."""
    seen: set[str] = set()
    todo: list[str] = [tensor]
    hits: list[tuple[int, Site]] = []
    while todo and len(seen) < 48:
        p = prods.get(todo.pop(0))  # nearest first
        if p is None or p.name in seen:
            continue
        seen.add(p.name)
        if p.op_type == "Shape":
            continue  # shape arithmetic starts here: what it measures holds no constant
        if concat_entry is not None and p.op_type == "Concat" and len(p.input) == 5:
            part = w.constant_array(model, p.input[concat_entry])[0]
            if part is not None and np.asarray(part).size == 1:
                hits.append((int(np.asarray(part).reshape(-1)[0]),
                             (p, concat_entry, None if np.asarray(part).ndim == 0 else 0)))
                continue
        if concat_entry is None and p.op_type == "Mul":
            for k in (0, 1):
                part = w.constant_array(model, p.input[k])[0]
                if part is not None and np.asarray(part).size == 1 \
                        and int(np.asarray(part).reshape(-1)[0]) == factor:
                    hits.append((int(factor), (p, k, None if np.asarray(part).ndim == 0
                                               else 0)))
            if hits:
                continue
        todo.extend(i for i in p.input if i and w.constant_array(model, i)[0] is None)
    if len(hits) != 1:
        return "the repeat factor of the keys is not one constant in their Expand/Reshape shapes"
    return hits[0]
