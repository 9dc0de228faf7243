"""A small decoder of N layers whose node names carry their scope, as exporters write them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PER_LAYER = 13  # nodes in each layer of layered_decoder


def layered_decoder(layers: int = 3, hidden: int = 16, ffn: int = 32, vocab: int = 40,
                    seed: int = 0) -> onnx.ModelProto:
    """input_ids [batch, seq] → embedding → ``layers`` × (norm, attention-ish, norm, SwiGLU MLP)
    → final norm → lm_head logits; names like ``/model/layers.1/mlp/up_proj/MatMul``."""
    rng = np.random.default_rng(seed)
    inits = []

    def weight(name: str, *shape: int) -> str:
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) * 0.2).astype(np.float32), name))
        return name

    nodes = [helper.make_node("Gather", [weight("embed", vocab, hidden), "input_ids"], ["h0"],
                              name="/model/embed_tokens/Gather")]
    h = "h0"
    for i in range(layers):
        p = f"/model/layers.{i}"
        t = f"l{i}_"
        nodes += [
            helper.make_node("LayerNormalization",
                             [h, weight(f"{t}ln1_g", hidden), weight(f"{t}ln1_b", hidden)],
                             [t + "n1"], axis=-1, name=f"{p}/input_layernorm/LayerNorm"),
            helper.make_node("MatMul", [t + "n1", weight(f"{t}wq", hidden, hidden)], [t + "q"],
                             name=f"{p}/self_attn/q_proj/MatMul"),
            helper.make_node("MatMul", [t + "n1", weight(f"{t}wv", hidden, hidden)], [t + "v"],
                             name=f"{p}/self_attn/v_proj/MatMul"),
            helper.make_node("Softmax", [t + "q"], [t + "a"], axis=-1,
                             name=f"{p}/self_attn/Softmax"),
            helper.make_node("Mul", [t + "a", t + "v"], [t + "av"], name=f"{p}/self_attn/Mul"),
            helper.make_node("MatMul", [t + "av", weight(f"{t}wo", hidden, hidden)], [t + "o"],
                             name=f"{p}/self_attn/o_proj/MatMul"),
            helper.make_node("Add", [h, t + "o"], [t + "r1"], name=f"{p}/Add"),
            helper.make_node("LayerNormalization",
                             [t + "r1", weight(f"{t}ln2_g", hidden), weight(f"{t}ln2_b", hidden)],
                             [t + "n2"], axis=-1, name=f"{p}/post_attention_layernorm/LayerNorm"),
            helper.make_node("MatMul", [t + "n2", weight(f"{t}wg", hidden, ffn)], [t + "g"],
                             name=f"{p}/mlp/gate_proj/MatMul"),
            helper.make_node("MatMul", [t + "n2", weight(f"{t}wu", hidden, ffn)], [t + "u"],
                             name=f"{p}/mlp/up_proj/MatMul"),
            helper.make_node("Mul", [t + "g", t + "u"], [t + "gu"], name=f"{p}/mlp/Mul"),
            helper.make_node("MatMul", [t + "gu", weight(f"{t}wd", ffn, hidden)], [t + "d"],
                             name=f"{p}/mlp/down_proj/MatMul"),
            helper.make_node("Add", [t + "r1", t + "d"], [t + "out"], name=f"{p}/Add_1"),
        ]
        h = t + "out"
    nodes += [
        helper.make_node("LayerNormalization",
                         [h, weight("norm_g", hidden), weight("norm_b", hidden)], ["hn"],
                         axis=-1, name="/model/norm/LayerNorm"),
        helper.make_node("MatMul", ["hn", weight("lm_head", hidden, vocab)], ["logits"],
                         name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "layered_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
