"""Tiny decoders in the layouts torch's exporter writes for HF families other than Llama:
Mistral (sliding-window layers), Gemma 2 (soft-capped scores, sliding-window layers through the mask), Gemma 3 (q/k norms),
Phi (partial rotary, LayerNorm, biases, no repeat_kv) and GPT-2 (LayerNorm with the residual
before it, one c_attn Gemm split into q/k/v, learned positions, heads merged to the context's
own shape). Random weights; the inputs and KV outputs are optimum's."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llm_builders import hf_decoder_io

FAMILIES = {
    # heads, kv_heads, head, rotary dims (0: learned positions), norm, softcap, windows per
    # layer (0: full), q/k norms, packed c_attn
    "gemma2": dict(heads=4, kv_heads=2, head=16, rotary=16, norm="rms_offset", softcap=5.0,
                   windows=(3, 0), qk_norm=False, packed=False),
    # the Llama layout with sliding-window layers only (Mistral)
    "mistral": dict(heads=4, kv_heads=2, head=16, rotary=16, norm="rms", softcap=0.0,
                    windows=(3, 5), qk_norm=False, packed=False),
    "gemma3": dict(heads=4, kv_heads=2, head=16, rotary=16, norm="rms", softcap=0.0,
                   windows=(3, 0), qk_norm=True, packed=False),
    "phi": dict(heads=2, kv_heads=2, head=32, rotary=16, norm="layer", softcap=0.0,
                windows=(0, 0), qk_norm=False, packed=False),
    "phi_narrow": dict(heads=4, kv_heads=4, head=16, rotary=8, norm="layer", softcap=0.0,
                       windows=(0, 0), qk_norm=False, packed=False),
    "gpt2": dict(heads=4, kv_heads=4, head=16, rotary=0, norm="layer", softcap=0.0,
                 windows=(0, 0), qk_norm=False, packed=True),
}


def family_decoder(family: str, *, vocab: int = 64, seed: int = 0) -> onnx.ModelProto:
    """``family``'s decoder with 2 layers; an embedding of more than 65,536 values (vocab ≥ 1025
    at a hidden size of 64) is one the mask's probe must not copy."""
    spec = FAMILIES[family]
    heads, kv_heads, head, rotary = spec["heads"], spec["kv_heads"], spec["head"], spec["rotary"]
    hidden = heads * head
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], name: str, outputs: int = 1, **attrs) -> str:
        outs = [f"{name}_output_{i}" for i in range(outputs)]
        nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0]

    def weight(name: str, shape: tuple[int, ...], scale: float = 0.3, offset: float = 0.0) -> str:
        return const(name, (offset + scale * rng.standard_normal(shape)).astype(np.float32))

    def i64(name: str, *values: int) -> str:
        return const(name, np.array(values, np.int64))

    def f32(name: str, value: float) -> str:
        return const(name, np.array(value, np.float32))

    def norm(x: str, scope: str, width: int) -> str:
        if spec["norm"] == "layer":
            return node("LayerNormalization", [x, weight(f"{scope}.weight", (width,), 0.1, 1.0),
                                               weight(f"{scope}.bias", (width,), 0.1)],
                        f"{scope}/LayerNormalization", axis=-1, epsilon=1e-5)
        x = node("Cast", [x], f"{scope}/Cast", to=TensorProto.FLOAT)
        sq = node("Pow", [x, f32(f"{scope}/two", 2.0)], f"{scope}/Pow")
        mean = node("ReduceMean", [sq], f"{scope}/ReduceMean", axes=[-1], keepdims=1)
        rms = node("Sqrt", [node("Add", [mean, f32(f"{scope}/eps", 1e-6)], f"{scope}/Add")],
                   f"{scope}/Sqrt")
        inv = node("Div", [f32(f"{scope}/one", 1.0), rms], f"{scope}/Div")
        if spec["norm"] == "rms":
            w = weight(f"{scope}.weight", (width,), 0.1, 1.0)
        else:
            # Gemma's (1 + w), unfolded, from an fp16 weight: as an export without constant
            # folding writes it
            w = node("Add", [node("Cast", [const(f"{scope}.weight_fp16", (
                0.1 * rng.standard_normal(width)).astype(np.float16))], f"{scope}/Cast_w",
                to=TensorProto.FLOAT), f32(f"{scope}/one_w", 1.0)], f"{scope}/Add_w")
        return node("Mul", [node("Mul", [x, inv], f"{scope}/Mul"), w], f"{scope}/Mul_1")

    inputs, outputs = hf_decoder_io(len(spec["windows"]), vocab, kv_heads, head)

    emb = weight("embed_tokens.weight", (vocab, hidden), 1.0)
    x = node("Gather", [emb, "input_ids"], "/embed_tokens/Gather")
    if not rotary:
        x = node("Add", [x, node("Gather", [weight("wpe.weight", (256, hidden), 0.5),
                                            "position_ids"], "/wpe/Gather")], "/embed/Add")
    else:
        r = "/rotary_emb"
        pos = node("Cast", [node("Unsqueeze", ["position_ids", i64(f"{r}/axis2", 2)],
                                 f"{r}/Unsqueeze")], f"{r}/Cast", to=TensorProto.FLOAT)
        inv_freq = 1.0 / 10000.0 ** (np.arange(0, rotary, 2, dtype=np.float32) / rotary)
        freqs = node("Mul", [pos, const(f"{r}/inv_freq", inv_freq.astype(np.float32))],
                     f"{r}/Mul")
        angles = node("Concat", [freqs, freqs], f"{r}/Concat", axis=-1)
        cos = node("Unsqueeze", [node("Cos", [angles], f"{r}/Cos"), i64(f"{r}/a1", 1)],
                   f"{r}/Unsqueeze_cos")
        sin = node("Unsqueeze", [node("Sin", [angles], f"{r}/Sin"), i64(f"{r}/a1b", 1)],
                   f"{r}/Unsqueeze_sin")
    # additive masks [batch, 1, seq, total]: causal and padding, and per window
    m = "/mask"
    total = node("Gather", [node("Shape", ["attention_mask"], f"{m}/Shape"), i64(f"{m}/one", 1)],
                 f"{m}/Gather", axis=0)
    # the new tokens counted from the embeddings' shape, as transformers' mask code does
    seq = node("Gather", [node("Shape", [x], f"{m}/Shape_1"),
                          const(f"{m}/one_b", np.array(1, np.int64))], f"{m}/Gather_1", axis=0)
    seq = node("Unsqueeze", [seq, i64(f"{m}/axis_seq", 0)], f"{m}/Unsqueeze_seq")
    step = const(f"{m}/step", np.array([1], np.int64))
    rows = node("Unsqueeze", [node("Range", [node("Sub", [total, seq], f"{m}/Sub"), total, step],
                                   f"{m}/Range"), i64(f"{m}/axis1", 1)], f"{m}/Unsqueeze")
    cols = node("Unsqueeze", [node("Range", [i64(f"{m}/zero", 0), total, step],
                                   f"{m}/Range_1"), i64(f"{m}/axis0", 0)], f"{m}/Unsqueeze_1")
    pad = node("Unsqueeze", [node("Cast", ["attention_mask"], f"{m}/Cast", to=TensorProto.BOOL),
                             i64(f"{m}/axes12", 1, 2)], f"{m}/Unsqueeze_2")
    causal = node("And", [node("LessOrEqual", [cols, rows], f"{m}/LessOrEqual"), pad], f"{m}/And")
    masks: dict[int, str] = {}
    for window in sorted(set(spec["windows"])):
        allowed = causal
        if window:
            near = node("Greater", [cols, node("Sub", [rows, i64(f"{m}/w{window}", window)],
                                              f"{m}/Sub_w{window}")], f"{m}/Greater_w{window}")
            allowed = node("And", [causal, near], f"{m}/And_w{window}")
        masks[window] = node("Where", [allowed, f32(f"{m}/zero_f{window}", 0.0),
                                       f32(f"{m}/min{window}", np.finfo(np.float32).min)],
                             f"{m}/Where_w{window}")

    heads_shape = i64("/heads_shape", 0, 0, -1, head)
    for i, window in enumerate(spec["windows"]):
        a = f"/layers.{i}/attn"
        h = norm(x, f"/layers.{i}/ln_1", hidden)
        # the residual reads the norm's float Cast, as in a torch export
        residual = f"/layers.{i}/ln_1/Cast_output_0" if spec["norm"] != "layer" else x
        if spec["packed"]:
            flat = node("Reshape", [h, i64(f"{a}/flat", -1, hidden)], f"{a}/c_attn/Reshape")
            qkv = node("Gemm", [flat, weight(f"layers.{i}.c_attn.weight", (hidden, 3 * hidden)),
                                weight(f"layers.{i}.c_attn.bias", (3 * hidden,), 0.1)],
                       f"{a}/c_attn/Gemm")
            qkv = node("Reshape", [qkv, i64(f"{a}/unflat", 1, -1, 3 * hidden)],
                       f"{a}/c_attn/Reshape_1")
            node("Split", [qkv, i64(f"{a}/sizes", hidden, hidden, hidden)], f"{a}/Split",
                 outputs=3, axis=2)
            q, k, v = (f"{a}/Split_output_{j}" for j in range(3))
        else:
            def project(tag: str, width: int, *, a: str = a, h: str = h, i: int = i) -> str:
                mm = node("MatMul", [h, weight(f"layers.{i}.{tag}.weight", (hidden, width))],
                          f"{a}/{tag}/MatMul")
                if spec["norm"] != "layer":
                    return mm
                return node("Add", [weight(f"layers.{i}.{tag}.bias", (width,), 0.1), mm],
                            f"{a}/{tag}/Add")

            q, k, v = (project("q_proj", hidden), project("k_proj", kv_heads * head),
                       project("v_proj", kv_heads * head))

        def split_heads(t: str, tag: str, *, a: str = a, i: int = i) -> str:
            t4 = node("Transpose", [node("Reshape", [t, heads_shape], f"{a}/{tag}/Reshape")],
                      f"{a}/{tag}/Transpose", perm=[0, 2, 1, 3])
            if spec["qk_norm"] and tag != "v":
                t4 = norm(t4, f"/layers.{i}/attn/{tag}_norm", head)
            return t4

        def rope(t: str, tag: str, *, a: str = a) -> str:
            def half(src: str, sub: str) -> str:
                return node("Unsqueeze", [node("Div", [node("Gather", [
                    node("Shape", [src], f"{a}/{sub}/Shape"),
                    const(f"{a}/{sub}/three", np.array(3, np.int64))], f"{a}/{sub}/Gather",
                    axis=0), const(f"{a}/{sub}/two", np.array(2, np.int64))], f"{a}/{sub}/Div"),
                    i64(f"{a}/{sub}/axis0", 0)], f"{a}/{sub}/Unsqueeze")

            last, one = i64(f"{a}/{tag}/last", 3), i64(f"{a}/{tag}/stride", 1)
            part = t
            if rotary < head:
                part = node("Slice", [t, i64(f"{a}/{tag}/r0", 0), i64(f"{a}/{tag}/r1", rotary),
                                      last, one], f"{a}/{tag}/Slice_rot")
            mid = half(part, f"{tag}_half")
            x1 = node("Slice", [part, i64(f"{a}/{tag}/s0", 0), mid, last, one], f"{a}/{tag}/Slice")
            x2 = node("Slice", [part, mid, i64(f"{a}/{tag}/end", 2 ** 62), last, one],
                      f"{a}/{tag}/Slice_1")
            rot = node("Concat", [node("Neg", [x2], f"{a}/{tag}/Neg"), x1], f"{a}/{tag}/Concat",
                       axis=-1)
            out = node("Add", [node("Mul", [part, cos], f"{a}/{tag}/Mul"),
                               node("Mul", [rot, sin], f"{a}/{tag}/Mul_1")], f"{a}/{tag}/Add")
            if rotary < head:
                rest = node("Slice", [t, i64(f"{a}/{tag}/p0", rotary),
                                      i64(f"{a}/{tag}/p1", 2 ** 62), last, one],
                            f"{a}/{tag}/Slice_pass")
                out = node("Concat", [out, rest], f"{a}/{tag}/Concat_pass", axis=-1)
            return out

        q4, k4, v4 = split_heads(q, "q"), split_heads(k, "k"), split_heads(v, "v")
        if rotary:
            q4, k4 = rope(q4, "q_rot"), rope(k4, "k_rot")
        nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.key", k4],
                                      [f"present.{i}.key"], name=f"{a}/Concat_k", axis=-2))
        nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.value", v4],
                                      [f"present.{i}.value"], name=f"{a}/Concat_v", axis=-2))
        keys, values = f"present.{i}.key", f"present.{i}.value"
        if heads != kv_heads:
            expand = i64(f"{a}/expand", 1, 1, heads // kv_heads, 1, 1)
            merged = i64(f"{a}/merged", 0, heads, -1, head)

            def repeat(t: str, tag: str, *, a: str = a, expand: str = expand,
                       merged: str = merged) -> str:
                e = node("Expand", [node("Unsqueeze", [t, i64(f"{a}/{tag}/axis2", 2)],
                                         f"{a}/{tag}/Unsqueeze"), expand], f"{a}/{tag}/Expand")
                return node("Reshape", [e, merged], f"{a}/{tag}/Reshape")

            keys, values = repeat(keys, "repeat_k"), repeat(values, "repeat_v")
        kt = node("Transpose", [keys], f"{a}/Transpose_kt", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [q4, kt], f"{a}/MatMul"),
                              f32(f"{a}/scale", head ** -0.5)], f"{a}/Mul_scale")
        if spec["softcap"]:
            cap = f32(f"{a}/cap", spec["softcap"])
            scores = node("Mul", [node("Tanh", [node("Div", [scores, cap], f"{a}/Div_cap")],
                                       f"{a}/Tanh"), cap], f"{a}/Mul_cap")
        probs = node("Softmax", [node("Add", [scores, masks[window]], f"{a}/Add_mask")],
                     f"{a}/Softmax", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, values], f"{a}/MatMul_1")],
                   f"{a}/Transpose_ctx", perm=[0, 2, 1, 3])
        if spec["packed"]:
            dims = [node("Unsqueeze", [node("Gather", [node("Shape", [ctx], f"{a}/Shape_{d}"),
                                                       const(f"{a}/dim{d}", np.array(d))],
                                            f"{a}/Gather_{d}", axis=0), i64(f"{a}/ax{d}", 0)],
                         f"{a}/Unsqueeze_{d}") for d in (0, 1)]
            out_shape = node("Concat", [*dims, i64(f"{a}/width", hidden)], f"{a}/Concat_shape",
                             axis=0)
        else:
            out_shape = i64(f"{a}/out_shape", 0, 0, hidden)
        ctx = node("Reshape", [ctx, out_shape], f"{a}/Reshape_ctx")
        o = node("MatMul", [ctx, weight(f"layers.{i}.o_proj.weight", (hidden, hidden))],
                 f"{a}/o_proj/MatMul")
        x = node("Add", [residual, o], f"/layers.{i}/Add")
        h = norm(x, f"/layers.{i}/ln_2", hidden)
        residual = f"/layers.{i}/ln_2/Cast_output_0" if spec["norm"] != "layer" else x
        up = node("MatMul", [h, weight(f"layers.{i}.up.weight", (hidden, 2 * hidden))],
                  f"/layers.{i}/mlp/up/MatMul")
        act = node("Mul", [up, node("Sigmoid", [up], f"/layers.{i}/mlp/Sigmoid")],
                   f"/layers.{i}/mlp/Mul")
        down = node("MatMul", [act, weight(f"layers.{i}.down.weight", (2 * hidden, hidden))],
                    f"/layers.{i}/mlp/down/MatMul")
        x = node("Add", [residual, down], f"/layers.{i}/Add_1")
    h = norm(x, "/norm", hidden)
    # the lm_head tied to the embedding (a second use of it)
    lm = node("Transpose", [emb], "/lm_head/Transpose", perm=[1, 0])
    nodes.append(helper.make_node("MatMul", [h, lm], ["logits"], name="/lm_head/MatMul"))
    graph = helper.make_graph(nodes, f"{family}_decoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def family_inputs(family: str, seq: int = 4, past: int = 3, *, vocab: int = 64,
                  seed: int = 1) -> dict[str, np.ndarray]:
    """A feed for ``family_decoder``: ``seq`` new tokens after ``past`` cached ones."""
    spec = FAMILIES[family]
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64),
             "attention_mask": np.ones((1, past + seq), np.int64),
             "position_ids": np.arange(past, past + seq, dtype=np.int64).reshape(1, seq)}
    for i in range(len(spec["windows"])):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal(
                (1, spec["kv_heads"], past, spec["head"])).astype(np.float32)
    return feeds
