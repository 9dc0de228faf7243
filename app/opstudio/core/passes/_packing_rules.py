"""onnxscript rewrite rules that pack sibling projections into one MatMul, for ``fuse``.

A decoder layer reads its normed input through five projections: q, k and v, then gate and up.
Run apart, each is its own kernel over the same input row; packed along N (the weights
concatenated column-wise) they are one kernel that reads the input once, and after
``int4-weight`` one MatMulNBits instead of three (or two). onnxruntime-genai's builder exports
them packed this way.

- q|k|v: a GroupQueryAttention fed by three MatMuls of one input (each maybe behind its bias
  Add, Qwen2) reads one packed MatMul instead, as GroupQueryAttention's ``query`` with ``key``
  and ``value`` left empty (its packed-QKV form); the biases are packed into one Add.
- gate|up: the SiLU gate ``(g · sigmoid(g)) · u`` of two MatMuls of one input is one MatMul and
  a Split. onnxruntime's own graph optimizer already turns ``g · sigmoid(g)`` into its
  ``QuickGelu`` kernel, on the Split's output as on a MatMul's, so the gate is left to it.

The packed weight keeps the originals' storage: fp16 initializers behind a float Cast (as
exports store them) are concatenated as fp16 behind one Cast, so the file does not grow. Each
new node records the original nodes it stands for: the packed MatMul (and Split, bias Add) the
projections, the GroupQueryAttention the attention block it already stood for.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.pattern import MatchResult

from opstudio.core.model import provenance
from opstudio.core.passes._fusion_rules import FLOAT, const_array


def _origins(*values: ir.Value) -> str:
    names: list[str] = []
    for value in values:
        node = value.producer()
        assert node is not None
        recorded = node.metadata_props.get(provenance.ORIGIN_KEY)
        for name in recorded.split(",") if recorded else [node.name or ""]:
            if name and name not in names:
                names.append(name)
    return ",".join(names)


def _stands_for(value: Any, origins: str) -> Any:
    """Records on ``value``'s new producer the original nodes it stands for (the driver keeps
    it instead of giving the node every node the match covered)."""
    node = value.producer()
    node.metadata_props[provenance.ORIGIN_KEY] = origins
    return value


def _stored_weight(value: ir.Value) -> tuple[np.ndarray, bool] | None:
    """A projection weight as stored: its array and whether a float Cast reads it (an fp16
    initializer behind one), or None if it is not a constant 2-D matrix."""
    producer = value.producer()
    cast = producer is not None and producer.op_type == "Cast"
    if cast:
        assert producer is not None
        if producer.attributes.get_int("to", 0) != FLOAT.value:
            return None
        value = producer.inputs[0]  # type: ignore[assignment]
    array = const_array(value)
    if array is None or array.ndim != 2:
        return None
    if not cast and array.dtype != np.float32:
        return None
    return array, cast


def _check_weights(weights: list[ir.Value], result: MatchResult) -> MatchResult:
    stored = [_stored_weight(w) for w in weights]
    if any(s is None for s in stored):
        return result.fail("a projection is not a MatMul by a constant float matrix (fuse before "
                           "quantizing)")
    if len({s[0].shape[0] for s in stored if s is not None}) != 1:
        return result.fail("the projections' weights have different input widths")
    return result


def _packed_weight(op: Any, weights: list[ir.Value], name: str, module: str) -> Any:
    """One initializer of the weights side by side along N, stored as they were (an fp16
    concatenation behind one Cast when all were fp16 behind Casts)."""
    stored = [_stored_weight(w) for w in weights]
    assert all(s is not None for s in stored)
    arrays = [s[0] for s in stored if s is not None]
    casts = all(s[1] for s in stored if s is not None) and len({a.dtype for a in arrays}) == 1
    if not casts:
        arrays = [a.astype(np.float32) for a in arrays]
    packed = op.initializer(ir.tensor(np.concatenate(arrays, axis=1), name=name))
    # the one Cast stands for the weights' Casts
    if not casts:
        return packed
    return _stands_for(op.Cast(packed, to=FLOAT.value, _name=f"{module}/Cast"), _origins(*weights))


def _weight_name(weights: list[ir.Value], suffix: str) -> str:
    """The packed tensor named after the first weight's stored tensor and what it packs
    (``...q_proj.weight.qkv``): unique per layer, and the originals' names say where it came
    from."""
    first = weights[0].producer()
    source = first.inputs[0] if first is not None and first.op_type == "Cast" else weights[0]
    name = (source.name if source is not None else None) or "fuse.packed"
    return f"{name}.{suffix}"


class PackQkvRule(pattern.RewriteRuleClassBase):
    """GroupQueryAttention(MatMul(x, Wq) [+ bq], MatMul(x, Wk) [+ bk], MatMul(x, Wv) [+ bv])
    → GroupQueryAttention(MatMul(x, Wq|Wk|Wv) [+ bq|bk|bv], ∅, ∅)."""

    def __init__(self, name: str, *, bias: bool) -> None:
        super().__init__(name)
        self._bias = bias

    def pattern(self, op: Any, x: Any, wq: Any, wk: Any, wv: Any, bq: Any, bk: Any, bv: Any,
                past_k: Any, past_v: Any, seqlens: Any, total: Any, cos: Any, sin: Any) -> Any:
        projected = []
        for w, b, tag in ((wq, bq, "q"), (wk, bk, "k"), (wv, bv, "v")):
            y = op.MatMul(x, w, _outputs=[f"{tag}_mm"])
            if self._bias:
                y = op.Add(y, b, _outputs=[f"{tag}_add"])
            projected.append(y)
        return op.GroupQueryAttention(*projected, past_k, past_v, seqlens, total, cos, sin,
                                      _domain="com.microsoft", _allow_other_attributes=True,
                                      _outputs=["out", "present_k", "present_v"])

    def check(self, op: Any, wq: ir.Value, wk: ir.Value, wv: ir.Value, out: ir.Value,
              **rest: Any) -> MatchResult:
        result = _check_weights([wq, wk, wv], MatchResult())
        if not result:
            return result
        if self._bias:
            biases = [const_array(rest[b]) for b in ("bq", "bk", "bv")]
            if any(b is None or b.ndim != 1 for b in biases):
                return result.fail("a projection's bias is not a constant vector")
        node = out.producer()
        assert node is not None
        if len(node.inputs) > 9:
            return result.fail("the attention reads inputs past the rotary caches")
        return result

    def rewrite(self, op: Any, x: ir.Value, wq: ir.Value, wk: ir.Value, wv: ir.Value,
                past_k: ir.Value, past_v: ir.Value, seqlens: ir.Value, total: ir.Value,
                cos: ir.Value, sin: ir.Value, out: ir.Value, **rest: Any) -> Any:
        matmuls = [rest[f"{tag}_mm"] for tag in "qkv"]
        projections = _origins(*matmuls)
        weight = _packed_weight(op, [wq, wk, wv], _weight_name([wq, wk, wv], "qkv"),
                               "qkv_proj")
        qkv = _stands_for(op.MatMul(x, weight, _name="qkv_proj/MatMul"), projections)
        if self._bias:
            arrays = [const_array(rest[b]) for b in ("bq", "bk", "bv")]
            bias = op.initializer(ir.tensor(
                np.concatenate([a.astype(np.float32) for a in arrays if a is not None]),
                name=_weight_name([wq, wk, wv], "qkv_bias")))
            qkv = _stands_for(op.Add(qkv, bias, _name="qkv_proj/Add"),
                              _origins(*(rest[f"{tag}_add"] for tag in "qkv")))
        node = out.producer()
        assert node is not None
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        outputs = op.GroupQueryAttention(qkv, None, None, past_k, past_v, seqlens, total, cos,
                                         sin, **attrs, _domain="com.microsoft", _outputs=3,
                                         _name=(node.name or "").rsplit("/", 1)[-1] or None)
        _stands_for(outputs[0], _origins(out))
        return outputs


class PackGateUpRule(pattern.RewriteRuleClassBase):
    """act(g) · u with g = MatMul(x, Wg), u = MatMul(x, Wu) → one MatMul(x, Wg|Wu) split in
    two, the gate as it was. ``activation`` writes the gate, for the pattern and the rewrite
    alike: SiLU here; another family's gate (GeGLU) is a subclass overriding it."""

    def activation(self, op: Any, gate: Any) -> Any:
        return op.Mul(gate, op.Sigmoid(gate))

    def pattern(self, op: Any, x: Any, wg: Any, wu: Any) -> Any:
        gate = op.MatMul(x, wg, _outputs=["gate"])
        up = op.MatMul(x, wu, _outputs=["up"])
        activated = self.activation(op, gate)
        return op.Mul(activated, up, _outputs=["out"])

    def check(self, op: Any, wg: ir.Value, wu: ir.Value, **_: Any) -> MatchResult:
        result = _check_weights([wg, wu], MatchResult())
        if result and _stored_weight(wg)[0].shape[1] != _stored_weight(wu)[0].shape[1]:  # type: ignore[index]
            return result.fail("the gate and up projections have different widths")
        return result

    def rewrite(self, op: Any, x: ir.Value, wg: ir.Value, wu: ir.Value, gate: ir.Value,
                up: ir.Value, out: ir.Value, **_: Any) -> Any:
        projections = _origins(gate, up)
        stored = _stored_weight(wg)
        assert stored is not None
        width = stored[0].shape[1]
        weight = _packed_weight(op, [wg, wu], _weight_name([wg, wu], "gate_up"),
                               "gate_up_proj")
        packed = _stands_for(op.MatMul(x, weight, _name="gate_up_proj/MatMul"), projections)
        sizes = op.initializer(ir.tensor(np.array([width, width], np.int64),
                                         name=_weight_name([wg, wu], "gate_up_split")))
        g, u = op.Split(packed, sizes, axis=-1, _outputs=2, _name="gate_up_proj/Split")
        _stands_for(g, projections)
        matched = out.producer()
        assert matched is not None
        old_gate = next(v for v in matched.inputs if v is not None and v is not up)
        activated = self.activation(op, g)
        gate_origins = ",".join(_between(gate, old_gate))
        for node in _between_nodes(g, activated):
            node.metadata_props[provenance.ORIGIN_KEY] = gate_origins
        return _stands_for(op.Mul(activated, u), _origins(out))


def _between_nodes(start: ir.Value, end: ir.Value) -> list[ir.Node]:
    """The nodes that compute ``end`` from ``start`` (up from ``end``, stopping at ``start``
    and at constants)."""
    found: list[ir.Node] = []
    stack = [end.producer()]
    while stack:
        node = stack.pop()
        if node is None or node in found:
            continue
        found.append(node)
        stack.extend(v.producer() for v in node.inputs if v is not None and v is not start)
    return found


def _between(start: ir.Value, end: ir.Value) -> list[str]:
    """The original nodes the nodes computing ``end`` from ``start`` stand for."""
    names: list[str] = []
    for node in _between_nodes(start, end):
        for name in _origins(*node.outputs[:1]).split(","):
            if name not in names:
                names.append(name)
    return names


def packing_rules() -> list[Any]:
    rules = [PackQkvRule.rule("PackQKV[bias]", bias=True),
             PackQkvRule.rule("PackQKV", bias=False),
             PackGateUpRule.rule("PackGateUp")]
    return [variant for rule in rules for variant in rule.commute()]
