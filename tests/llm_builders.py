"""Tiny decoder-shaped models for LLM accuracy tests: logits plus a KV-cache output."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_decoder(vocab: int = 32, hidden: int = 8, heads: int = 2, seed: int = 0,
                 noise: float = 0.0) -> onnx.ModelProto:
    """input_ids + past key → logits [1, seq, vocab] and present.0.key [1, heads, past+seq, d]."""
    rng = np.random.default_rng(seed)
    head = hidden // heads
    emb = rng.normal(size=(vocab, hidden)).astype(np.float32)
    w_k = rng.normal(size=(hidden, hidden)).astype(np.float32)
    w_out = rng.normal(size=(hidden, vocab)).astype(np.float32)
    w_out += noise * rng.normal(size=w_out.shape).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "w_k"], ["k"], name="k_proj"),
        helper.make_node("Reshape", ["k", "kv_shape"], ["k4"], name="k_reshape"),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 1, 3], name="k_transpose"),
        helper.make_node("Concat", ["past_key_values.0.key", "kt"], ["present.0.key"], axis=2,
                         name="k_concat"),
        helper.make_node("MatMul", ["h", "w_out"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"]),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT,
                                       [1, heads, "past", head])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", vocab]),
         helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT,
                                       [1, heads, "total", head])],
        [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w_k, "w_k"),
         numpy_helper.from_array(w_out, "w_out"),
         numpy_helper.from_array(np.array([1, -1, heads, head], np.int64), "kv_shape")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def decoder_inputs(seq: int = 6, past: int = 3, vocab: int = 32,
                   head: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"input_ids": rng.integers(0, vocab, size=(1, seq)).astype(np.int64),
            "past_key_values.0.key": rng.normal(size=(1, 2, past, head)).astype(np.float32)}
