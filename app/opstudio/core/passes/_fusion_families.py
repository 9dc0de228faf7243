"""onnxscript rewrite rules for the decoder families beyond the Llama layout, for ``fuse``.

``_fusion_rules`` reads the Llama/Qwen2 layout. The exports of other HF families differ in the
attention block and the norms:

- Gemma: q/k norms (Gemma 3, also Qwen3) between the heads' Reshape and Transpose or after it;
  logits soft-capped before the mask (Gemma 2: ``tanh(s / c) · c``); every other layer attends
  through a sliding window, which the export writes into the additive mask only;
- Phi: partial rotary (rotate_half on the first ``rotary_dim`` dims of each head, the rest
  passed through by Slice and Concat), LayerNormalization, q/k/v biases, no repeat_kv when every
  query head has its own KV head, a fused qkv projection (Phi-3) sliced into q, k and v;
- GPT-2: LayerNormalization with a residual Add before it, one c_attn projection (Gemm + bias)
  split into q, k and v, learned positions (no rotary), MHA without repeat_kv.

``FamilyGqaRule`` is one pattern with the optional parts as alternatives (``pattern.OrValue``):
each layer becomes GroupQueryAttention with ``softcap``, ``local_window_size``, partial rotary
and the q/k norms in front of it, or is refused with the reason in the user's words.

The mask decides what GroupQueryAttention may compute, so it is not read from its nodes (every
exporter and transformers version writes it differently) but run: ``MaskProbe`` evaluates the
mask's subgraph on its own at two shapes (a short prompt, and one token at the end of the rotary
cache) and compares it with the causal mask and with a sliding window of each width. A mask that
is neither (a bias, chunked attention, a window that depends on the input) is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.pattern import MatchResult

from opstudio.core.passes._fusion_rules import (
    RmsNormRule,
    Shared,
    const_array,
    identity_of,
    ints_of,
    producer_of,
    scalar_of,
    scores_refusal,
    shared_lengths,
)

# below this an additive mask entry makes exp() underflow to exactly 0 in float32
_BLOCKED = -1.0e4
# the rotary GroupQueryAttention applies itself covers a multiple of this many dims
_GQA_ROTARY_STEP = 16
_PROBE_NODES = 4000


class MaskProbe:
    """The sliding window an additive attention mask applies (0: plain causal), found by running
    the mask's own subgraph; or why it is not one GroupQueryAttention can apply."""

    def __init__(self, irmodel: ir.Model, max_positions: int) -> None:
        self._opsets = dict(irmodel.opset_imports)
        self._ir_version = irmodel.ir_version
        self._max_positions = max_positions
        self._found: dict[int, tuple[ir.Value, int | str]] = {}

    def window(self, mask: ir.Value) -> int | str:
        cached = self._found.get(id(mask))
        if cached is not None and cached[0] is mask:
            return cached[1]
        try:
            found = self._window(mask)
        except Exception as exc:  # any failure to run the mask is a refusal
            found = f"its mask could not be computed on its own ({str(exc).splitlines()[0]})"
        self._found[id(mask)] = (mask, found)
        return found

    def refusal(self, mask: ir.Value) -> str | None:
        """Why a rule that applies no window cannot take this mask (None: it can)."""
        found = self.window(mask)
        if isinstance(found, str):
            return found
        return None if found == 0 else f"sliding-window mask of {found} tokens"

    def _window(self, mask: ir.Value) -> int | str:
        model = self._subgraph(mask)
        if isinstance(model, str):
            return model
        from opstudio.core.model.runtime import create_session, session_options

        # a small graph: one thread, which never spins against a busy machine
        session = create_session(model, session_options(threads=1, inter_threads=1,
                                                        spinning=False))
        probes = ((3, 5), (2, max(self._max_positions - 2, 8)))
        allowed = []
        for seq, past in probes:
            feeds = _probe_feeds(session, seq, past)
            if isinstance(feeds, str):
                return feeds
            out = np.asarray(session.run(None, feeds)[0], dtype=np.float64)
            if out.ndim < 2 or out.shape[-2:] != (seq, past + seq):
                return "its mask does not have one row per new token and one column per key"
            rows = out.reshape(-1, seq, past + seq)
            if (rows != rows[:1]).any():
                return "its mask differs between batch rows or heads for an unpadded prompt"
            rows = rows[0]
            if ((rows != 0) & (rows > _BLOCKED)).any():
                return "its mask adds a bias to the scores (not only causal and padding)"
            allowed.append((past, rows == 0))
        # the narrowest row of the long probe gives the window; both probes must then agree
        past, last = allowed[-1]
        width = int(last.sum(-1).min())
        window = 0 if width >= past + 1 else width
        for past, rows in allowed:
            if not np.array_equal(rows, _expected(rows.shape[0], past, window)):
                return "its mask is neither causal nor a causal sliding window"
        return window

    def _subgraph(self, mask: ir.Value) -> onnx.ModelProto | str:
        nodes: list[ir.Node] = []
        inputs: list[ir.Value] = []
        constants: list[ir.Value] = []
        seen: set[int] = set()
        stack = [mask]
        while stack:
            value = stack.pop()
            if id(value) in seen:
                continue
            seen.add(id(value))
            producer = value.producer()
            if producer is not None:
                if id(producer) in seen:
                    continue
                seen.add(id(producer))
                if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                       for attr in producer.attributes.values()):
                    return "its mask is computed inside a subgraph"
                nodes.append(producer)
                stack.extend(v for v in producer.inputs if v is not None)
                if len(nodes) > _PROBE_NODES:
                    return "its mask is computed from the layers' values, not the inputs"
            elif value.const_value is not None:
                constants.append(value)
            elif value.is_graph_input():
                inputs.append(value)
        inside = {id(node) for node in nodes}
        if any(v.const_value is not None and v.const_value.size > 1 << 16 and
               not _only_gathered(v, inside) for v in constants):
            return "its mask is computed from the model's weights"
        order = {id(node): i for i, node in enumerate(mask.graph or [])} if mask.graph else {}
        nodes.sort(key=lambda node: order.get(id(node), 0))
        graph = onnx.helper.make_graph(
            [ir.serde.serialize_node(node) for node in nodes], "mask_probe",
            [ir.serde.serialize_value(v) for v in sorted(inputs, key=lambda v: v.name or "")],
            [onnx.helper.make_value_info(mask.name or "mask", onnx.TypeProto())],
            [_stand_in(v.const_value) for v in constants if v.const_value is not None])
        for tensor, value in zip(graph.initializer, constants, strict=True):
            tensor.name = value.name or tensor.name
        model = onnx.helper.make_model(graph, opset_imports=[
            onnx.helper.make_opsetid(domain, version) for domain, version in self._opsets.items()])
        model.ir_version = self._ir_version
        return model


