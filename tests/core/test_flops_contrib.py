"""FLOPs and bytes of onnxruntime's contrib ops and fused ops, and weights counted once in totals.

Each model is run on onnxruntime first (where its CPU build has the op), and the output shapes it
produces are the ones the graph declares: the layouts the counts assume are the real ones.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.model.graph import analyze
from opstudio.core.model.tensors import nbytes, numel

MS = "com.microsoft"
F32, I32, I64, U8 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8
RNG = np.random.default_rng(0)


def floats(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def build(nodes, inputs, outputs, inits=(), opset=21) -> onnx.ModelProto:
    """``inputs``: (name, elem type, shape); ``outputs``: (name, shape) of float outputs."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, F32, s) for n, s in outputs],
        [numpy_helper.from_array(a, n) for n, a in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid(MS, 1)], ir_version=10)


def run_on_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """Run ``model`` and check every output has the shape the graph declares."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    results = session.run(None, feeds)
    for out, value in zip(model.graph.output, results):
        declared = [d.dim_value for d in out.type.tensor_type.shape.dim]
        assert list(value.shape) == declared, (out.name, value.shape, declared)


def attention_core(b, h, s, t, d, dv):
    return 2 * b * h * s * t * d + 5 * b * h * s * t + 2 * b * h * s * t * dv


# --- attention -------------------------------------------------------------------------------

B, S, H, KV, P = 2, 3, 4, 2, 5
D = 16  # onnxruntime's CPU GroupQueryAttention wants a head size that is a multiple of 16
T = P + S
MAX_POS = 32


def gqa_model(packed: bool = False, batch=B, seq=S, past=P, do_rotary=1) -> onnx.ModelProto:
    width = (H + 2 * KV) * D if packed else H * D
    qkv = ["q", "", ""] if packed else ["q", "k", "v"]
    total = past + seq if isinstance(past, int) and isinstance(seq, int) else "total"
    node = helper.make_node(
        "GroupQueryAttention", [*qkv, "past_k", "past_v", "seqlens_k", "total_len", "cos", "sin"],
        ["o", "present_k", "present_v"], name="gqa", domain=MS, num_heads=H, kv_num_heads=KV,
        do_rotary=do_rotary)
    inputs = [("q", F32, [batch, seq, width])]
    if not packed:
        inputs += [("k", F32, [batch, seq, KV * D]), ("v", F32, [batch, seq, KV * D])]
    inputs += [("past_k", F32, [batch, KV, past, D]), ("past_v", F32, [batch, KV, past, D]),
               ("seqlens_k", I32, [batch]), ("total_len", I32, [])]
    outputs = [("o", [batch, seq, H * D]), ("present_k", [batch, KV, total, D]),
               ("present_v", [batch, KV, total, D])]
    caches = [("cos", floats(MAX_POS, D // 2)), ("sin", floats(MAX_POS, D // 2))]
    return build([node], inputs, outputs, caches)


def gqa_feeds(packed: bool, b: int, s: int) -> dict[str, np.ndarray]:
    feeds = {"q": floats(b, s, (H + 2 * KV) * D if packed else H * D),
             "past_k": floats(b, KV, P, D), "past_v": floats(b, KV, P, D),
             "seqlens_k": np.full(b, P + s - 1, np.int32),
             "total_len": np.asarray(P + s, np.int32)}
    if not packed:
        feeds |= {"k": floats(b, s, KV * D), "v": floats(b, s, KV * D)}
    return feeds


# onnxruntime takes several new tokens after a past only for a batch of one
@pytest.mark.parametrize(("b", "s"), [(1, 3), (2, 1)])
@pytest.mark.parametrize("packed", [False, True])
def test_group_query_attention(packed, b, s):
    model = gqa_model(packed, batch=b, seq=s)
    run_on_ort(model, gqa_feeds(packed, b, s))
    node = analyze(model).node("gqa")
    t = P + s
    rotary = 3 * b * s * (H + KV) * D  # Q and K turned inside the op
    assert node.flops == attention_core(b, H, s, t, D, D) + rotary
    # the caches are read at the new tokens' positions only: b·s of their MAX_POS rows
    cache = 2 * MAX_POS * (D // 2) * 4 * (b * s / MAX_POS)
    q = b * s * (H + 2 * KV) * D * 4
    past, present = 2 * b * KV * P * D * 4, 2 * b * KV * t * D * 4
    out = b * s * H * D * 4
    assert node.bytes_moved == pytest.approx(q + past + b * 4 + 4 + cache + out + present, abs=2)


def test_group_query_attention_without_rotary_and_decoding():
    model = gqa_model(do_rotary=0)
    node = analyze(model).node("gqa")
    assert node.flops == attention_core(B, H, S, T, D, D)
    decode = analyze(gqa_model(batch="batch", seq="seq", past="past"),
                     {"batch": 1, "seq": 1, "past": 512}).node("gqa")
    assert decode.flops == attention_core(1, H, 1, 513, D, D) + 3 * (H + KV) * D


def test_group_query_attention_needs_its_dims():
    model = gqa_model(batch="batch", seq="seq", past="past")
    assert analyze(model).node("gqa").flops is None
    assert analyze(model, {"batch": B, "seq": S}).node("gqa").flops is None  # past unknown
    bound = analyze(model, {"batch": B, "seq": S, "past": P}).node("gqa")
    assert bound.flops == analyze(gqa_model()).node("gqa").flops


def test_multi_head_attention_with_past_and_bias():
    L = 4
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "bias", "", "", "pk", "pv"],
                            ["o", "prk", "prv"], name="mha", domain=MS, num_heads=H)
    model = build([node], [("q", F32, [B, S, H * D]), ("k", F32, [B, L, H * D]),
                           ("v", F32, [B, L, H * D]), ("pk", F32, [B, H, P, D]),
                           ("pv", F32, [B, H, P, D])],
                  [("o", [B, S, H * D]), ("prk", [B, H, P + L, D]), ("prv", [B, H, P + L, D])],
                  [("bias", floats(3 * H * D))])
    run_on_ort(model, {"q": floats(B, S, H * D), "k": floats(B, L, H * D),
                       "v": floats(B, L, H * D), "pk": floats(B, H, P, D),
                       "pv": floats(B, H, P, D)})
    bias = B * S * H * D + B * L * 2 * H * D
    assert analyze(model).node("mha").flops == attention_core(B, H, S, P + L, D, D) + bias


def test_multi_head_attention_value_head_size():
    L, DV = 4, 24
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], name="mha",
                            domain=MS, num_heads=H)
    model = build([node], [("q", F32, [B, S, H * D]), ("k", F32, [B, L, H * D]),
                           ("v", F32, [B, L, H * DV])], [("o", [B, S, H * DV])])
    run_on_ort(model, {"q": floats(B, S, H * D), "k": floats(B, L, H * D),
                       "v": floats(B, L, H * DV)})
    assert analyze(model).node("mha").flops == attention_core(B, H, S, L, D, DV)


def test_contrib_attention_projects_qkv_itself():
    C = 12
    node = helper.make_node("Attention", ["x", "w", "b", "", "past"], ["o", "present"],
                            name="att", domain=MS, num_heads=H, unidirectional=1)
    model = build([node], [("x", F32, [B, S, C]), ("past", F32, [2, B, H, P, D])],
                  [("o", [B, S, H * D]), ("present", [2, B, H, T, D])],
                  [("w", floats(C, 3 * H * D)), ("b", floats(3 * H * D))])
    run_on_ort(model, {"x": floats(B, S, C), "past": floats(2, B, H, P, D)})
    projection = 2 * B * S * C * 3 * H * D + B * S * 3 * H * D
    assert analyze(model).node("att").flops == projection + attention_core(B, H, S, T, D, D)


def test_onnx_attention_4d_with_cache_and_3d():
    L, DV = 4, 6
    node = helper.make_node("Attention", ["Q", "K", "V", "", "pk", "pv"], ["o", "prk", "prv"],
                            name="att")
    model = build([node], [("Q", F32, [B, H, S, D]), ("K", F32, [B, KV, L, D]),
                           ("V", F32, [B, KV, L, DV]), ("pk", F32, [B, KV, P, D]),
                           ("pv", F32, [B, KV, P, DV])],
                  [("o", [B, H, S, DV]), ("prk", [B, KV, P + L, D]), ("prv", [B, KV, P + L, DV])],
                  opset=23)
    run_on_ort(model, {"Q": floats(B, H, S, D), "K": floats(B, KV, L, D),
                       "V": floats(B, KV, L, DV), "pk": floats(B, KV, P, D),
                       "pv": floats(B, KV, P, DV)})
    assert analyze(model).node("att").flops == attention_core(B, H, S, P + L, D, DV)

    flat = helper.make_node("Attention", ["Q", "K", "V"], ["o"], name="att", q_num_heads=H,
                            kv_num_heads=KV)
    model = build([flat], [("Q", F32, [B, S, H * D]), ("K", F32, [B, L, KV * D]),
                           ("V", F32, [B, L, KV * DV])], [("o", [B, S, H * DV])], opset=23)
    run_on_ort(model, {"Q": floats(B, S, H * D), "K": floats(B, L, KV * D),
                       "V": floats(B, L, KV * DV)})
    assert analyze(model).node("att").flops == attention_core(B, H, S, L, D, DV)


# --- rotary ----------------------------------------------------------------------------------


def positions() -> np.ndarray:
    return np.tile(np.arange(S, dtype=np.int64), (B, 1))


@pytest.mark.parametrize("part", [0, 8])
def test_contrib_rotary_embedding_full_and_partial(part):
    attrs = {"num_heads": H, "rotary_embedding_dim": part} if part else {}
    node = helper.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], name="rot",
                            domain=MS, **attrs)
    half = (part or D) // 2
    model = build([node], [("x", F32, [B, S, H * D]), ("pos", I64, [B, S])],
                  [("y", [B, S, H * D])],
                  [("cos", floats(MAX_POS, half)), ("sin", floats(MAX_POS, half))])
    run_on_ort(model, {"x": floats(B, S, H * D), "pos": positions()})
    node = analyze(model).node("rot")
    rotated = B * S * H * (part or D)
    assert node.flops == 3 * rotated
    x = B * S * H * D * 4
    caches = 2 * MAX_POS * half * 4 * (B * S / MAX_POS)
    assert node.bytes_moved == pytest.approx(2 * x + B * S * 8 + caches, abs=2)


def test_onnx_rotary_embedding_4d():
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], name="rot")
    model = build([node], [("x", F32, [B, H, S, D]), ("pos", I64, [B, S])],
                  [("y", [B, H, S, D])],
                  [("cos", floats(MAX_POS, D // 2)), ("sin", floats(MAX_POS, D // 2))], opset=23)
    run_on_ort(model, {"x": floats(B, H, S, D), "pos": positions()})
    node = analyze(model).node("rot")
    assert node.flops == 3 * B * H * S * D
    caches = 2 * MAX_POS * (D // 2) * 4 * (B * S / MAX_POS)
    assert node.bytes_moved == pytest.approx(2 * B * H * S * D * 4 + B * S * 8 + caches, abs=2)


# --- block-quantized weights -----------------------------------------------------------------

K, N, BLOCK = 64, 16, 32


def nbits_weights(bits: int) -> list[tuple[str, np.ndarray]]:
    blocks = K // BLOCK
    return [("qw", RNG.integers(0, 256, (N, blocks, BLOCK * bits // 8)).astype(np.uint8)),
            ("scales", floats(N, blocks)),
            ("zeros", RNG.integers(0, 256, (N, (blocks * bits + 7) // 8)).astype(np.uint8))]


@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits(bits):
    node = helper.make_node("MatMulNBits", ["a", "qw", "scales", "zeros"], ["y"], name="mm",
                            domain=MS, K=K, N=N, bits=bits, block_size=BLOCK)
    weights = nbits_weights(bits)
    model = build([node], [("a", F32, [B, S, K])], [("y", [B, S, N])], weights)
    run_on_ort(model, {"a": floats(B, S, K)})
    info = analyze(model)
    mm = info.node("mm")
    assert mm.flops == 2 * B * S * N * K
    packed = N * (K // BLOCK) * (BLOCK * bits // 8)
    assert packed == N * K * bits // 8
    weight_bytes = packed + N * (K // BLOCK) * 4 + sum(a.nbytes for n, a in weights if n == "zeros")
    assert mm.param_bytes == weight_bytes == info.total_param_bytes()
    assert mm.bytes_moved == B * S * K * 4 + weight_bytes + B * S * N * 4


def test_matmul_nbits_without_a_declared_output_shape():
    # onnx's shape inference does not know the op: the rows come from A
    node = helper.make_node("MatMulNBits", ["a", "qw", "scales", "", "", "bias"], ["y"],
                            name="mm", domain=MS, K=K, N=N, bits=4, block_size=BLOCK)
    model = build([node], [("a", F32, ["batch", S, K])], [("y", None)],
                  [*nbits_weights(4)[:2], ("bias", floats(N))])
    assert analyze(model).node("mm").flops is None
    assert analyze(model, {"batch": B}).node("mm").flops == 2 * B * S * N * K + B * S * N


def gbq_model(vocab: int = 10, declared: bool = True) -> onnx.ModelProto:
    node = helper.make_node("GatherBlockQuantized", ["table", "ids", "scales"], ["y"], name="gbq",
                            domain=MS, bits=4, block_size=BLOCK, quantize_axis=1, gather_axis=0)
    table = RNG.integers(0, 256, (vocab, K // 2)).astype(np.uint8)  # two 4-bit codes a byte
    return build([node], [("ids", I64, [B, S])], [("y", [B, S, K] if declared else None)],
                 [("table", table), ("scales", floats(vocab, K // BLOCK))])


def test_gather_block_quantized():
    model = gbq_model(vocab=100)
    run_on_ort(model, {"ids": RNG.integers(0, 100, (B, S))})
    node = analyze(model).node("gbq")
    assert node.flops == 2 * B * S * K  # (code - zero point) * scale per element
    assert analyze(gbq_model(100, declared=False)).node("gbq").flops == 2 * B * S * K
    # the rows picked, not the table: 6 of 100 rows of codes and scales
    picked = B * S / 100 * (100 * K // 2 + 100 * (K // BLOCK) * 4)
    assert node.bytes_moved == pytest.approx(B * S * 8 + picked + B * S * K * 4, abs=2)
    assert node.param_bytes == 100 * K // 2 + 100 * (K // BLOCK) * 4


def test_gather_reads_the_rows_it_picks():
    node = helper.make_node("Gather", ["table", "ids"], ["y"], name="g")
    model = build([node], [("ids", I64, [B, S])], [("y", [B, S, 8])],
                  [("table", floats(1000, 8))])
    g = analyze(model).node("g")
    assert g.bytes_moved == B * S * 8 + B * S * 8 * 4 + B * S * 8 * 4
    assert g.param_bytes == 1000 * 8 * 4


# --- fused normalisations and GELUs ----------------------------------------------------------

HID = 8


@pytest.mark.parametrize(("op", "domain", "extra", "per_element"), [
    ("SkipSimplifiedLayerNormalization", MS, ["skip", "gamma"], 7),
    ("SkipLayerNormalization", MS, ["skip", "gamma", "beta"], 9),
    ("SimplifiedLayerNormalization", "", ["gamma"], 6),  # where the genai builder puts it
    ("LayerNormalization", "", ["gamma", "beta"], 8),
    ("Gelu", MS, [], 8),
    ("Gelu", "", [], 8),
    ("FastGelu", MS, [], 8),
    ("FastGelu", MS, ["beta"], 9),
    ("BiasGelu", MS, ["beta"], 9),
    ("QuickGelu", MS, [], 5),
])
def test_fused_normalisations_and_gelus(op, domain, extra, per_element):
    node = helper.make_node(op, ["x", *extra], ["y"], name="n", domain=domain)
    inputs = [("x", F32, [B, S, HID])] + ([("skip", F32, [B, S, HID])] if "skip" in extra else [])
    weights = [(n, floats(HID)) for n in ("gamma", "beta") if n in extra]
    # no declared output shape: onnx's inference knows none of the contrib ops
    model = build([node], inputs, [("y", None)], weights)
    checked = build([node], inputs, [("y", [B, S, HID])], weights)
    run_on_ort(checked, {n: floats(B, S, HID) for n, _, _ in inputs})
    assert analyze(model).node("n").flops == per_element * B * S * HID


def test_bias_fast_gelu_is_counted_though_this_cpu_build_lacks_it():
    node = helper.make_node("BiasFastGelu", ["x", "bias"], ["y"], name="n", domain=MS)
    model = build([node], [("x", F32, [B, S, HID])], [("y", None)], [("bias", floats(HID))])
    assert analyze(model).node("n").flops == 9 * B * S * HID


# --- weights counted once --------------------------------------------------------------------


def test_a_weight_read_by_two_matmuls_and_a_gather_counts_once():
    # a tied embedding: the table is the embedding (Gather) and the head (MatMul), and a second
    # MatMul reads it too
    table = floats(16, 16)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("MatMul", ["emb", "table"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "table"], ["y"], name="head")]
    model = build(nodes, [("ids", I64, [B, S])], [("y", [B, S, 16])], [("table", table)])
    run_on_ort(model, {"ids": RNG.integers(0, 16, (B, S))})
    info = analyze(model)
    per_node = [info.node(n).param_bytes for n in ("embed", "mm1", "head")]
    assert per_node == [table.nbytes] * 3  # what each node reads
    assert info.total_param_bytes() == table.nbytes  # the file holds it once


def test_rotary_caches_shared_by_attention_nodes_count_once():
    model = gqa_model()
    second = onnx.NodeProto()
    second.CopyFrom(model.graph.node[0])
    second.name = "gqa2"
    second.input[0] = "o"  # the first node's output as the second's query
    second.output[:] = ["o2", "pk2", "pv2"]
    model.graph.node.append(second)
    info = analyze(model)
    cache = MAX_POS * (D // 2) * 4
    assert info.node("gqa").param_bytes == info.node("gqa2").param_bytes == 2 * cache
    assert info.total_param_bytes() == 2 * cache


def test_four_bit_tensors_take_half_a_byte_an_element():
    assert nbytes("int4", 10) == 5 and nbytes("uint4", 7) == 4 and nbytes("float32", 3) == 12
    assert numel([2, "seq"]) is None and numel([]) == 1
    packed = helper.make_tensor("w4", TensorProto.INT4, [4, 5], np.zeros(20, np.int8).tolist())
    node = helper.make_node("DequantizeLinear", ["w4", "s"], ["y"], name="dq", axis=0)
    model = build([node], [], [("y", [4, 5])], [("s", np.ones(4, np.float32))])
    model.graph.initializer.append(packed)
    run_on_ort(model, {})
    info = analyze(model)
    assert info.total_param_bytes() == 10 + 4 * 4


def test_nonsense_attributes_give_unknown_not_a_crash():
    model = gqa_model()
    attrs = model.graph.node[0].attribute
    for attr in attrs:
        if attr.name == "kv_num_heads":
            attr.i = -2
    assert analyze(model).node("gqa").flops is None
    node = helper.make_node("Attention", ["x", "w"], ["o"], name="att", domain=MS, num_heads=0)
    model = build([node], [("x", F32, [B, S, 12])], [("o", None)], [("w", floats(12, 24))])
    assert analyze(model).node("att").flops is None
    node = helper.make_node("MatMulNBits", ["a", "qw", "scales"], ["y"], name="mm", domain=MS,
                            K=0, N=N, bits=4, block_size=BLOCK)
    model = build([node], [("a", F32, [B, S, K])], [("y", None)], nbits_weights(4)[:2])
    assert analyze(model).node("mm").flops is None
