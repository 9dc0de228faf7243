"""Small models saved with external data and opened lazily, and the check that a streamed
rewrite wrote what the in-memory one writes (the tests of every pass that ``reads_lazy``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from opstudio.core.model.model_io import is_lazy, load_model, tensor_array
from opstudio.core.passes import PassContext, get_pass


def decoder_like(k: int, n: int, vocab: int, hidden: int, fp16: bool = False) -> onnx.ModelProto:
    """ids → Gather(table [vocab, hidden]) → MatMul(W_in [hidden, k]) → Relu → MatMul(W [k, n])
    → MatMul(W_out [n, vocab]): three weights of unlike shapes, K not a multiple of the block."""
    rng = np.random.default_rng(7)
    dtype = np.float16 if fp16 else np.float32
    elem = onnx.TensorProto.FLOAT16 if fp16 else onnx.TensorProto.FLOAT

    def weight(rows: int, cols: int, name: str) -> onnx.TensorProto:
        value = rng.standard_normal((rows, cols)) / np.sqrt(rows)
        value[0, : min(cols, 5)] = 0.0  # an all-zero stretch: the scale-0 branch
        return numpy_helper.from_array(value.astype(dtype), name)

    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "W_in"], ["h0"], name="mm_in"),
        helper.make_node("Relu", ["h0"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W"], ["h1"], name="mm"),
        helper.make_node("MatMul", ["h1", "W_out"], ["logits"], name="mm_out"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("logits", elem, [1, 3, vocab])],
        [weight(vocab, hidden, "table"), weight(hidden, k, "W_in"), weight(k, n, "W"),
         weight(n, vocab, "W_out")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def lazy_copy(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    path = folder / "model.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx's saver moves the data of the model it is given out of it
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    lazy = load_model(path, lazy=True)
    assert is_lazy(lazy)
    return lazy


def assert_same(streamed: onnx.ModelProto, reference: onnx.ModelProto) -> None:
    """The same nodes (name, op, inputs, outputs, attributes) and the same tensors, byte for
    byte, whatever their storage."""
    def nodes(model: onnx.ModelProto) -> list[tuple]:
        return [(n.name, n.op_type, n.domain, list(n.input), list(n.output),
                 sorted((a.name, helper.get_attribute_value(a)) for a in n.attribute))
                for n in model.graph.node]

    assert nodes(streamed) == nodes(reference)
    mine = {t.name: t for t in streamed.graph.initializer}
    theirs = {t.name: t for t in reference.graph.initializer}
    assert sorted(mine) == sorted(theirs)
    for name, tensor in theirs.items():
        other = mine[name]
        assert (other.data_type, list(other.dims)) == (tensor.data_type, list(tensor.dims)), name
        a, b = tensor_array(other).reshape(-1), tensor_array(tensor).reshape(-1)
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8) if a.dtype.kind == "f"
                                                     else a, b.view(np.uint8)
                                                     if b.dtype.kind == "f" else b), name
    assert [o.version for o in streamed.opset_import if o.domain == ""] == \
           [o.version for o in reference.opset_import if o.domain == ""]


def streamed_and_reference(tmp_path: Path, technique: str, params: dict, nodes: list[str],
                           model: onnx.ModelProto | None = None, sizes: bool = True) -> Any:
    """``technique`` on ``nodes`` of ``model`` (``decoder_like`` by default) in memory and
    opened lazily from a file: the same result, tensor by tensor, the weights still in files.
    Without ``sizes``, what the pass says of bytes (a serialized tensor in memory, its data in
    a file) is not compared."""
    model = model or decoder_like(100, 70, 37, 48)
    pass_ = get_pass(technique)
    reference = pass_.apply(model, nodes, params, PassContext())
    streamed = pass_.apply(lazy_copy(model, tmp_path), nodes, params, PassContext())
    assert streamed.applied == reference.applied
    assert streamed.skipped == reference.skipped
    if not sizes:
        for result in (streamed, reference):
            result.notes = [n for n in result.notes if "bytes" not in n]
            for entry in result.details.values():
                entry.pop("bytes_before", None)
                entry.pop("bytes_after", None)
    assert streamed.details == reference.details
    assert streamed.notes == reference.notes
    assert_same(streamed.model, reference.model)
    assert is_lazy(streamed.model)
    return streamed
