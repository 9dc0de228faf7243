"""Fuse the chosen layers' norms, rotary embeddings and attention into onnxruntime's kernels.

An HF/optimum export of a decoder runs every RMSNorm as eight or nine small kernels, every
rotary embedding as seven (on top of the cos/sin tables it computes again in every step), and
every attention block as some eighty (shapes, reshapes, repeat_kv, mask, Softmax). This pass
rewrites them, unit by unit, into onnxruntime's contrib ops:

- RMSNorm → ``SimplifiedLayerNormalization`` (onnxruntime registers it in the default domain);
- residual Add + RMSNorm → ``SkipSimplifiedLayerNormalization`` (com.microsoft), which also
  gives the sum the next residual reads;
- rotate_half with cos/sin from position_ids → ``RotaryEmbedding`` (com.microsoft) reading
  cos/sin caches of ``max_positions`` rows made once, and the graph's own position_ids;
- with ``attention`` (the default), the attention block from the q/k/v projections' outputs to
  the merged heads → ``GroupQueryAttention`` (com.microsoft) with the rotary inside, reading the
  same past and writing the same present tensors; seqlens_k and the total length are computed
  once from attention_mask for all layers. GroupQueryAttention places each new token after the
  mask's count of past tokens, as position_ids do for one unpadded sequence (what a generation
  loop feeds); a padded batch, where position_ids and the mask say otherwise, is not kept.

The matching is onnxscript's rewriter with the rules of ``_fusion_rules`` (its ``ort_fusions``
rules extended for the exporter's forms) and, for Mistral, Gemma, Phi and GPT-2, of
``_fusion_families`` (sliding windows and softcap as GroupQueryAttention attributes, q/k norms,
partial rotary, LayerNorm with its residual → SkipLayerNormalization). What a kernel cannot
express exactly is refused for that layer, with the layer and the reason. The math is the same up to float rounding; the model's
inputs, outputs and KV layout do not change. The q/k/v, o and MLP projections stay MatMuls, so
a later quantization step still takes them.

A unit is what one fused kernel replaces. Naming any node of a unit fuses the whole unit (a
layer's norm with its residual Add, a layer's attention, or without ``attention`` the rotary
embedding of q or k); a node in no unit is refused with the reason. Each fused node records
every original node it replaced, so a profile reports its time against all of them; the nodes
that only computed shapes for the replaced ones go with them.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import onnx

from opstudio.core.model import provenance
from opstudio.core.passes.base import ParamSpec, Pass, PassContext, PassResult, ScanParams

_MAX_POSITIONS = 8192


_FUSED_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
              "RotaryEmbedding", "GroupQueryAttention", "SkipLayerNormalization")


class FusePass(Pass):
    technique = "fuse"
    label = "Fuse"
    description = ("rewrite the chosen layers' RMSNorms, residual Adds, rotary embeddings and "
                   "attention into onnxruntime's fused kernels (same math)")
    params = (
        ParamSpec("max_positions", "int", _MAX_POSITIONS, "Rotary cache length",
                  "rows of the cos/sin caches a fused rotary embedding reads: the longest "
                  "position the model can then be run at", minimum=16, maximum=1 << 20),
        ParamSpec("attention", "bool", True, "Fuse attention",
                  "also fuse each attention block (projections' outputs to the merged heads, "
                  "RoPE, past Concat, repeat_kv, mask, Softmax) into GroupQueryAttention; off: "
                  "norms and rotary embeddings only"),
        ParamSpec("pack", "bool", True, "Pack projections",
                  "also pack a fused attention's q, k and v projections into one MatMul, and "
                  "a SiLU MLP's gate and up projections into one MatMul and a Split"),
    )
    # first: the attention rule reads the q/k/v projections' float weights (for the head
    # counts), which a quantizer or pruner would have rewritten
    plan_order = 5
    scan_params: ClassVar[ScanParams | None] = None
    helps_when = "memory"
    because = "one fused kernel replaces eight or more small ones and their launch overhead"
    colour = "#16a085"
    slow_check = True  # the first check fuses the whole model to find its units
    creates = frozenset(_FUSED_OPS)

    def check(self, model: onnx.ModelProto, node: onnx.NodeProto,
              params: Mapping[str, Any] | None = None) -> str | None:
        given = self.given_params(params)
        units, reasons = _units(model, int(given["max_positions"]), bool(given["attention"]),
                                bool(given["pack"]))
        if node.name in units:
            return None
        if node.name in reasons:
            return reasons[node.name]
        if node.domain not in ("", "ai.onnx"):
            return f"{node.domain}:{node.op_type} is already a fused kernel"
        return ("not part of an RMSNorm, a residual Add before one, a rotary embedding or "
                "(with attention) an attention block this pass recognises")

    def _rewrite(self, work: onnx.ModelProto, chosen: Sequence[str], params: Mapping[str, Any],
                 ctx: PassContext) -> PassResult:
        max_positions, attention = int(params["max_positions"]), bool(params["attention"])
        pack = bool(params["pack"])
        units, reasons = _units(work, max_positions, attention, pack)
        allowed: set[str] = set()
        for name in chosen:
            allowed |= units[name]
        ctx.report(0.1, f"fuse: matching {len(chosen)} node(s)")
        ctx.check_cancelled()
        made: list[set[str]] = []
        fused, counts = _fuse(work, max_positions, attention, allowed, pack=pack, made=made)
        result = PassResult(model=fused)
        replaced = set().union(*made)
        result.applied = [name for name in chosen if name in replaced]
        for name in chosen:
            if name not in result.applied:
                result.skipped[name] = "the unit could not be fused together with the others"
        before = len(work.graph.node)
        result.notes.append(
            f"{', '.join(f'{n} {kind}' for kind, n in sorted(counts.items()))}: "
            f"{before} → {len(fused.graph.node)} nodes")
        refused = {name: reason for name, reason in reasons.items() if name not in units}
        result.notes.extend(f"not fused: {reason}" for reason in refused_in_layers(refused, chosen))
        for name in result.applied:
            result.details[name] = {"unit": len(units[name])}
        return result


# model key -> (node name -> the original nodes of its unit, node name -> why its pattern was
# refused); the app asks ``check`` node by node
_Units = tuple[dict[str, frozenset[str]], dict[str, str]]
_UNIT_CACHE: dict[tuple[str, int, bool, bool], _Units] = {}


def _model_key(model: onnx.ModelProto) -> str:
    """Changes with any node (attributes and Constant values too) and any small initializer,
    which is what decides a unit; big weights by name and dims only (cheap on a large model)."""
    digest = hashlib.blake2b(digest_size=16)
    for node in model.graph.node:
        digest.update(node.SerializeToString())
    for tensor in model.graph.initializer:
        if math.prod(tensor.dims) <= 4096:
            digest.update(tensor.SerializeToString())
        else:
            digest.update(f"{tensor.name}{list(tensor.dims)}".encode())
    return digest.hexdigest()


def _units(model: onnx.ModelProto, max_positions: int, attention: bool,
           pack: bool = True) -> _Units:
    """Node name -> the names of the unit it belongs to (fusing everything possible once), and
    for nodes of a pattern that matched but was refused, the reason. Rewrites that build on one
    another (an attention whose projections are then packed) make one unit."""
    key = (_model_key(model), max_positions, attention, pack)
    found = _UNIT_CACHE.get(key)
    if found is None:
        refusals = _Refusals()
        made: list[set[str]] = []
        _fuse(model, max_positions, attention, None, refusals, pack=pack, made=made)
        units: dict[str, frozenset[str]] = {}
        for group in made:
            unit = frozenset(group).union(*(units.get(name, frozenset()) for name in group))
            for name in unit:
                units[name] = unit
        found = (units, refusals.reasons)
        if len(_UNIT_CACHE) > 8:
            _UNIT_CACHE.clear()
        _UNIT_CACHE[key] = found
    return found


def fusable_nodes(model: onnx.ModelProto, attention: bool = True,
                  max_positions: int = _MAX_POSITIONS, pack: bool = True) -> list[str]:
    """Every node of every unit the pass can fuse (one matching of the whole model; asking
    ``check`` node by node hashes the model once a node)."""
    return sorted(_units(model, max_positions, attention, pack)[0])


def fusable_units(model: onnx.ModelProto, attention: bool = True,
                  max_positions: int = _MAX_POSITIONS, pack: bool = True) -> list[list[str]]:
    """The units the pass can fuse, each the original nodes one kernel (or rewrites building
    on one another) replaces: naming any of them fuses them all."""
    units = set(_units(model, max_positions, attention, pack)[0].values())
    return sorted(sorted(unit) for unit in units)


class _Refusals:
    """Hears onnxscript's matcher (its tracer interface): a pattern that matched whole but whose
    check refused it gives its reason to each node it covered."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}

    def log(self, rule: Any, container: Any, node: Any, match: Any, status: Any) -> None:
        from onnxscript.rewriter._basics import MatchStatus

        if status == MatchStatus.CONDITION_FAILED and match.reason:
            names = [name for matched in match.nodes for name in _origins(matched)]
            reason = f"{_unit_of(names, getattr(rule, 'name', '') or '')}: {match.reason}"
            # the last rule's: the families' rules, tried after the Llama layout's, are the
            # more general ones, and say more about a block that neither takes
            for name in names:
                self.reasons[name] = reason


