"""onnxscript rewrite rules for the ``fuse`` technique, for the layouts HF/optimum exports have.

onnxscript's own ``ort_fusions`` rules (the starting point here) match none of a torch export of
a Llama-family decoder as is:

- its RMSNorm pattern wants ``Reciprocal`` and ReduceMean's axes as an input (opset 18), where
  the exporter writes ``Div(1, ·)`` and the ``axes`` attribute (opset 17);
- the norm's first ``Cast`` to float is also what the residual Add reads, so it cannot be
  swallowed by the norm and sits between the residual Add and the norm: its SkipRMSNorm pattern
  (Add straight into the norm) does not see the pair;
- its SkipRMSNorm check wants the shapes of the Add's inputs, which an export does not record;
- its rotary pattern wants constant Slice bounds, where the export slices at ``Shape(x)[3] / 2``
  computed in the graph, and reads cos/sin from a cache, where the export computes them from
  position_ids in every step.

onnxscript's GQA rule has the same outline (heads Reshape/Transpose, RotaryEmbedding, past
Concat, repeat_kv by Unsqueeze/Expand/Reshape) but reads an ``SDPA`` node its own SDPA rule must
make first, from a mask built its way. The rule here reads transformers' eager
MatMul/Mul/Add/Softmax/MatMul directly, on the graph the rules above leave, and takes the
additive mask as the causal and padding mask transformers builds from attention_mask (checked:
it is computed from attention_mask), which GroupQueryAttention recomputes from seqlens_k.

The rules below take those forms (and still the ones onnxscript's take). Each check says in
words why a candidate is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.pattern import MatchResult

FLOAT = ir.DataType.FLOAT
_FUSED_FLOAT_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant data (an initializer or a Constant node's), else None.

    Read here rather than with ``ir.convenience.get_const_tensor``, which names the Constant's
    tensor after its output and so writes into the caller's model the IR was read from."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or \
            len(node.attributes) != 1:
        return None
    name, attr = next(iter(node.attributes.items()))
    if attr.is_ref():
        return None
    if name == "value":
        return attr.as_tensor().numpy()
    if name in ("value_float", "value_floats"):
        return np.array(attr.value, dtype=np.float32)
    if name in ("value_int", "value_ints"):
        return np.array(attr.value, dtype=np.int64)
    return None


def _scalar(value: ir.Value | None) -> float | None:
    array = const_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def _ints(value: ir.Value | None) -> list[int] | None:
    array = const_array(value)
    return None if array is None else [int(v) for v in array.reshape(-1)]


def is_float32(value: ir.Value) -> bool:
    """Known to be float32: typed so, a Cast to float, or a norm this pass made in float."""
    if value.dtype == FLOAT:
        return True
    producer = value.producer()
    if producer is None:
        return False
    if producer.op_type == "Cast":
        return producer.attributes.get_int("to", 0) == FLOAT.value
    return producer.op_type in _FUSED_FLOAT_OPS


def _through_casts(value: ir.Value | None) -> ir.Value | None:
    """``value`` before any float Casts (identity for float data) that produced it."""
    while value is not None:
        producer = value.producer()
        if producer is None or producer.op_type != "Cast" or \
                producer.attributes.get_int("to", 0) != FLOAT.value:
            return value
        value = producer.inputs[0]
    return value


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    producer = None if value is None else value.producer()
    return producer if producer is not None and producer.op_type == op_type else None


class RmsNormRule(pattern.RewriteRuleClassBase):
    """x · 1/sqrt(mean(x²) + ε) · w → SimplifiedLayerNormalization (default domain, as
    onnxruntime registers it)."""

    def __init__(self, name: str, *, reciprocal: bool, axes_input: bool, out_cast: bool,
                 scale_first: bool) -> None:
        super().__init__(name)
        self._reciprocal = reciprocal
        self._axes_input = axes_input
        self._out_cast = out_cast
        self._scale_first = scale_first

    def pattern(self, op: Any, x: Any, two: Any, axes: Any, epsilon: Any, one: Any,
                scale: Any) -> Any:
        square = op.Pow(x, two)
        if self._axes_input:
            mean = op.ReduceMean(square, axes, _allow_other_attributes=True, _outputs=["mean"])
        else:
            mean = op.ReduceMean(square, _allow_other_attributes=True, _outputs=["mean"])
        rms = op.Sqrt(op.Add(mean, epsilon))
        inverse = op.Reciprocal(rms) if self._reciprocal else op.Div(one, rms)
        normalized = op.Mul(x, inverse)
        if self._out_cast:
            normalized = op.Cast(normalized, _allow_other_attributes=True, _outputs=["cast"])
        return op.Mul(scale, normalized) if self._scale_first else op.Mul(normalized, scale)

    def check(self, op: Any, x: ir.Value, two: ir.Value, epsilon: ir.Value, scale: ir.Value,
              mean: ir.Value, **rest: Any) -> MatchResult:
        result = MatchResult()
        if _scalar(two) != 2.0:
            return result.fail("the square is not Pow(x, 2)")
        if not self._reciprocal and _scalar(rest.get("one")) != 1.0:
            return result.fail("the inverse is not 1 / sqrt(·)")
        if _scalar(epsilon) is None:
            return result.fail("epsilon is not a constant scalar")
        reduce = mean.producer()
        assert reduce is not None
        axes = _ints(rest.get("axes")) if self._axes_input else \
            list(reduce.attributes.get_ints("axes", []) or [])
        if axes != [-1]:
            return result.fail(f"the mean is over axes {axes}, not the last one (-1)")
        if reduce.attributes.get_int("keepdims", 1) != 1:
            return result.fail("the mean does not keep its axis")
        if self._out_cast and rest["cast"].producer().attributes.get_int("to", 0) != FLOAT.value:
            return result.fail("the normalized value is cast to another type than float")
        if not is_float32(x):
            return result.fail("the normalized input is not known to be float32")
        weight = const_array(_through_casts(scale))
        if weight is None or weight.ndim != 1 or not is_float32(scale):
            return result.fail("the weight is not a constant float vector")
        return result

    def rewrite(self, op: Any, x: ir.Value, scale: ir.Value, epsilon: ir.Value,
                **_: Any) -> Any:
        return op.SimplifiedLayerNormalization(x, scale, axis=-1, epsilon=_scalar(epsilon),
                                               stash_type=1)


class SkipRmsNormRule(pattern.RewriteRuleClassBase):
    """residual Add (seen through the norm's float Cast) + SimplifiedLayerNormalization →
    SkipSimplifiedLayerNormalization (com.microsoft), whose 4th output is the sum."""

    def __init__(self, name: str, *, cast: bool) -> None:
        super().__init__(name)
        self._cast = cast

    def pattern(self, op: Any, a: Any, b: Any, gamma: Any) -> Any:
        total = op.Add(a, b)
        if self._cast:
            total = op.Cast(total, _allow_other_attributes=True, _outputs=["cast"])
        normalized = op.SimplifiedLayerNormalization(total, gamma, _allow_other_attributes=True,
                                                     _outputs=["norm"])
        return normalized, total

    def check(self, op: Any, a: ir.Value, b: ir.Value, norm: ir.Value,
              **rest: Any) -> MatchResult:
        result = MatchResult()
        node = norm.producer()
        assert node is not None
        if node.attributes.get_int("stash_type", 1) != 1 or \
                node.attributes.get_int("axis", -1) != -1:
            return result.fail("the norm is not over the last axis in float")
        if self._cast and rest["cast"].producer().attributes.get_int("to", 0) != FLOAT.value:
            return result.fail("the sum is cast to another type than float")
        if not (is_float32(a) or is_float32(b)):
            return result.fail("the residual sum is not known to be float32")
        if const_array(a) is not None or const_array(b) is not None:
            return result.fail("one side of the residual Add is a constant (a bias, not a skip)")
        return result

    def rewrite(self, op: Any, a: ir.Value, b: ir.Value, gamma: ir.Value, norm: ir.Value,
                **_: Any) -> Any:
        node = norm.producer()
        assert node is not None
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        normalized, _mean, _inv_std, total = op.SkipSimplifiedLayerNormalization(
            a, b, gamma, epsilon=epsilon, _outputs=4, _domain="com.microsoft")
        return normalized, total


class RotaryRule(pattern.RewriteRuleClassBase):
    """x·cos + rotate_half(x)·sin, cos/sin computed from position_ids →
    RotaryEmbedding (com.microsoft) with cos/sin caches of ``max_positions`` rows."""

    def __init__(self, name: str, *, max_positions: int, caches: dict[bytes, Any]) -> None:
        super().__init__(name)
        self._max_positions = max_positions
        self._caches = caches  # shared by every layer: one cos/sin cache per inv_freq

    def pattern(self, op: Any, x: Any, cos: Any, sin: Any, start1: Any, end1: Any, axes1: Any,
                steps1: Any, start2: Any, end2: Any, axes2: Any, steps2: Any) -> Any:
        first = op.Slice(x, start1, end1, axes1, steps1)
        second = op.Slice(x, start2, end2, axes2, steps2)
        rotated = op.Concat(op.Neg(second), first, axis=-1)
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(self, op: Any, x: ir.Value, cos: ir.Value, sin: ir.Value, start1: ir.Value,
              end1: ir.Value, axes1: ir.Value, steps1: ir.Value, start2: ir.Value,
              end2: ir.Value, axes2: ir.Value, steps2: ir.Value,
              **_: Any) -> MatchResult:
        result = MatchResult()
        source = rotary_source(cos, sin)
        if isinstance(source, str):
            return result.fail(source)
        inv_freq = source["inv_freq"]
        half = inv_freq.size
        for axes in (axes1, axes2):
            if _ints(axes) not in ([3], [-1]):
                return result.fail("rotate_half does not slice the last axis of [B, N, S, D]")
        if _ints(steps1) != [1] or _ints(steps2) != [1]:
            return result.fail("rotate_half slices with a step")
        if _ints(start1) != [0] or (_ints(end2) or [0])[0] < 2 * half:
            return result.fail("rotate_half does not take the two halves of the last axis")
        if not (_is_half_of_last_dim(end1, x, half) and _is_half_of_last_dim(start2, x, half)):
            return result.fail("rotate_half does not split the last axis in the middle")
        # a Slice: the rotated part of a partial rotary (Phi), which ``_fusion_families`` merges
        sliced = _producer(x, "Slice")
        if not is_float32(x) and _producer(x, "Transpose") is None and \
                (sliced is None or _producer(sliced.inputs[0], "Transpose") is None):
            return result.fail("the rotated tensor is not known to be float32")
        return result

    def rewrite(self, op: Any, x: ir.Value, cos: ir.Value, sin: ir.Value, **_: Any) -> Any:
        source = rotary_source(cos, sin)
        assert not isinstance(source, str)
        inv_freq, scale = source["inv_freq"], source["scale"]
        key = inv_freq.tobytes() + np.float32(scale).tobytes()
        caches = self._caches.get(key)
        if caches is None:
            positions = np.arange(self._max_positions, dtype=np.float32)[:, None]
            angles = positions * inv_freq[None, :].astype(np.float32)  # float32, as the graph
            tag = f"fuse.rotary_{len(self._caches)}"
            caches = (
                op.initializer(ir.tensor((np.cos(angles) * np.float32(scale)).astype(np.float32),
                                         name=f"{tag}.cos_cache")),
                op.initializer(ir.tensor((np.sin(angles) * np.float32(scale)).astype(np.float32),
                                         name=f"{tag}.sin_cache")))
            self._caches[key] = caches
        return op.RotaryEmbedding(x, source["position_ids"], caches[0], caches[1], interleaved=0,
                                  _domain="com.microsoft")


def _is_half_of_last_dim(end: ir.Value, x: ir.Value, half: int) -> bool:
    """``end`` is the constant ``half`` or Shape(x)[-1] / 2 computed in the graph (through
    Unsqueeze and Casts, as torch's exporter writes ``x.shape[-1] // 2``)."""
    if _ints(end) == [half]:
        return True
    value: ir.Value | None = end
    while value is not None and value.producer() is not None and \
            value.producer().op_type in ("Unsqueeze", "Cast", "Reshape"):  # type: ignore[union-attr]
        value = value.producer().inputs[0]  # type: ignore[union-attr]
    div = _producer(value, "Div")
    if div is None or _scalar(div.inputs[1]) != 2.0:
        return False
    gather = _producer(div.inputs[0], "Gather")
    if gather is None or _ints(gather.inputs[1]) not in ([3], [-1]):
        return False
    shape = _producer(gather.inputs[0], "Shape")
    return shape is not None and shape.inputs[0] is x and not shape.attributes.get("start")


def rotary_source(cos: ir.Value, sin: ir.Value) -> dict[str, Any] | str:
    """Where the export's cos/sin come from: ``Unsqueeze(Cast(Cos(Concat(f, f)) · scale), 1)``
    with ``f = Cast(Unsqueeze(position_ids, -1)) · inv_freq``. Returns inv_freq, the scale and
    the position_ids value, or why not."""
    found: dict[str, Any] = {}
    angles = []
    for value, trig in ((cos, "Cos"), (sin, "Sin")):
        unsqueeze = _producer(value, "Unsqueeze")
        if unsqueeze is None or _ints(unsqueeze.inputs[1]) != [1]:
            return "cos/sin are not broadcast over the heads (Unsqueeze at axis 1)"
        inner = _through_casts(unsqueeze.inputs[0])
        scale = 1.0
        mul = _producer(inner, "Mul")
        if mul is not None:
            factor = [_scalar(v) for v in mul.inputs]
            if factor[1] is not None:
                scale, inner = factor[1], mul.inputs[0]
            elif factor[0] is not None:
                scale, inner = factor[0], mul.inputs[1]
            else:
                return "cos/sin are scaled by a value that is not a constant"
        node = _producer(inner, trig)
        if node is None:
            return f"the {trig.lower()} table is not computed from position_ids in the graph"
        if found.setdefault("scale", scale) != scale:
            return "cos and sin are scaled differently"
        angles.append(node.inputs[0])
    if angles[0] is not angles[1]:
        return "cos and sin are not of the same angles"
    concat = _producer(angles[0], "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1] \
            or concat.attributes.get_int("axis", 0) not in (-1, 2):
        return "the angles are not repeated for both halves (interleaved or partial rotary)"
    freqs = _producer(concat.inputs[0], "Mul")
    if freqs is None:
        return "the angles are not position × inv_freq"
    inv_freq = const_array(freqs.inputs[1])
    positions = freqs.inputs[0]
    if inv_freq is None:
        inv_freq, positions = const_array(freqs.inputs[0]), freqs.inputs[1]
    if inv_freq is None or inv_freq.size != inv_freq.shape[-1]:
        return "the angles are not position × a constant inv_freq"
    cast = _producer(positions, "Cast")
    unsqueeze = _producer(None if cast is None else cast.inputs[0], "Unsqueeze")
    if unsqueeze is None or _ints(unsqueeze.inputs[1]) not in ([2], [-1]):
        return "the angles are not computed from position_ids"
    position_ids = unsqueeze.inputs[0]
    if position_ids is None or not position_ids.is_graph_input():
        return "the positions are not a graph input (position_ids)"
    return {"inv_freq": inv_freq.reshape(-1).astype(np.float32), "scale": found["scale"],
            "position_ids": position_ids}


def norm_rules() -> list[Any]:
    rules = []
    for reciprocal in (False, True):
        for axes_input in (False, True):
            for out_cast in (True, False):
                for scale_first in (True, False):
                    name = (f"RmsNorm[{'recip' if reciprocal else 'div'},"
                            f"{'axes-in' if axes_input else 'axes-attr'},"
                            f"{'cast' if out_cast else 'nocast'}]")
                    rules.append(RmsNormRule.rule(name, reciprocal=reciprocal,
                                                  axes_input=axes_input, out_cast=out_cast,
                                                  scale_first=scale_first))
    return _commuted(rules)


def skip_rules() -> list[Any]:
    return _commuted([SkipRmsNormRule.rule("SkipRmsNorm[cast]", cast=True),
                      SkipRmsNormRule.rule("SkipRmsNorm", cast=False)])


def rotary_rules(max_positions: int) -> list[Any]:
    caches: dict[bytes, Any] = {}
    return _commuted([RotaryRule.rule("Rotary", max_positions=max_positions, caches=caches)])


def _commuted(rules: list[Any]) -> list[Any]:
    return [variant for rule in rules for variant in rule.commute()]


class Shared:
    """Values several rewrites share (seqlens_k and the total length for every fused
    attention): made by the first rewrite that is kept; dropped when the driver does not keep
    the rewrite that made them, so no later one reads a value no node produces."""

    def __init__(self) -> None:
        self.values: tuple[Any, ...] | None = None
        self.pending = False
        # why a mask is not the plain causal one GroupQueryAttention applies (None: it is)
        self.mask_refusal: Callable[[ir.Value], str | None] = lambda mask: None

    def keep(self) -> None:
        self.pending = False

    def drop(self) -> None:
        if self.pending:
            self.values, self.pending = None, False


class GqaRule(pattern.RewriteRuleClassBase):
    """transformers' eager attention over a KV cache (q/k/v reshaped to heads, RotaryEmbedding
    on q and k, past Concat, repeat_kv by Expand, scaled scores + the additive mask, Softmax, ·V,
    heads merged) → GroupQueryAttention (com.microsoft) with rotary inside, seqlens_k and the
    total length computed once from attention_mask."""

    def __init__(self, name: str, *, casts: int, shared: Shared) -> None:
        super().__init__(name)
        self._casts = casts
        self._shared = shared

    def pattern(self, op: Any, q: Any, k: Any, v: Any, past_k: Any, past_v: Any, pos: Any,
                cos: Any, sin: Any, mask: Any, scale: Any, sq: Any, sk: Any, sv: Any,
                uk: Any, ek: Any, rk: Any, uv: Any, ev: Any, rv: Any, so: Any) -> Any:
        def heads(x: Any, shape: Any) -> Any:
            return op.Transpose(op.Reshape(x, shape, _allow_other_attributes=True),
                                perm=[0, 2, 1, 3])

        def rope(x: Any, out: str) -> Any:
            return op.RotaryEmbedding(x, pos, cos, sin, _domain="com.microsoft",
                                      _allow_other_attributes=True, _outputs=[out])

        q4 = rope(heads(q, sq), "q_rot")
        present_k = op.Concat(past_k, rope(heads(k, sk), "k_rot"), axis=-2)
        present_v = op.Concat(past_v, heads(v, sv), axis=-2)
        k_rep = op.Reshape(op.Expand(op.Unsqueeze(present_k, uk), ek), rk,
                           _allow_other_attributes=True)
        v_rep = op.Reshape(op.Expand(op.Unsqueeze(present_v, uv), ev), rv,
                           _allow_other_attributes=True)
        scores = op.Mul(op.MatMul(q4, op.Transpose(k_rep, perm=[0, 1, 3, 2])), scale)
        probs = op.Softmax(op.Add(scores, mask), _allow_other_attributes=True,
                           _outputs=["probs"])
        for _ in range(self._casts):
            probs = op.Cast(probs, to=FLOAT.value)
        context = op.Transpose(op.MatMul(probs, v_rep), perm=[0, 2, 1, 3])
        out = op.Reshape(context, so, _allow_other_attributes=True)
        return out, present_k, present_v

    def check(self, op: Any, q: ir.Value, k: ir.Value, v: ir.Value, past_k: ir.Value,
              past_v: ir.Value, pos: ir.Value, cos: ir.Value, mask: ir.Value, scale: ir.Value,
              probs: ir.Value, q_rot: ir.Value, k_rot: ir.Value, uk: ir.Value, uv: ir.Value,
              **_: Any) -> MatchResult:
        result = MatchResult()
        found = attention_shape(q, k, v, cos)
        if isinstance(found, str):
            return result.fail(found)
        scores = scores_refusal(scale, probs)
        if scores is not None:
            return result.fail(scores)
        for rot in (q_rot, k_rot):
            node = rot.producer()
            assert node is not None
            if node.attributes.get_int("interleaved", 0) or \
                    node.attributes.get_int("rotary_embedding_dim", 0):
                return result.fail("the rotary embedding is interleaved or partial")
        if _ints(uk) != [2] or _ints(uv) != [2]:
            return result.fail("the KV heads are not repeated as transformers' repeat_kv does")
        if not pos.is_graph_input():
            return result.fail("the positions are not the graph's position_ids")
        if not _identity_of(past_k).is_graph_input() or not _identity_of(past_v).is_graph_input():
            return result.fail("the past keys/values are not the graph's KV cache inputs")
        if _graph_input_above(mask, "attention_mask") is None:
            return result.fail("the mask is not computed from the graph's attention_mask")
        refusal = self._shared.mask_refusal(mask)
        if refusal:
            return result.fail(refusal)
        return result

    def rewrite(self, op: Any, q: ir.Value, k: ir.Value, v: ir.Value, past_k: ir.Value,
                past_v: ir.Value, cos: ir.Value, sin: ir.Value, mask: ir.Value,
                scale: ir.Value, **_: Any) -> Any:
        found = attention_shape(q, k, v, cos)
        assert not isinstance(found, str)
        seqlens, length = shared_lengths(op, self._shared, mask)
        out, present_k, present_v = op.GroupQueryAttention(
            q, k, v, _identity_of(past_k), _identity_of(past_v), seqlens, length, cos, sin,
            num_heads=found["heads"], kv_num_heads=found["kv_heads"], scale=_scalar(scale),
            do_rotary=1, rotary_interleaved=0, _domain="com.microsoft", _outputs=3)
        return out, present_k, present_v


def shared_lengths(op: Any, shared: Shared, mask: ir.Value) -> tuple[Any, Any]:
    """seqlens_k and the total length, made once from attention_mask for every layer."""
    if shared.values is None:
        attention_mask = _graph_input_above(mask, "attention_mask")
        one = op.initializer(ir.tensor(np.array([1], np.int64), name="fuse.one"))
        total = op.ReduceSum(attention_mask, one, keepdims=0)
        seqlens = op.Cast(op.Sub(total, one), to=ir.DataType.INT32.value)
        second = op.initializer(ir.tensor(np.array(1, np.int64), name="fuse.index_1"))
        length = op.Cast(op.Gather(op.Shape(attention_mask), second, axis=0),
                         to=ir.DataType.INT32.value)
        shared.values = (seqlens, length)
        shared.pending = True
    return shared.values[0], shared.values[1]


def _identity_of(value: ir.Value) -> ir.Value:
    """``value`` through Identity and one-input Concat nodes (torch's exporter writes the first
    layer's past key as ``Concat(past_key_values.0.key)``)."""
    producer = value.producer()
    while producer is not None and len(producer.inputs) == 1 and \
            producer.op_type in ("Identity", "Concat") and producer.inputs[0] is not None:
        value = producer.inputs[0]
        producer = value.producer()
    return value


def attention_shape(q: ir.Value, k: ir.Value, v: ir.Value, cos: ir.Value) -> dict[str, int] | str:
    """Head counts from the projections' weights (behind a bias Add or not) and the head size
    from the rotary cache."""
    cache = const_array(cos)
    if cache is None or cache.ndim != 2:
        return "the rotary cache is not a constant table"
    head = 2 * cache.shape[1]
    widths = []
    for value in (q, k, v):
        source: ir.Value | None = value
        add = _producer(value, "Add")  # a projection's bias (Qwen2): GroupQueryAttention reads
        if add is not None:           # the biased q/k/v as they are
            source = next((x for x in add.inputs if const_array(x) is None), value)
        matmul = _producer(source, "MatMul")
        weight = None if matmul is None else const_array(_through_casts(matmul.inputs[1]))
        if weight is None or weight.ndim != 2:
            return ("a q/k/v projection is not a MatMul by a constant weight (fuse before "
                    "quantizing)")
        widths.append(weight.shape[1])
    if any(w % head for w in widths) or widths[1] != widths[2] or widths[0] % widths[1]:
        return "the q/k/v widths do not divide into heads of the rotary size"
    return {"heads": widths[0] // head, "kv_heads": widths[1] // head, "head": head}


def _graph_input_above(value: ir.Value, name: str, depth: int = 40) -> ir.Value | None:
    """The graph input ``name`` if ``value`` is computed from it within ``depth`` nodes."""
    seen: set[int] = set()
    frontier: list[ir.Value | None] = [value]
    for _ in range(depth):
        following: list[ir.Value | None] = []
        for item in frontier:
            if item is None or id(item) in seen:
                continue
            seen.add(id(item))
            if item.is_graph_input() and item.name == name:
                return item
            producer = item.producer()
            if producer is not None:
                following.extend(producer.inputs)
        frontier = following
        if not frontier:
            break
    return None


def attention_rules(shared: Shared) -> list[Any]:
    return _commuted([GqaRule.rule(f"GQA[{casts} casts]", casts=casts, shared=shared)
                      for casts in (0, 2)])


def scores_refusal(scale: ir.Value, probs: ir.Value) -> str | None:
    """Why an attention's scores cannot be GroupQueryAttention's (None: they can): its scale is
    a constant and its Softmax runs over the keys."""
    if _scalar(scale) is None:
        return "the scores are scaled by a value that is not a constant"
    softmax = probs.producer()
    assert softmax is not None
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return "the softmax is not over the keys"
    return None


# the helpers ``_fusion_families`` reads the same graphs with
identity_of = _identity_of
ints_of = _ints
producer_of = _producer
scalar_of = _scalar
