"""The bundled demo models, ``article_cnn.onnx`` and ``tiny_llm.onnx``, as
resources/make_demo_models.py writes them and the tests build them.

Only numpy and ``onnx.helper`` are used, every weight comes from one seeded generator and nothing
time- or machine-dependent goes into the files, so a re-run produces byte-identical files (a test
checks that the committed files equal a fresh build). Weights are random but scaled the way the
real models are initialised, so activations stay in a realistic range.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_builders import GraphBuilder

SEED = 20240611
OPSET = 17  # LayerNormalization exists from 17; Gelu is written as torch exports it (Erf)
IR_VERSION = 8  # what opset-17 exporters write; every onnxruntime since 1.11 reads it
PRODUCER = ("opstudio-demo", "1")

# tiny_llm sizes: ~4.7 MB of float32 weights.
VOCAB = 3072
D_MODEL = 128
N_HEADS = 4
N_LAYERS = 2
D_MLP = 4 * D_MODEL
MAX_POS = 512
LN_EPS = 1e-5
MASK_VALUE = -30000.0  # large enough to zero a Softmax term, small enough to survive float16


def _model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name=PRODUCER[0],
                              producer_version=PRODUCER[1], doc_string=doc)
    onnx.checker.check_model(model, full_check=True)
    return model


def build_article_cnn(rng: np.random.Generator) -> onnx.ModelProto:
    """The article's CNN: three 3×3 convolutions (32, 64, 64) with 2×2 max-pooling, then a
    64-unit dense layer and 10 logits. Valid padding, as Keras' Conv2D defaults to."""
    b = GraphBuilder(rng)

    def conv(name: str, x: str, c_in: int, c_out: int) -> str:
        fan_in = c_in * 3 * 3
        w = b.normal(f"{name}.weight", (c_out, c_in, 3, 3), math.sqrt(2.0 / fan_in))  # He init
        bias = b.normal(f"{name}.bias", (c_out,), 0.01)
        return b.op("Conv", name, [x, w, bias], kernel_shape=[3, 3], strides=[1, 1],
                    pads=[0, 0, 0, 0])

    x = "image"
    x = b.op("Relu", "relu1", [conv("conv1", x, 1, 32)])            # 32×26×26
    x = b.op("MaxPool", "pool1", [x], kernel_shape=[2, 2], strides=[2, 2])  # 32×13×13
    x = b.op("Relu", "relu2", [conv("conv2", x, 32, 64)])           # 64×11×11
    x = b.op("MaxPool", "pool2", [x], kernel_shape=[2, 2], strides=[2, 2])  # 64×5×5
    x = b.op("Relu", "relu3", [conv("conv3", x, 64, 64)])           # 64×3×3
    x = b.op("Flatten", "flatten", [x], axis=1)                     # 576
    w1 = b.normal("fc1.weight", (64, 576), math.sqrt(2.0 / 576))
    b1 = b.normal("fc1.bias", (64,), 0.01)
    x = b.op("Relu", "relu4", [b.op("Gemm", "fc1", [x, w1, b1], transB=1)])
    w2 = b.normal("fc2.weight", (10, 64), math.sqrt(1.0 / 64))
    b2 = b.normal("fc2.bias", (10,), 0.01)
    b.nodes.append(helper.make_node("Gemm", [x, w2, b2], ["logits"], name="fc2", transB=1))

    graph = b.graph(
        "article_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])])
    return _model(graph, "Small CNN for 28x28 grey images (random He-initialised weights).")


def _block(b: GraphBuilder, i: int, x: str, mask: str) -> str:
    p = f"block{i}"
    d, h, hd = D_MODEL, N_HEADS, D_MODEL // N_HEADS
    # GPT-2 style init: N(0, 0.02), projections into the residual stream scaled down by depth.
    resid_std = 0.02 / math.sqrt(2 * N_LAYERS)

    def layer_norm(name: str, t: str) -> str:
        gamma = b.weight(f"{name}.weight", np.ones(d, dtype=np.float32))
        beta = b.weight(f"{name}.bias", np.zeros(d, dtype=np.float32))
        return b.op("LayerNormalization", name, [t, gamma, beta], axis=-1, epsilon=LN_EPS)

    def linear(name: str, t: str, n_in: int, n_out: int, std: float) -> str:
        w = b.normal(f"{name}.weight", (n_in, n_out), std)
        bias = b.normal(f"{name}.bias", (n_out,), 0.02)
        return b.op("Add", f"{name}_bias", [b.op("MatMul", name, [t, w]), bias])

    # attention
    a = layer_norm(f"{p}.ln1", x)
    qkv = linear(f"{p}.attn.qkv", a, d, 3 * d, 0.02)
    split = b.const_i64(f"{p}.attn.split_sizes", [d, d, d])
    q, k, v = b.op("Split", f"{p}.attn.split", [qkv, split], n_out=3, axis=-1)
    heads = b.const_i64(f"{p}.attn.heads_shape", [0, 0, h, hd])
    q = b.op("Transpose", f"{p}.attn.q_transpose",
             [b.op("Reshape", f"{p}.attn.q_reshape", [q, heads])], perm=[0, 2, 1, 3])
    k = b.op("Transpose", f"{p}.attn.k_transpose",
             [b.op("Reshape", f"{p}.attn.k_reshape", [k, heads])], perm=[0, 2, 3, 1])
    v = b.op("Transpose", f"{p}.attn.v_transpose",
             [b.op("Reshape", f"{p}.attn.v_reshape", [v, heads])], perm=[0, 2, 1, 3])
    scores = b.op("MatMul", f"{p}.attn.scores", [q, k])                  # [b, h, s, s]
    scale = b.const_f32(f"{p}.attn.scale_value", 1.0 / math.sqrt(hd))
    scores = b.op("Mul", f"{p}.attn.scale", [scores, scale])
    scores = b.op("Add", f"{p}.attn.causal_mask", [scores, mask])
    probs = b.op("Softmax", f"{p}.attn.softmax", [scores], axis=-1)
    ctx = b.op("MatMul", f"{p}.attn.context", [probs, v])                # [b, h, s, hd]
    ctx = b.op("Transpose", f"{p}.attn.merge_transpose", [ctx], perm=[0, 2, 1, 3])
    merged = b.const_i64(f"{p}.attn.merge_shape", [0, 0, d])
    ctx = b.op("Reshape", f"{p}.attn.merge_reshape", [ctx, merged])
    out = linear(f"{p}.attn.out_proj", ctx, d, d, resid_std)
    x = b.op("Add", f"{p}.residual1", [x, out])

    # MLP with the exact (Erf) Gelu, the way torch.onnx writes nn.GELU at opset 17
    m = layer_norm(f"{p}.ln2", x)
    m = linear(f"{p}.mlp.fc1", m, d, D_MLP, 0.02)
    sqrt2 = b.const_f32(f"{p}.mlp.gelu.sqrt2", math.sqrt(2.0))
    one = b.const_f32(f"{p}.mlp.gelu.one", 1.0)
    half = b.const_f32(f"{p}.mlp.gelu.half", 0.5)
    erf = b.op("Erf", f"{p}.mlp.gelu.erf", [b.op("Div", f"{p}.mlp.gelu.div", [m, sqrt2])])
    g = b.op("Mul", f"{p}.mlp.gelu.mul", [m, b.op("Add", f"{p}.mlp.gelu.add", [erf, one])])
    g = b.op("Mul", f"{p}.mlp.gelu.mul_half", [g, half])
    m = linear(f"{p}.mlp.fc2", g, D_MLP, d, resid_std)
    return b.op("Add", f"{p}.residual2", [x, m])


def build_tiny_llm(rng: np.random.Generator) -> onnx.ModelProto:
    """A two-block decoder-only transformer over ``input_ids`` [batch, seq] → ``logits``."""
    b = GraphBuilder(rng)
    wte = b.normal("embed.tokens.weight", (VOCAB, D_MODEL), 0.02)
    wpe = b.normal("embed.positions.weight", (MAX_POS, D_MODEL), 0.01)

    # Position ids from the sequence length, as GPT-2 exports do without a position_ids input.
    shape = b.op("Shape", "embed.input_shape", ["input_ids"])
    seq = b.op("Gather", "embed.seq_len", [shape, b.const_i64("embed.seq_axis", 1)], axis=0)
    positions = b.op("Range", "embed.position_ids",
                     [b.const_i64("embed.range_start", 0), seq, b.const_i64("embed.range_step", 1)])
    tok = b.op("Gather", "embed.tokens", [wte, "input_ids"], axis=0)    # [b, s, d]
    pos = b.op("Gather", "embed.positions", [wpe, positions], axis=0)   # [s, d]
    x = b.op("Add", "embed.add", [tok, pos])

    # Causal mask [s, s]: 0 on and below the diagonal, MASK_VALUE above it; shared by the blocks.
    seq_1d = b.op("Unsqueeze", "mask.seq_1d", [seq, b.const_i64("mask.axes", [0])])
    square = b.op("Concat", "mask.shape", [seq_1d, seq_1d], axis=0)
    filled = b.op("ConstantOfShape", "mask.fill", [square],
                  value=numpy_helper.from_array(np.array([MASK_VALUE], dtype=np.float32)))
    mask = b.op("Trilu", "mask.upper", [filled, b.const_i64("mask.diagonal_offset", 1)], upper=1)

    for i in range(N_LAYERS):
        x = _block(b, i, x, mask)

    gamma = b.weight("final_ln.weight", np.ones(D_MODEL, dtype=np.float32))
    beta = b.weight("final_ln.bias", np.zeros(D_MODEL, dtype=np.float32))
    x = b.op("LayerNormalization", "final_ln", [x, gamma, beta], axis=-1, epsilon=LN_EPS)
    head = b.normal("lm_head.weight", (D_MODEL, VOCAB), 0.02)
    b.nodes.append(helper.make_node("MatMul", [x, head], ["logits"], name="lm_head"))

    graph = b.graph(
        "tiny_llm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])])
    return _model(graph, f"Decoder-only transformer: {N_LAYERS} blocks, d_model {D_MODEL}, "
                         f"{N_HEADS} heads, vocabulary {VOCAB}, up to {MAX_POS} positions "
                         "(random weights).")


BUILDERS = {"article_cnn.onnx": build_article_cnn, "tiny_llm.onnx": build_tiny_llm}