_LAYER = re.compile(r"(?:layers|layer|h|blocks|block)\.(\d+)[/.]")
_UNITS = (("GQA", "attention"), ("Rotary", "rotary embedding"), ("Skip", "residual norm"),
          ("Norm", "norm"))


def _unit_of(names: Sequence[str], rule: str) -> str:
    """"layer 3 attention", from the matched nodes' names (torch's exporter scopes them by
    module) and the rule that refused them."""
    unit = next((words for key, words in _UNITS if key in rule), "pattern")
    layers = sorted({int(m.group(1)) for name in names if (m := _LAYER.search(name))})
    return f"layer {layers[0]} {unit}" if len(layers) == 1 else unit


def refused_in_layers(reasons: Mapping[str, str], chosen: Sequence[str]) -> list[str]:
    """The refusals of the chosen nodes' layers, each once, for the step's notes."""
    layers = {m.group(1) for name in chosen if (m := _LAYER.search(name))}
    found: list[str] = []
    for name, reason in reasons.items():
        m = _LAYER.search(name)
        if m and m.group(1) in layers and reason not in found:
            found.append(reason)
    return sorted(found)


def _fuse(model: onnx.ModelProto, max_positions: int, attention: bool,
          allowed: set[str] | None, refusals: _Refusals | None = None, *, pack: bool = False,
          made: list[set[str]] | None = None) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The model with every unit whose nodes are all in ``allowed`` (None: every unit) fused,
    and how many of each fused op were made; ``made`` gets the original nodes of each rewrite
    kept. ``model`` is not changed."""
    import onnx_ir as ir

    from opstudio.core.model.model_io import lazy_folders
    from opstudio.core.passes import _fusion_families as families
    from opstudio.core.passes import _fusion_rules as rules
    from opstudio.core.passes._packing_rules import packing_rules

    irmodel = ir.serde.deserialize_model(model)
    # a model opened lazily (``optimize`` checks a recipe on it before reading its weights)
    # keeps its weights in its file, where the rules read the projections' from
    for name, folder in lazy_folders(model).items():
        value = irmodel.graph.initializers.get(name)
        if value is not None and isinstance(value.const_value, ir.ExternalTensor):
            value.const_value.base_dir = folder
    counts: dict[str, int] = {}
    shared = rules.Shared()
    probe = families.MaskProbe(irmodel, max_positions)
    shared.mask_refusal = probe.refusal
    # the norms before the skip rule, which reads the norm they became; rotary before the
    # attention rule, which reads the RotaryEmbedding it became; the families' rules after the
    # Llama layout's, which they would also match
    # the rotary rules again after the norms: a q/k norm (Gemma 3) is known to give float only
    # once it is fused
    rotary = rules.rotary_rules(max_positions) + families.rotary_rules()
    rulesets = [rotary, rules.norm_rules() + families.norm_rules(), rules.skip_rules(),
                families.skip_rules(), rotary]
    if attention:
        rulesets.append(rules.attention_rules(shared) + families.attention_rules(shared, probe))
    if pack:  # after attention: q|k|v are packed into the GroupQueryAttention it made
        rulesets.append(packing_rules())
    live_before = _live(irmodel.graph)
    read_before = {name for name, value in irmodel.graph.initializers.items() if value.uses()}
    kept: list[tuple[str, set[str]]] = []
    for ruleset in rulesets:
        kept += _apply(irmodel, ruleset, allowed, shared, refusals)
        # what the fused kernels no longer read (the cos/sin tables, rotate_half's Shape/2,
        # the attention's shapes and mask): gone before the next rules, which would see those
        # readers as other uses of the values they match
        _drop_dead(irmodel.graph, live_before)
    irmodel.graph.sort()
    outputs = {v.name for v in irmodel.graph.outputs}
    for name in [name for name, value in irmodel.graph.initializers.items()
                 if name in read_before and not value.uses() and name not in outputs]:
        del irmodel.graph.initializers[name]
    for node in irmodel.graph:
        if node.op_type in _FUSED_OPS and provenance.ORIGIN_KEY in node.metadata_props:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    for rule, _ in kept:
        if rule.startswith("Pack"):
            kind = "packed q|k|v" if rule.startswith("PackQKV") else "packed gate|up"
            counts[kind] = counts.get(kind, 0) + 1
    if made is not None:
        made.extend(group for _, group in kept)
    return ir.serde.serialize_model(irmodel), counts


def _live(graph: Any) -> set[int]:
    """ids of the nodes the graph's outputs depend on (all nodes when a subgraph reads outer
    values, which ``inputs`` does not show)."""
    if any(attr.type in (ir_types().GRAPH, ir_types().GRAPHS)
           for node in graph for attr in node.attributes.values()):
        return {id(node) for node in graph}
    live: set[int] = set()
    stack = [v.producer() for v in graph.outputs]
    while stack:
        node = stack.pop()
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return live


def ir_types() -> Any:
    import onnx_ir as ir

    return ir.AttributeType


def _drop_dead(graph: Any, live_before: set[int]) -> None:
    """Remove the nodes that fed the graph's outputs before and no longer do (never a node the
    model already had dead: that is not this pass's to remove)."""
    live = _live(graph)
    dead = [node for node in graph if id(node) in live_before and id(node) not in live]
    if dead:
        graph.remove(dead, safe=True)


