"""Unstructured pruning: the smallest weights zeroed, stored dense or as a list of non-zeros
(``prune`` with ``structured: false``; see prune.py for what each storage costs). A lazily
opened model's weights are pruned one at a time from their memory maps, each pruned weight
written to a scratch file (``_stream``) before the next is read."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from opstudio.core.model import graph_utils, provenance
from opstudio.core.model.model_io import is_lazy_tensor
from opstudio.core.model.tensors import tensor_nbytes
from opstudio.core.passes import _stream as stream
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
    with stream.scratch_for(work, ctx.workdir) as scratch:
        for k, (tensor, users) in enumerate(groups.items()):
            ctx.check_cancelled()
            ctx.report(k / len(groups), f"prune: pruning tensor {k + 1} of {len(groups)} ({tensor})")
            weight, _ = w.constant_array(work, tensor)
            assert weight is not None
            removed = _n_removed(sparsity, weight.size)
            new_name = w.unique_name(taken, f"{tensor}_pruned")
            origins: list[str] = []
            for user in users:
                origins.extend(provenance.get_origin(user))
            if scratch is not None:  # weights stay in files: the pruned one goes to one too
                start = scratch.begin()
                nonzero_after = 0
                for band in _magnitude_pruned(weight, removed):
                    scratch.write(band)
                    nonzero_after += int(np.count_nonzero(band))
                pruned_tensor = scratch.tensor(
                    new_name, helper.np_dtype_to_tensor_dtype(weight.dtype), weight.shape, start)
                w.append_initializer(work, pruned_tensor)
                bytes_after = tensor_nbytes(pruned_tensor)
            else:
                pruned = np.concatenate(list(_magnitude_pruned(weight, removed)))
                pruned = pruned.reshape(weight.shape)
                nonzero_after = int(np.count_nonzero(pruned))
                if storage == "sparse":
                    const = _sparse_constant(pruned, new_name,
                                             w.unique_name(taken, f"{new_name}_sparse"))
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
            for user in users:
                result.applied.append(user.name)
                result.details[user.name] = {
                    "weight": tensor, "weights": int(weight.size), "zeroed": removed,
                    "sparsity": (float(1.0 - nonzero_after / weight.size) if weight.size
                                 else 0.0),
                    "params_before": nonzero_before, "params_after": nonzero_after,
                    "storage": storage, "bytes_before": holders.get(tensor, weight.nbytes),
                    "bytes_after": bytes_after, "speed_note": CPU_NOTE,
                    "shared_with": [u.name for u in users if u is not user],
                }
    w.replace_nodes(work.graph, replacements)
    w.remove_unused(work, list(groups))
    result.applied.sort(key=list(nodes).index)
    return result


def _magnitude_pruned(weight: np.ndarray, removed: int) -> Iterator[np.ndarray]:
    """``weight`` flattened, in bands, with its ``removed`` smallest magnitudes zeroed (ties:
    the earlier element in row-major order first, as a stable argsort of |w| orders them).

    The cut is the ``removed``-th smallest magnitude (one float copy of |w|, partitioned in
    place, instead of an argsort's int64 index of every element); what lies below it goes, and
    of what equals it, the first ones in order until ``removed`` are zeroed. A memory-mapped
    weight is then read band by band.
    """
    flat = weight.reshape(-1)
    cut, ties = None, 0
    if removed > 0:
        magnitudes = np.abs(flat)
        magnitudes.partition(removed - 1)
        cut = magnitudes[removed - 1]
        del magnitudes
        below = sum(int(np.count_nonzero(np.abs(b) < cut)) for b in stream.row_bands(flat))
        ties = removed - below
    for band in stream.row_bands(flat):
        out = np.array(band)  # a copy: the band may be a read-only view of a memory map
        if cut is not None:
            size = np.abs(out)
            zero = size < cut
            if ties > 0:
                equal = np.flatnonzero(size == cut)[:ties]
                zero[equal] = True
                ties -= len(equal)
            out[zero] = 0
        yield out


def _holder_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Serialized bytes of whatever holds each constant (initializer or Constant node); a
    weight left in its file counts its data."""
    sizes = {i.name: tensor_nbytes(i) if is_lazy_tensor(i) else i.ByteSize()
             for i in model.graph.initializer}
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