def _only_gathered(value: ir.Value, inside: set[int]) -> bool:
    """Read by the nodes ``inside`` only as the table rows are gathered from (through Casts):
    an embedding, whose shape, not its values, a mask from the embeddings' Shape reads."""
    for use in value.uses():
        node = use.node
        if id(node) not in inside:
            continue
        if node.op_type == "Cast":
            if not all(_only_gathered(out, inside) for out in node.outputs):
                return False
        elif node.op_type != "Gather" or use.idx != 0 or \
                node.attributes.get_int("axis", 0) != 0:
            return False
    return True


def _stand_in(tensor: Any) -> onnx.TensorProto:
    """A weight as the probe needs it: a large embedding becomes one zero row (the probe's
    token ids are all 0), so the probe never copies a model's weights."""
    if tensor.size <= 1 << 16:
        return ir.serde.serialize_tensor(tensor)
    dtype = tensor.dtype.numpy()
    return onnx.numpy_helper.from_array(np.zeros((1, *tensor.shape[1:]), dtype), tensor.name)


def _expected(seq: int, past: int, window: int) -> np.ndarray:
    """Key j visible to new token i (at position past + i): causal, within ``window`` (HF's
    sliding window and GroupQueryAttention's ``local_window_size``: j > position - window)."""
    position = np.arange(past, past + seq)[:, None]
    key = np.arange(past + seq)[None, :]
    visible = key <= position
    return visible & (key > position - window) if window else visible


