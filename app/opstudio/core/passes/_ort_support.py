"""What the passes built on onnxruntime's rewriters share.

onnxruntime's quantizers and float16 converter rewrite a whole model at once and know nothing of
opstudio's provenance. The helpers here prepare a model for them (weights held in ``Constant``
nodes become initializers, which the quantizers require) and tidy their result: every node gets a
unique name, every created node records the original node it came from, nodes are put back in
topological order, and the temp files they write stay in a private folder that is removed.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from opstudio.core.errors import OpstudioError
from opstudio.core.model import provenance
from opstudio.core.model.graph_utils import consumers, node_reads, nodes_by_name, topo_sort
from opstudio.core.model.model_io import tensor_array
from opstudio.core.model.tensors import tensor_nbytes
from opstudio.core.passes._weights import (
    FOLDABLE,
    all_names,
    append_initializer,
    constant_array,
    declare_initializers,
    remove_unused,
    tensor_index,
    unique_name,
)
from opstudio.core.passes.base import RewriterFailed
from opstudio.core.tempdir import opstudio_tempdir

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


@contextlib.contextmanager
def private_workdir(workdir: str | None = None) -> Iterator[Path]:
    """A fresh folder for a rewriter's files, removed afterwards (even on error).

    Inside ``workdir`` when the caller gives one, else in opstudio's own temp folder.
    """
    if workdir is None:
        with opstudio_tempdir(prefix="pass-") as folder:
            yield Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix="pass-", dir=workdir) as folder:
        yield Path(folder)


@contextlib.contextmanager
def ort_rewriter(tool: str, advice: str) -> Iterator[None]:
    """Run one of onnxruntime's rewriters: its unexpected failure (it raises anything, from
    onnx's version converter's ``ConvertError`` to a bare ``KeyError``) becomes
    :class:`RewriterFailed` naming ``tool``, its first line and ``advice``."""
    from opstudio.core.errors import Cancelled

    try:
        yield
    except (OpstudioError, Cancelled):
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        first = text[0][:200] if text else ""
        raise RewriterFailed(f"{tool} failed on this model ({type(exc).__name__}"
                             + (f": {first}" if first else "") + f"); {advice}") from exc


def constant_value(model: onnx.ModelProto, tensor: str) -> tuple[np.ndarray | None, str | None]:
    """The value of ``tensor`` if it is a constant (initializer or ``Constant`` node output).

    Returns ``(array, None)`` or ``(None, why not)``.
    """
    index = tensor_index(model, tensor)
    graph = model.graph
    k = index.initializers.get(tensor)
    if k is not None and k < len(graph.initializer) and graph.initializer[k].name == tensor:
        return tensor_array(graph.initializer[k]), None
    k = index.producers.get(tensor)
    node = graph.node[k] if k is not None and k < len(graph.node) else None
    if node is not None and tensor in node.output:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            tensor_proto = _constant_tensor(node)
            if tensor_proto is None:
                return None, f"its weight comes from Constant node '{node.name}' " \
                             "without a tensor value"
            return tensor_array(tensor_proto), None
        if node.op_type in FOLDABLE and node.domain in ("", "ai.onnx"):
            # fp16 storage + Cast, a tied embedding's Transpose, DequantizeLinear: constant too
            value, _ = constant_array(model, tensor)
            if value is not None:
                return value, None
        return None, f"its weight is computed by {node.op_type} node '{node.name}' " \
                     "from something that is not a constant"
    if tensor in index.sparse:
        return None, f"its weight '{tensor}' is stored as a sparse initializer"
    if tensor in index.inputs:
        return None, f"its weight '{tensor}' is a graph input, not a constant initializer"
    return None, f"its weight '{tensor}' is not a constant initializer"


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            return attr.t
    return None


def fold_constant_inputs(model: onnx.ModelProto, node_names: Iterable[str]) -> list[str]:
    """Give the named nodes their constant inputs as initializers, in place.

    onnxruntime's quantizers only take weights stored as initializers ("Expected … to be an
    initializer"). A ``Constant`` node's tensor becomes an initializer under the same name (Paddle
    exports keep every weight in one). A weight computed from constants (fp16 storage + ``Cast``,
    a tied embedding's ``Transpose``, ``DequantizeLinear``, ``Reshape``/``Identity`` chains) is
    computed once into a fresh initializer that only the named nodes read: a source other nodes
    still read (the embedding ``Gather`` of a tied lm_head) stays as it was, and a chain nothing
    reads any more is removed. Returns the names of the tensors folded.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {i.name for i in graph.initializer}
    wanted = set(node_names)
    taken = all_names(graph)
    folded: list[str] = []
    fresh: dict[str, str] = {}  # computed tensor -> its new initializer
    for node in list(graph.node):
        if node.name not in wanted:
            continue
        for k, name in enumerate(node.input):
            producer = producers.get(name)
            if not name or name in initializers or producer is None \
                    or producer.domain not in ("", "ai.onnx"):
                continue
            if producer.op_type == "Constant":
                tensor = _constant_tensor(producer)
                if tensor is None:
                    continue
                init = onnx.TensorProto()
                init.CopyFrom(tensor)
                init.name = name
                append_initializer(model, init)
                initializers.add(name)
                graph.node.remove(producer)
                folded.append(name)
                continue
            if producer.op_type not in FOLDABLE:
                continue
            if name not in fresh:
                value, _ = constant_array(model, name)
                if value is None:
                    continue
                fresh[name] = unique_name(taken, f"{name}_folded")
                append_initializer(model, numpy_helper.from_array(np.ascontiguousarray(value),
                                                                  fresh[name]))
                folded.append(name)
            node.input[k] = fresh[name]
    if fresh:
        remove_unused(model, list(fresh))
    return folded


def gemm_problem(model: onnx.ModelProto, node: onnx.NodeProto) -> str | None:
    """Why ``gemm_to_matmul`` cannot rewrite this Gemm, or ``None``."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0):
        return "Gemm with transA=1 (its input is transposed)"
    if len(node.input) < 2:
        return "Gemm node has no weight input"
    value, why = constant_value(model, node.input[1])
    if value is None:
        return why
    if len(node.input) > 2 and node.input[2]:
        bias, why = constant_value(model, node.input[2])
        if bias is None:
            return f"its bias: {why}"
    return None


def gemm_to_matmul(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, str]:
    """Rewrite the named Gemms as ``MatMul(A, alpha·op(B))`` (+ ``Add(beta·C)``), in place.

    onnxruntime's dynamic and MatMulNBits quantizers only know MatMul, while exporters write
    ``nn.Linear`` on 2-D inputs as Gemm. The new nodes carry the Gemm's name (``<gemm>_matmul``,
    ``<gemm>_bias``) and its provenance. Returns Gemm name → MatMul name.
    """
    wanted = set(names)
    taken = all_names(model.graph)

    def fresh(base: str) -> str:
        return unique_name(taken, base)

    done: dict[str, str] = {}
    rebuilt: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.name not in wanted or node.op_type != "Gemm" or gemm_problem(model, node):
            rebuilt.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight, _ = constant_value(model, node.input[1])
        assert weight is not None
        if attrs.get("transB", 0):
            weight = weight.T
        weight = (weight * np.asarray(attrs.get("alpha", 1.0), weight.dtype)).astype(weight.dtype)
        w_name = fresh(f"{node.name}_weight")
        append_initializer(model, numpy_helper.from_array(np.ascontiguousarray(weight), w_name))
        origin = provenance.get_origin(node)
        has_bias = len(node.input) > 2 and bool(node.input[2])
        mm_out = fresh(f"{node.output[0]}_matmul") if has_bias else node.output[0]
        matmul = onnx.helper.make_node("MatMul", [node.input[0], w_name], [mm_out],
                                       name=fresh(f"{node.name}_matmul"))
        provenance.set_origin(matmul, origin)
        rebuilt.append(matmul)
        if has_bias:
            bias, _ = constant_value(model, node.input[2])
            assert bias is not None
            bias = (bias * np.asarray(attrs.get("beta", 1.0), bias.dtype)).astype(bias.dtype)
            b_name = fresh(f"{node.name}_bias_value")
            append_initializer(model, numpy_helper.from_array(bias, b_name))
            add = onnx.helper.make_node("Add", [mm_out, b_name], [node.output[0]],
                                        name=fresh(f"{node.name}_bias"))
            provenance.set_origin(add, origin)
            rebuilt.append(add)
        done[node.name] = matmul.name
    if done:
        del model.graph.node[:]
        model.graph.node.extend(rebuilt)
        _drop_unused_initializers(model)
    return done


def restore_gemms(before: onnx.ModelProto, result: onnx.ModelProto,
                  keep: Iterable[str]) -> list[str]:
    """Put back the Gemm nodes of ``before`` that the quantizer rewrote without being asked.

    onnxruntime's dynamic quantizer turns *every* plain Gemm of the model into ``<name>_MatMul``
    (+ ``<name>_Add``, + ``<name>_Transpose`` or a transposed weight), not only the nodes it
    quantizes. Those stay float and compute the same, but they lose their names, so a later step
    naming them finds nothing and a profile charges their time to the quantized node. Each Gemm
    in ``keep`` (the ones not chosen) is restored in place of its replacement when that
    replacement is still float and untouched. Returns the names restored."""
    keep = set(keep)
    present = {n.name for n in result.graph.node}
    restored: list[str] = []
    for gemm in before.graph.node:
        if gemm.op_type != "Gemm" or gemm.name not in keep or gemm.name in present:
            continue
        parts = {f"{gemm.name}_MatMul": "MatMul", f"{gemm.name}_Add": "Add",
                 f"{gemm.name}_Transpose": "Transpose"}
        hits = [i for i, n in enumerate(result.graph.node) if parts.get(n.name) == n.op_type]
        if not any(result.graph.node[i].op_type == "MatMul" for i in hits):
            continue  # rewritten in some other way: leave it
        drop = set(hits)
        kept = [n for i, n in enumerate(result.graph.node) if i not in drop]
        first = hits[0] - sum(1 for i in hits if i < hits[0])
        original = onnx.NodeProto()
        original.CopyFrom(gemm)
        kept.insert(first, original)
        result.graph.ClearField("node")
        result.graph.node.extend(kept)
        restored.append(gemm.name)
    if restored:
        # the quantizer dropped the weights only the replacements' transposed copies used
        have = {i.name for i in result.graph.initializer}
        have |= {o for n in result.graph.node for o in n.output}
        have |= {i.name for i in result.graph.input}
        originals = {i.name: i for i in before.graph.initializer}
        wanted = {name for n in result.graph.node if n.name in restored for name in n.input}
        for name in sorted(wanted - have):
            if name in originals:
                append_initializer(result, _copy_tensor(originals[name]))
        _drop_unused_initializers(result)
    return restored


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node_reads(node)}
    used |= {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    if len(keep) != len(model.graph.initializer):
        dropped = {i.name for i in model.graph.initializer} - {i.name for i in keep}
        keep = [_copy_tensor(t) for t in keep]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        graph_inputs = [i for i in model.graph.input if i.name not in dropped]
        del model.graph.input[:]
        model.graph.input.extend(graph_inputs)


def _copy_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    out = onnx.TensorProto()
    out.CopyFrom(tensor)
    return out




def constant_bytes(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    inits = {i.name: i for i in model.graph.initializer}
    return sum(tensor_nbytes(inits[n]) for n in dict.fromkeys(node.input) if n in inits)


def record_provenance(before: onnx.ModelProto, after: onnx.ModelProto,
                      chosen: Sequence[str]) -> dict[str, list[str]]:
    """Give every node of ``after`` a unique name and the original node(s) it came from.

    ``before`` is the model the rewriter was given, ``chosen`` the nodes it was asked to rewrite.
    A node of ``after`` whose name exists in ``before`` keeps that node's origin. A created node is
    attributed, in this order, to the chosen node its name extends (``mm0_quant`` → mm0), else to
    the chosen nodes that consume what it produces (the QuantizeLinear feeding a Conv), else to
    the chosen nodes whose output it consumes (the Cast after a float16 node). Returns the map
    created node → original node names of ``before`` (before their own provenance).
    """
    old = nodes_by_name(before.graph)
    chosen_set = set(chosen)
    new_nodes = [n for n in after.graph.node if not n.name or n.name not in old]
    source: dict[int, list[str]] = {}  # id(node) -> names of chosen nodes in `before`

    by_length = sorted(chosen_set, key=lambda s: (-len(s), s))
    for node in new_nodes:
        for name in by_length:
            if node.name.startswith(name + "_") or node.name == name:
                source[id(node)] = [name]
                break

    def mapped(node: onnx.NodeProto) -> list[str]:
        if id(node) in source:
            return source[id(node)]
        if node.name in old and node.name in chosen_set:
            return [node.name]
        return []

    cons = consumers(after.graph)
    producers = {out: node for node in after.graph.node for out in node.output if out}
    order = list(after.graph.node)
    changed = True
    while changed:
        changed = False
        # consumers first, they are the better evidence (a QuantizeLinear serves its consumer);
        # sweeping backwards carries the answer up chains (Q → DQ → Conv) in one pass
        for node in reversed(order):
            if id(node) in source or (node.name and node.name in old):
                continue
            found = [o for out in node.output for user in cons.get(out, []) for o in mapped(user)]
            if found:
                source[id(node)] = sorted(set(found))
                changed = True
        for node in order:
            if id(node) in source or (node.name and node.name in old):
                continue
            found = [o for name in node.input
                     if (p := producers.get(name)) is not None for o in mapped(p)]
            if found:
                source[id(node)] = sorted(set(found))
                changed = True
    fallback = sorted(chosen_set)
    taken = {n.name for n in after.graph.node if n.name}
    result: dict[str, list[str]] = {}
    for node in after.graph.node:
        if node.name and node.name in old:
            # a node that was there before keeps exactly what it had (rewriters drop metadata)
            had = any(p.key == provenance.ORIGIN_KEY for p in old[node.name].metadata_props)
            provenance.set_origin(node, provenance.get_origin(old[node.name]) if had else [])
            continue
        names = source.get(id(node), fallback)
        if not node.name:
            base = f"{names[0] if names else 'node'}_{node.op_type}"
            candidate, k = base, 2
            while candidate in taken:
                candidate = f"{base}_{k}"
                k += 1
            node.name = candidate
            taken.add(candidate)
        origins: list[str] = []
        for name in names:
            origins.extend(provenance.get_origin(old[name]) if name in old else [name])
        provenance.set_origin(node, origins)
        result[node.name] = list(names)
    return result


def weight_bytes(before: onnx.ModelProto, after: onnx.ModelProto,
                 created: dict[str, list[str]], applied: Sequence[str]) -> dict[str, dict[str, int]]:
    """Bytes of constants each applied node used before and uses after the rewrite."""
    old = nodes_by_name(before.graph)
    inits_after = {i.name: i for i in after.graph.initializer}
    used: dict[str, set[str]] = {name: set() for name in applied}
    for node in after.graph.node:
        owners = created.get(node.name)
        if owners is None:
            owners = [node.name] if node.name in used else []
        for owner in owners:
            if owner in used:
                used[owner].update(n for n in node.input if n in inits_after)
    return {name: {"bytes_before": constant_bytes(before, old[name]),
                   "bytes_after": sum(tensor_nbytes(inits_after[t]) for t in sorted(used[name]))}
            for name in applied}


def settle(before: onnx.ModelProto, result: onnx.ModelProto,
           rewritten: Sequence[str]) -> dict[str, dict[str, int]]:
    """After onnxruntime rewrote ``rewritten`` nodes of ``before`` into ``result``: record
    where every new node came from, declare its new weights as inputs where the IR version
    asks for it, restore topological order, and return the weight bytes before/after per
    rewritten node."""
    created = record_provenance(before, result, rewritten)
    declare_initializers(result)
    topo_sort(result.graph)
    return weight_bytes(before, result, created, rewritten)


def shape_only_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with initializers reduced to name, type and dims: enough for provenance and
    byte counts after a rewrite, without a second copy of the weights."""
    from opstudio.core.model.model_io import without_initializers

    out = without_initializers(model)
    for init in model.graph.initializer:
        out.graph.initializer.append(
            onnx.TensorProto(name=init.name, data_type=init.data_type, dims=list(init.dims)))
    return out
