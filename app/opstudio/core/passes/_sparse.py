"""Unstructured pruning: the smallest weights zeroed, stored dense or as a list of non-zeros
(``prune`` with ``structured: false``; see prune.py for what each storage costs)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from opstudio.core.model import graph_utils, provenance
from opstudio.core.passes import _weights as w
from opstudio.core.passes.base import PassContext, PassResult

CPU_NOTE = ("unstructured sparsity does not make onnxruntime's dense CPU kernels faster: "
            "the zeros are multiplied like any other weight")


def _n_removed(sparsity: float, n: int) -> int:
    return math.floor(sparsity * n + 0.5)


def apply_unstructured(work: onnx.ModelProto, nodes: Sequence[str], sparsity: float,
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