def _probe_feeds(session: Any, seq: int, past: int) -> dict[str, np.ndarray] | str:
    feeds: dict[str, np.ndarray] = {}
    for item in session.get_inputs():
        dtype = {"tensor(int64)": np.int64, "tensor(int32)": np.int32,
                 "tensor(float)": np.float32, "tensor(float16)": np.float16,
                 "tensor(bool)": np.bool_}.get(item.type)
        if dtype is None:
            return f"its mask depends on input {item.name} of type {item.type}"
        name = item.name
        if name == "attention_mask":
            feeds[name] = np.ones((1, past + seq), dtype)
        elif name == "input_ids":
            feeds[name] = np.zeros((1, seq), dtype)
        elif name == "position_ids":
            feeds[name] = np.arange(past, past + seq, dtype=dtype)[None]
        elif "past" in name and len(item.shape) == 4:
            dims = [d if isinstance(d, int) else 1 for d in item.shape]
            feeds[name] = np.zeros((1, dims[1], past, dims[3]), dtype)
        else:
            return f"its mask depends on input {name}"
    return feeds


def _width(value: ir.Value | None) -> int | None:
    """Columns a projection output has: a MatMul/Gemm by a constant weight, behind a bias Add,
    a Reshape, or a Slice/Split of a packed projection's last axis."""
    add = producer_of(value, "Add")
    if add is not None:
        value = next((x for x in add.inputs if const_array(_through_float(x)) is None), None)
    reshape = producer_of(value, "Reshape")
    if reshape is not None:
        shape = ints_of(reshape.inputs[1])
        if shape and shape[-1] > 0:
            return shape[-1]
        value = reshape.inputs[0]
    if value is None or value.producer() is None:
        return None
    node = value.producer()
    assert node is not None
    if node.op_type in ("MatMul", "Gemm"):
        weight = const_array(_through_float(node.inputs[1]))
        if weight is None or weight.ndim != 2:
            return None
        transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) != 0
        return int(weight.shape[0] if transposed else weight.shape[1])
    if node.op_type == "Slice":
        full = _width(node.inputs[0])
        starts, ends = ints_of(node.inputs[1]), ints_of(node.inputs[2])
        axes = ints_of(node.inputs[3]) if len(node.inputs) > 3 else [-1]
        if full is None or starts is None or ends is None or axes not in ([-1], [2]):
            return None
        return max(0, min(ends[0], full) - starts[0])
    if node.op_type == "Split":
        sizes = ints_of(node.inputs[1]) if len(node.inputs) > 1 else None
        full = _width(node.inputs[0])
        if node.attributes.get_int("axis", 0) not in (-1, 2) or full is None:
            return None
        if sizes is None:
            return full // len(node.outputs)
        index = value.index()
        return None if index is None else sizes[index]
    return None


def _through_float(value: ir.Value | None) -> ir.Value | None:
    """``value`` before the Casts and Identities (torch's exporter shares equal weights through
    an Identity) that produced it."""
    producer = None if value is None else value.producer()
    while producer is not None and producer.op_type in ("Cast", "Identity"):
        value = producer.inputs[0]
        producer = None if value is None else value.producer()
    return value


def _kv_dims(past: ir.Value) -> tuple[int, int] | None:
    """KV heads and head size, from the past cache input's declared shape."""
    shape = past.shape
    if shape is None or len(shape) != 4:
        return None
    heads, head = shape[1], shape[3]
    return (heads, head) if isinstance(heads, int) and isinstance(head, int) else None