def _origins(node: Any) -> list[str]:
    recorded = node.metadata_props.get(provenance.ORIGIN_KEY)
    return recorded.split(",") if recorded else [node.name or ""]


def _apply(irmodel: Any, ruleset: list[Any], allowed: set[str] | None, shared: Any,
           refusals: _Refusals | None = None) -> list[tuple[str, set[str]]]:
    """Rewrites with ``ruleset`` what ``allowed`` lets; returns each kept rewrite's rule name
    and the original nodes it replaced."""
    from onnx_ir import convenience

    kept: list[tuple[str, set[str]]] = []
    graph = irmodel.graph
    taken = {node.name for node in graph}
    # a match is anchored at one of a pattern's output nodes: trying only the rules one of
    # whose outputs is this node's op saves most of a large model's matching time
    anchors = [(rule, {p.op_type for p in rule._target_pattern.output_nodes})
               for rule in ruleset]
    for node in graph:
        for rule, ops in anchors:
            if node.op_type not in ops:
                continue
            delta = rule.try_rewrite(irmodel, graph, node, tracer=refusals)
            if delta is None:
                continue
            origins: list[str] = []
            for matched in sorted(delta.match.nodes, key=lambda n: n.name or ""):
                origins.extend(o for o in _origins(matched) if o not in origins)
            if allowed is not None and not set(origins) <= allowed:
                shared.drop()
                continue
            shared.keep()
            kept.append((rule.name, set(origins)))
            # the rotary caches are made once and shared, maybe first by a match not taken
            for new in delta.new_nodes:
                for value in new.inputs:
                    if value is not None and value.const_value is not None and \
                            value.producer() is None and value.name not in graph.initializers:
                        graph.initializers[value.name] = value
            # named in the module of the node the result replaces (the norm, not the Add)
            scope = (node.name or "").rsplit("/", 1)[0] or "/fuse"
            replaced = {m.name: m.op_type for m in delta.match.nodes}
            for new in delta.new_nodes:
                # a rule may name its nodes (``qkv_proj/MatMul``; a kernel it rewires by the
                # name it had) and say which of the matched nodes each stands for; otherwise
                # each stands for all of them
                base = f"{scope}/{new.name or new.op_type}"
                name, suffix = base, 0
                if new.name and replaced.get(base) == new.op_type:
                    taken.discard(base)
                while name in taken:
                    suffix += 1
                    name = f"{base}_{suffix}"
                taken.add(name)
                new.name = name
                for i, out in enumerate(new.outputs):
                    if not out.name:
                        out.name = f"{name}_output_{i}"
                if provenance.ORIGIN_KEY not in new.metadata_props:
                    new.metadata_props[provenance.ORIGIN_KEY] = ",".join(origins)
            convenience.replace_nodes_and_values(graph, node, delta.match.nodes, delta.new_nodes,
                                                 delta.match.outputs, delta.new_outputs)
            break
    return kept


PASS = FusePass()