class FamilyGqaRule(pattern.RewriteRuleClassBase):
    """transformers' eager attention with the family variants (optional q/k norms, rotary or
    none, repeat_kv or none, Mul or Div scale, optional softcap, 0-2 Casts after Softmax, any
    causal or sliding-window mask) → GroupQueryAttention."""

    def __init__(self, name: str, *, rope: bool, softcap: bool, casts: int,
                 shape_of_context: bool, shared: Shared, probe: MaskProbe) -> None:
        super().__init__(name)
        self._rope = rope
        self._shape_of_context = shape_of_context
        self._softcap = softcap
        self._casts = casts
        self._shared = shared
        self._probe = probe

    def pattern(self, op: Any, q: Any, k: Any, v: Any, past_k: Any, past_v: Any, pos: Any,
                cos: Any, sin: Any, mask: Any, scale: Any, cap_in: Any, cap_out: Any,
                sq: Any, sk: Any, sv: Any, so: Any, q_gamma: Any, k_gamma: Any,
                q_gamma_t: Any, k_gamma_t: Any, uk: Any, ek: Any, rk: Any, uv: Any, ev: Any,
                rv: Any, rest_b: Any, rest_ab: Any, rest_s: Any, rest_as: Any) -> Any:
        def heads(x: Any, shape: Any, gamma: Any, gamma_t: Any, tag: str) -> Any:
            split = op.Reshape(x, shape, _allow_other_attributes=True)
            normed = op.SimplifiedLayerNormalization(split, gamma, _allow_other_attributes=True,
                                                     _outputs=[f"{tag}_norm"])
            moved = op.Transpose(pattern.OrValue([normed, split], tag_var=f"{tag}_has_norm"),
                                 perm=[0, 2, 1, 3])
            # the norm's own float Cast (Gemma's ``x.float()``) may sit before it
            floated = pattern.OrValue([op.Cast(moved, to=ir.DataType.FLOAT.value), moved],
                                      tag_var=f"{tag}_cast_t")
            normed_t = op.SimplifiedLayerNormalization(floated, gamma_t,
                                                       _allow_other_attributes=True,
                                                       _outputs=[f"{tag}_norm_t"])
            return pattern.OrValue([normed_t, moved], tag_var=f"{tag}_has_norm_t")

        def rope(x: Any, tag: str) -> Any:
            # a rule variant: as an alternative, ``x`` (itself one) would nest two OrValues,
            # which onnxscript's matcher binds twice
            if not self._rope:
                return x
            return op.RotaryEmbedding(x, pos, cos, sin, _domain="com.microsoft",
                                      _allow_other_attributes=True, _outputs=[f"{tag}_rot"])

        def repeat(x: Any, u: Any, e: Any, r: Any, tag: str) -> Any:
            repeated = op.Reshape(op.Expand(op.Unsqueeze(x, u), e), r,
                                  _allow_other_attributes=True)
            return pattern.OrValue([repeated, x], tag_var=f"{tag}_repeated")

        q4 = rope(heads(q, sq, q_gamma, q_gamma_t, "q"), "q")
        present_k = op.Concat(past_k, rope(heads(k, sk, k_gamma, k_gamma_t, "k"), "k"),
                              axis=-2)
        present_v = op.Concat(past_v, op.Transpose(op.Reshape(v, sv, _allow_other_attributes=True),
                                                   perm=[0, 2, 1, 3]), axis=-2)
        scores = op.MatMul(q4, op.Transpose(repeat(present_k, uk, ek, rk, "k"), perm=[0, 1, 3, 2]))
        scaled = pattern.OrValue([op.Mul(scores, scale, _outputs=["scaled_mul"]),
                                  op.Div(scores, scale, _outputs=["scaled_div"])],
                                 tag_var="scale_op")
        # softcap and the Casts are rule variants, not alternatives: an alternative that
        # starts with the same op as another leaves its first node bound when it fails
        capped = op.Mul(op.Tanh(op.Div(scaled, cap_in)), cap_out, _outputs=["capped"]) \
            if self._softcap else scaled
        probs = op.Softmax(op.Add(capped, mask), _allow_other_attributes=True,
                           _outputs=["probs"])
        for _ in range(self._casts):
            probs = op.Cast(probs, to=ir.DataType.FLOAT.value)
        context = op.Transpose(op.MatMul(probs, repeat(present_v, uv, ev, rv, "v")),
                               perm=[0, 2, 1, 3])
        if self._shape_of_context:
            # GPT-2 merges the heads to Shape(context)[0], Shape(context)[1], width: those
            # Shape nodes read the block's values, so they are part of it
            def dim(index: Any, axes: Any) -> Any:
                return op.Unsqueeze(op.Gather(op.Shape(context), index, axis=0), axes)

            so = op.Concat(dim(rest_b, rest_ab), dim(rest_s, rest_as), so, axis=0)
        out = op.Reshape(context, so, _allow_other_attributes=True)
        return out, present_k, present_v

    def check(self, op: Any, q: ir.Value, k: ir.Value, v: ir.Value, past_k: ir.Value,
              past_v: ir.Value, mask: ir.Value, scale: ir.Value, probs: ir.Value,
              **rest: Any) -> MatchResult:
        result = MatchResult()
        for past in (past_k, past_v):
            if not identity_of(past).is_graph_input():
                # e.g. transformers' sliding-window cache, which keeps only the last tokens
                return result.fail("its past keys/values are not the graph's KV cache inputs "
                                   "as fed (the model trims or rewrites them first)")
        found = self._layout(q, k, v, past_k, past_v, rest)
        if isinstance(found, str):
            return result.fail(found)
        scores = scores_refusal(scale, probs)
        if scores is not None:
            return result.fail(scores)
        if rest.get("capped") is not None and \
                (scalar_of(rest.get("cap_in")) is None or
                 scalar_of(rest.get("cap_in")) != scalar_of(rest.get("cap_out"))):
            return result.fail("its scores are soft-capped by different or varying values")
        window = self._probe.window(mask)
        if isinstance(window, str):
            return result.fail(window)
        if rest.get("q_rot") is not None and not rest["pos"].is_graph_input():
            return result.fail("its rotary positions are not the graph's position_ids")
        return result

    def _layout(self, q: ir.Value, k: ir.Value, v: ir.Value, past_k: ir.Value,
                past_v: ir.Value, rest: dict[str, Any]) -> dict[str, Any] | str:
        """Head counts, head size and rotary width, or why GroupQueryAttention can't take them."""
        dims = _kv_dims(identity_of(past_k))
        if dims is None:
            return "its KV cache inputs do not declare the KV heads and head size"
        kv_heads, head = dims
        widths = [_width(x) for x in (q, k, v)]
        if None in widths:
            return ("a q/k/v projection is not a MatMul or Gemm by a constant weight (fuse "
                    "before quantizing)")
        wq, wk, wv = (int(w or 0) for w in widths)
        if wk != kv_heads * head or wv != wk or wq % head or (wq // head) % kv_heads:
            return "its q/k/v widths do not divide into the KV cache's heads"
        found: dict[str, Any] = {"heads": wq // head, "kv_heads": kv_heads, "rotary": 0}
        q_rot, k_rot = rest.get("q_rot"), rest.get("k_rot")
        if (q_rot is None) != (k_rot is None):
            return "only one of q and k has a rotary embedding"
        if q_rot is not None:
            cache = const_array(rest.get("cos"))
            if cache is None or cache.ndim != 2:
                return "its rotary cache is not a constant table"
            rotary = 2 * cache.shape[1]
            for rot in (q_rot, k_rot):
                node = rot.producer()  # type: ignore[union-attr]
                assert node is not None
                if node.attributes.get_int("interleaved", 0):
                    return "its rotary embedding is interleaved"
                if node.attributes.get_int("rotary_embedding_dim", 0) not in (0, rotary):
                    return "its rotary embedding rotates a different width than its cache"
            if rotary < head and (rotary // 2) % (_GQA_ROTARY_STEP // 2):
                return (f"partial rotary over {rotary} of {head} dims: GroupQueryAttention "
                        f"rotates a multiple of {_GQA_ROTARY_STEP} dims only")
            found["rotary"] = rotary
        for tag in ("q", "k"):
            gamma = rest.get(f"{tag}_norm") or rest.get(f"{tag}_norm_t")
            if gamma is not None:
                node = gamma.producer()
                weight = const_array(node.inputs[1])
                if weight is None or weight.shape != (head,) or \
                        node.attributes.get_int("axis", -1) not in (-1, 3):
                    return f"its {tag} norm is not over each head by a constant weight"
        return found

    def rewrite(self, op: Any, q: ir.Value, k: ir.Value, v: ir.Value, past_k: ir.Value,
                past_v: ir.Value, mask: ir.Value, scale: ir.Value, **rest: Any) -> Any:
        found = self._layout(q, k, v, past_k, past_v, rest)
        assert not isinstance(found, str)
        window = self._probe.window(mask)
        value = float(scalar_of(scale) or 1.0)
        if rest.get("scaled_div") is not None:
            value = 1.0 / value
        seqlens, length = shared_lengths(op, self._shared, mask)
        head = _kv_dims(identity_of(past_k))[1]  # type: ignore[index]
        q = _normed(op, q, rest.get("q_norm") or rest.get("q_norm_t"), found["heads"], head)
        k = _normed(op, k, rest.get("k_norm") or rest.get("k_norm_t"), found["kv_heads"], head)
        inputs = [q, k, v, identity_of(past_k), identity_of(past_v), seqlens, length]
        attrs: dict[str, Any] = {"num_heads": found["heads"], "kv_num_heads": found["kv_heads"],
                                 "scale": value}
        if found["rotary"]:
            inputs += [rest["cos"], rest["sin"]]
            attrs.update(do_rotary=1, rotary_interleaved=0)
        if rest.get("capped") is not None:
            attrs["softcap"] = float(scalar_of(rest["cap_in"]) or 0.0)
        if isinstance(window, int) and window:
            attrs["local_window_size"] = window
        return op.GroupQueryAttention(*inputs, **attrs, _domain="com.microsoft", _outputs=3)


def _normed(op: Any, x: ir.Value, norm: ir.Value | None, heads: int, head: int) -> Any:
    """``x`` [B, S, heads·head] with the q/k norm of each head applied, as GroupQueryAttention
    reads it (a per-head norm is the same before or after the heads' Transpose)."""
    if norm is None:
        return x
    node = norm.producer()
    assert node is not None
    split = op.Reshape(x, op.initializer(ir.tensor(np.array([0, 0, heads, head], np.int64),
                                                   name=f"fuse.heads_{heads}x{head}")))
    normed = op.SimplifiedLayerNormalization(
        split, node.inputs[1], axis=-1, epsilon=node.attributes.get_float("epsilon", 1e-5),
        stash_type=1)
    return op.Reshape(normed, op.initializer(ir.tensor(np.array([0, 0, heads * head], np.int64),
                                                       name=f"fuse.merge_{heads * head}")))


class PartialRotaryRule(pattern.RewriteRuleClassBase):
    """Concat(RotaryEmbedding(x[..., :d]), x[..., d:]) → RotaryEmbedding(x) rotating d dims
    (Phi's ``partial_rotary_factor``)."""

    def pattern(self, op: Any, x: Any, pos: Any, cos: Any, sin: Any, s0: Any, e0: Any,
                a0: Any, t0: Any, s1: Any, e1: Any, a1: Any, t1: Any) -> Any:
        rotated = op.RotaryEmbedding(op.Slice(x, s0, e0, a0, t0), pos, cos, sin,
                                     _domain="com.microsoft", _allow_other_attributes=True,
                                     _outputs=["rot"])
        return op.Concat(rotated, op.Slice(x, s1, e1, a1, t1), axis=-1)

    def check(self, op: Any, x: ir.Value, cos: ir.Value, s0: ir.Value, e0: ir.Value,
              a0: ir.Value, t0: ir.Value, s1: ir.Value, e1: ir.Value, a1: ir.Value,
              t1: ir.Value, rot: ir.Value, **_: Any) -> MatchResult:
        result = MatchResult()
        cache = const_array(cos)
        node = rot.producer()
        assert node is not None
        if cache is None or cache.ndim != 2 or node.attributes.get_int("interleaved", 0) != 0 \
                or node.attributes.get_int("rotary_embedding_dim", 0) != 0:
            return result.fail("the rotary part is not a plain rotary embedding")
        rotary = 2 * cache.shape[1]
        if ints_of(a0) not in ([3], [-1]) or ints_of(a1) not in ([3], [-1]) or \
                ints_of(t0) != [1] or ints_of(t1) != [1]:
            return result.fail("the rotary part is not sliced from the head's last axis")
        # the split point: ``rotary`` or, as Phi-3 writes it, cos.shape[-1] computed in the
        # graph (the rotary part is multiplied by cos, so it is that wide when it runs)
        if ints_of(s0) != [0] or (ints_of(e1) or [0])[0] <= rotary or not (
                _index_root(e0) is _index_root(s1) or ints_of(e0) == ints_of(s1) == [rotary]):
            return result.fail("the rotary part is not the first dims of each head")
        return result

    def rewrite(self, op: Any, x: ir.Value, pos: ir.Value, cos: ir.Value, sin: ir.Value,
                **_: Any) -> Any:
        rotary = 2 * const_array(cos).shape[1]  # type: ignore[union-attr]
        # for a 4-D input onnxruntime takes the heads from its shape; the attribute must be set
        return op.RotaryEmbedding(x, pos, cos, sin, interleaved=0, rotary_embedding_dim=rotary,
                                  num_heads=1, _domain="com.microsoft")


def _index_root(value: ir.Value) -> ir.Value:
    """``value`` before the Unsqueezes and Casts torch's exporter puts on a slice bound."""
    producer = value.producer()
    while producer is not None and producer.op_type in ("Unsqueeze", "Cast") and \
            producer.inputs[0] is not None:
        value = producer.inputs[0]
        producer = value.producer()
    return value


class SkipLayerNormRule(pattern.RewriteRuleClassBase):
    """residual Add + LayerNormalization (GPT-2, Phi) → SkipLayerNormalization
    (com.microsoft), whose 4th output is the sum the next residual reads."""

    def pattern(self, op: Any, a: Any, b: Any, gamma: Any, beta: Any) -> Any:
        total = op.Add(a, b)
        normalized = op.LayerNormalization(total, gamma, beta, _allow_other_attributes=True,
                                           _outputs=["norm"])
        return normalized, total

    def check(self, op: Any, a: ir.Value, b: ir.Value, gamma: ir.Value, beta: ir.Value,
              norm: ir.Value, **_: Any) -> MatchResult:
        result = MatchResult()
        node = norm.producer()
        assert node is not None
        if node.attributes.get_int("axis", -1) != -1 or \
                node.attributes.get_int("stash_type", 1) != 1:
            return result.fail("the layer norm is not over the last axis in float")
        for weight in (gamma, beta):
            array = const_array(_through_float(weight))
            if array is None or array.ndim != 1:
                return result.fail("the layer norm's weight or bias is not a constant vector")
        if const_array(a) is not None or const_array(b) is not None:
            return result.fail("one side of the residual Add is a constant (a bias, not a skip)")
        return result

    def rewrite(self, op: Any, a: ir.Value, b: ir.Value, gamma: ir.Value, beta: ir.Value,
                norm: ir.Value, **_: Any) -> Any:
        node = norm.producer()
        assert node is not None
        normalized, _mean, _inv_std, total = op.SkipLayerNormalization(
            a, b, gamma, beta, epsilon=node.attributes.get_float("epsilon", 1e-5), _outputs=4,
            _domain="com.microsoft")
        return normalized, total


class OffsetRmsNormRule(RmsNormRule):
    """Gemma's RMSNorm weighted by ``(1 + w)`` as an export writes it when it does not fold
    constants: the sum becomes the SimplifiedLayerNormalization's weight."""

    # onnxscript names a pattern's variables after its parameters: the signatures differ
    def pattern(self, op: Any, x: Any, two: Any, axes: Any, epsilon: Any,  # type: ignore[override]
                one: Any, w: Any, offset: Any) -> Any:
        return super().pattern(op, x, two, axes, epsilon, one, op.Add(w, offset))

    def check(self, op: Any, x: ir.Value, two: ir.Value,  # type: ignore[override]
              epsilon: ir.Value, w: ir.Value, offset: ir.Value, mean: ir.Value,
              **rest: Any) -> MatchResult:
        if scalar_of(offset) is None:
            return MatchResult().fail("the weight is offset by a value that is not a constant")
        return super().check(op, x, two, epsilon, w, mean, **rest)

    def rewrite(self, op: Any, x: ir.Value, epsilon: ir.Value,  # type: ignore[override]
                w: ir.Value, offset: ir.Value, **_: Any) -> Any:
        weight = const_array(_through_float(w))
        assert weight is not None
        total = (weight.astype(np.float32) + np.float32(scalar_of(offset))).astype(np.float32)
        scale = op.initializer(ir.tensor(total, name=f"{w.name}.offset"))
        return op.SimplifiedLayerNormalization(x, scale, axis=-1, epsilon=scalar_of(epsilon),
                                               stash_type=1)


def norm_rules() -> list[Any]:
    return [variant for reciprocal in (False, True) for axes_input in (False, True)
            for variant in OffsetRmsNormRule.rule(
                f"OffsetRmsNorm[{'recip' if reciprocal else 'div'},"
                f"{'axes-in' if axes_input else 'axes-attr'}]", reciprocal=reciprocal,
                axes_input=axes_input, out_cast=False, scale_first=False).commute()]


def rotary_rules() -> list[Any]:
    return [PartialRotaryRule.rule("PartialRotary")]


def _attention_nodes(node: ir.Node, softcap: bool, casts: int,
                     shape_of_context: bool) -> list[ir.Node] | None:
    """The nodes a variant's three outputs would be (the heads merged, the present K and V
    Concats) when ``node`` merges the heads of Softmax(·)·V as the variant does; else None."""
    if node.op_type != "Reshape":
        return None
    transpose = producer_of(node.inputs[0], "Transpose")
    context = None if transpose is None else producer_of(transpose.inputs[0], "MatMul")
    probs = None if context is None else context.inputs[0]
    for _ in range(casts):
        cast = producer_of(probs, "Cast")
        probs = None if cast is None else cast.inputs[0]
    softmax = producer_of(probs, "Softmax")
    add = None if softmax is None else producer_of(softmax.inputs[0], "Add")
    if context is None or add is None:
        return None
    muls = [mul for mul in (producer_of(x, "Mul") for x in add.inputs) if mul is not None]
    if any(producer_of(x, "Tanh") is not None for mul in muls for x in mul.inputs) != softcap:
        return None
    concat = producer_of(node.inputs[1], "Concat")
    if shape_of_context and (concat is None or
                             not any(producer_of(x, "Unsqueeze") for x in concat.inputs)):
        return None
    qk = next((m for m in map(_scores_of, add.inputs) if m is not None), None)
    keys = None if qk is None else producer_of(qk.inputs[1], "Transpose")
    present_k = None if keys is None else _present(keys.inputs[0])
    present_v = _present(context.inputs[1])
    if present_k is None or present_v is None:
        return None
    return [node, present_k, present_v]


def _scores_of(value: ir.Value | None) -> ir.Node | None:
    """The q·kᵀ MatMul behind the scale and the softcap (Mul, Div, Tanh)."""
    for _ in range(5):
        producer = None if value is None else value.producer()
        if producer is None:
            return None
        if producer.op_type == "MatMul":
            return producer
        if producer.op_type not in ("Mul", "Div", "Tanh"):
            return None
        value = next((x for x in producer.inputs if const_array(x) is None), None)
    return None


def _present(value: ir.Value | None) -> ir.Node | None:
    """The past Concat behind repeat_kv (Unsqueeze/Expand/Reshape) or without it."""
    reshape = producer_of(value, "Reshape")
    expand = None if reshape is None else producer_of(reshape.inputs[0], "Expand")
    unsqueeze = None if expand is None else producer_of(expand.inputs[0], "Unsqueeze")
    if unsqueeze is not None:
        value = unsqueeze.inputs[0]
    return producer_of(value, "Concat")


class _Candidates:
    """The graph as onnxscript's matcher sees it, iterated as a few nodes only: for a pattern
    with several outputs, the matcher tries every combination of the graph's nodes of the
    other outputs' op types (every Concat of the model, squared, for each attention block)."""

    def __init__(self, graph: ir.Graph, nodes: list[ir.Node]) -> None:
        self.graph = graph
        self._nodes = nodes

    def __iter__(self) -> Any:
        return iter(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.graph, name)


def _focused(rule: Any, find: Any) -> Any:
    """``rule`` tried only where ``find`` locates its output nodes, and against those only."""
    tried = rule.try_rewrite

    def try_rewrite(model: Any, graph: Any, node: ir.Node, **kwargs: Any) -> Any:
        nodes = find(node)
        if nodes is None:
            return None
        return tried(model, _Candidates(graph, nodes), node, **kwargs)

    rule.try_rewrite = try_rewrite
    return rule


def _skip_nodes(node: ir.Node) -> list[ir.Node] | None:
    add = producer_of(node.inputs[0], "Add") if node.op_type == "LayerNormalization" else None
    return None if add is None else [node, add]


def skip_rules() -> list[Any]:
    return [_focused(variant, _skip_nodes)
            for variant in SkipLayerNormRule.rule("SkipLayerNorm").commute()]


def attention_rules(shared: Shared, probe: MaskProbe) -> list[Any]:
    # rotary with or without softcap (Llama, Phi, Gemma 2/3), and neither (GPT-2, which also
    # merges the heads to the context's own shape)
    rules = []
    for rope, softcap, shape in ((True, False, False), (True, True, False), (False, False, True),
                                 (False, False, False)):
        for casts in (0, 1, 2):
            name = (f"FamilyGQA[{'rope,' if rope else ''}{'softcap,' if softcap else ''}"
                    f"{'context shape,' if shape else ''}{casts} casts]")
            rule = FamilyGqaRule.rule(name, rope=rope, softcap=softcap, casts=casts,
                                      shape_of_context=shape, shared=shared, probe=probe)
            rules += [_focused(variant, lambda node, c=casts, s=softcap, sh=shape:
                               _attention_nodes(node, s, c, sh)) for variant in rule.commute()]
    return rules
