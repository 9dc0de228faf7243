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


def kv_decoder(style: str = "gqa", *, layers: int = 2, vocab: int = 64, hidden: int = 64,
               heads: int = 4, kv_heads: int = 2, head_dim_name: str | None = None,
               max_positions: int = 1024, seed: int = 0) -> onnx.ModelProto:
    """A tiny decoder with a KV cache, shaped like the exports LLM users run.

    ``style="gqa"`` is an onnxruntime-genai export: input_ids, attention_mask and
    past_key_values.N.key/value [batch_size, kv_heads, past_sequence_length, head]; seqlens_k and
    the total length are computed in-graph from attention_mask (ReduceSum/Sub/Cast and
    Shape/Gather) for com.microsoft GroupQueryAttention with rotary embeddings.
    ``style="hf"`` is an HF/optimum export: position_ids too, MatMul/Softmax attention over the
    Concat of past and new keys, a causal and padding mask, learned positions, fp16 weights each
    behind a Cast to float (one KV head per query head). Both tie the embedding to the lm_head
    through a Transpose and give logits [batch_size, sequence_length, vocab] and present.N.*.
    ``head_dim_name`` makes the KV inputs' and outputs' head size symbolic."""
    if style not in ("gqa", "hf"):
        raise ValueError(style)
    rng = np.random.default_rng(seed)
    head = hidden // heads
    kv_heads = heads if style == "hf" else kv_heads
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def weight(name: str, shape: tuple[int, ...], scale: float = 0.3) -> str:
        w = (scale * rng.standard_normal(shape)).astype(np.float32)
        if style == "gqa":
            return const(name, w)
        const(name + ".fp16", w.astype(np.float16))
        nodes.append(helper.make_node("Cast", [name + ".fp16"], [name], to=TensorProto.FLOAT,
                                      name=f"/{name}/Cast"))
        return name

    def node(op: str, inputs: list[str], name: str, domain: str = "", outputs: int = 1,
             **attrs) -> list[str]:
        outs = [f"{name}/output_{i}" for i in range(outputs)]
        nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None,
                                      **attrs))
        return outs

    d_name = head_dim_name or head
    kv_shape = ["batch_size", kv_heads, "past_sequence_length", d_name]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                            ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"])]
    if style == "hf":
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                                    ["batch_size", "sequence_length"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", vocab])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}",
                                                        TensorProto.FLOAT, kv_shape))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", TensorProto.FLOAT,
                ["batch_size", kv_heads, "total_sequence_length", d_name]))

    emb = weight("model.embed_tokens.weight", (vocab, hidden), 1.0)
    x = node("Gather", [emb, "input_ids"], "/model/embed_tokens/Gather")[0]
    one = const("/model/constants/INT64/[1]", np.array([1], np.int64))
    if style == "gqa":
        summed = node("ReduceSum", ["attention_mask", one], "/model/attn_mask/ReduceSum",
                      keepdims=0)[0]
        less = node("Sub", [summed, one], "/model/attn_mask/Sub")[0]
        seqlens_k = node("Cast", [less], "/model/attn_mask/Sub/Cast", to=TensorProto.INT32)[0]
        shape = node("Shape", ["attention_mask"], "/model/attn_mask/Shape")[0]
        total = node("Gather", [shape, const("/model/constants/INT64/1", np.array(1, np.int64))],
                     "/model/attn_mask/Gather", axis=0)[0]
        total32 = node("Cast", [total], "/model/attn_mask/Gather/Cast", to=TensorProto.INT32)[0]
        inv = 1.0 / 10000.0 ** (np.arange(0, head, 2, dtype=np.float64) / head)
        angles = np.outer(np.arange(max_positions), inv)
        cos = const("cos_cache", np.cos(angles).astype(np.float32))
        sin = const("sin_cache", np.sin(angles).astype(np.float32))
    else:
        pos = weight("model.embed_positions.weight", (max_positions, hidden), 1.0)
        x = node("Add", [x, node("Gather", [pos, "position_ids"],
                                 "/model/embed_positions/Gather")[0]], "/model/embed/Add")[0]
        qkv_shape = const("/model/constants/INT64/qkv_shape", np.array([0, 0, heads, head],
                                                                         np.int64))
        out_shape = const("/model/constants/INT64/out_shape", np.array([0, 0, hidden], np.int64))
        scale = const("/model/constants/FLOAT/scale", np.array(head ** -0.5, np.float32))
        neg = const("/model/constants/FLOAT/neg", np.array(-1e9, np.float32))
        zero = const("/model/constants/INT64/0", np.array(0, np.int64))
        two = const("/model/constants/INT64/2", np.array(2, np.int64))
        axes12 = const("/model/constants/INT64/[1,2]", np.array([1, 2], np.int64))
        axes0 = const("/model/constants/INT64/[0]", np.array([0], np.int64))
        pad = node("Cast", ["attention_mask"], "/model/attn_mask/Cast", to=TensorProto.BOOL)[0]
        pad = node("Unsqueeze", [pad, axes12], "/model/attn_mask/Unsqueeze")[0]
    for i in range(layers):
        p = f"/model/layers.{i}/attn"
        w = f"model.layers.{i}.attn"
        q = node("MatMul", [x, weight(f"{w}.q_proj.weight", (hidden, heads * head))],
                 f"{p}/q_proj/MatMul")[0]
        k = node("MatMul", [x, weight(f"{w}.k_proj.weight", (hidden, kv_heads * head))],
                 f"{p}/k_proj/MatMul")[0]
        v = node("MatMul", [x, weight(f"{w}.v_proj.weight", (hidden, kv_heads * head))],
                 f"{p}/v_proj/MatMul")[0]
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        if style == "gqa":
            q = node("Add", [q, const(f"{w}.q_proj.bias",
                                      (0.1 * rng.standard_normal(heads * head)).astype(
                                          np.float32))], f"{p}/q_proj/Add")[0]
            nodes.append(helper.make_node(
                "GroupQueryAttention", [q, k, v, past_k, past_v, seqlens_k, total32, cos, sin],
                [f"{p}/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
                name=f"{p}/GroupQueryAttention", domain="com.microsoft", num_heads=heads,
                kv_num_heads=kv_heads, do_rotary=1, scale=head ** -0.5))
            attn = f"{p}/GroupQueryAttention/output_0"
        else:
            def split(t: str, scope: str) -> str:
                r = node("Reshape", [t, qkv_shape], f"{scope}/Reshape")[0]
                return node("Transpose", [r], f"{scope}/Transpose", perm=[0, 2, 1, 3])[0]

            q4, k4, v4 = split(q, f"{p}/q"), split(k, f"{p}/k"), split(v, f"{p}/v")
            nodes.append(helper.make_node("Concat", [past_k, k4], [f"present.{i}.key"], axis=2,
                                          name=f"{p}/k/Concat"))
            nodes.append(helper.make_node("Concat", [past_v, v4], [f"present.{i}.value"],
                                          axis=2, name=f"{p}/v/Concat"))
            kt = node("Transpose", [f"present.{i}.key"], f"{p}/k/Transpose_T",
                      perm=[0, 1, 3, 2])[0]
            scores = node("Mul", [node("MatMul", [q4, kt], f"{p}/qk/MatMul")[0], scale],
                          f"{p}/qk/Mul")[0]
            total_len = node("Gather", [node("Shape", [f"present.{i}.key"],
                                             f"{p}/mask/Shape_k")[0], two],
                             f"{p}/mask/Gather_total", axis=0)[0]
            seq_len = node("Gather", [node("Shape", [q4], f"{p}/mask/Shape_q")[0], two],
                           f"{p}/mask/Gather_seq", axis=0)[0]
            past_len = node("Sub", [total_len, seq_len], f"{p}/mask/Sub")[0]
            one_s = const(f"{p}/one", np.array(1, np.int64))
            rows = node("Range", [past_len, total_len, one_s], f"{p}/mask/Range_rows")[0]
            rows = node("Unsqueeze", [rows, one], f"{p}/mask/Unsqueeze_rows")[0]
            cols = node("Range", [zero, total_len, one_s], f"{p}/mask/Range_cols")[0]
            cols = node("Unsqueeze", [cols, axes0], f"{p}/mask/Unsqueeze_cols")[0]
            causal = node("LessOrEqual", [cols, rows], f"{p}/mask/LessOrEqual")[0]
            allowed = node("And", [causal, pad], f"{p}/mask/And")[0]
            scores = node("Where", [allowed, scores, neg], f"{p}/mask/Where")[0]
            probs = node("Softmax", [scores], f"{p}/Softmax", axis=-1)[0]
            ctx = node("MatMul", [probs, f"present.{i}.value"], f"{p}/pv/MatMul")[0]
            ctx = node("Transpose", [ctx], f"{p}/ctx/Transpose", perm=[0, 2, 1, 3])[0]
            attn = node("Reshape", [ctx, out_shape], f"{p}/ctx/Reshape")[0]
        o = node("MatMul", [attn, weight(f"{w}.o_proj.weight", (heads * head, hidden))],
                 f"{p}/o_proj/MatMul")[0]
        x = node("Add", [x, o], f"/model/layers.{i}/residual/Add")[0]
    lm = node("Transpose", [emb], "/lm_head/Transpose", perm=[1, 0])[0]
    nodes.append(helper.make_node("MatMul", [x, lm], ["logits"], name="/lm_head/MatMul"))
    graph = helper.make_graph(nodes, f"kv_decoder_{style}", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17)]
    if style == "gqa":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def prompt_inputs(length: int = 5, vocab: int = 64, seed: int = 3,
                  position_ids: bool = False) -> dict[str, np.ndarray]:
    """A prompt as a user would save it for --inputs: token ids, mask, no past."""
    rng = np.random.default_rng(seed)
    out = {"input_ids": rng.integers(0, vocab, size=(1, length)).astype(np.int64),
           "attention_mask": np.ones((1, length), np.int64)}
    if position_ids:
        out["position_ids"] = np.arange(length, dtype=np.int64).reshape(1, -1)
    return out


def word_tokenizer(path, vocab: int = 64, text: str | None = None) -> None:
    """A word-level tokenizer.json of ``vocab`` entries (unknown words → [UNK], id 0) trained
    on ``text`` (default the built-in passage), as a model's own tokenizer is saved beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from opstudio.core.measure.text_prompt import builtin_text

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab, special_tokens=["[UNK]"])
    tok.train_from_iterator([text if text is not None else builtin_text()], trainer)
    tok.save(str(path))


def numbered_tokenizer(vocab: int = 64) -> str:
    """A tokenizer.json for a tiny decoder: ``<s>``, ``</s>`` and the words w2 … w{vocab-1},
    split on spaces, ``<s>`` put before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", 0)])
    return tok.to_str()


def runtime_folder(folder, style: str = "gqa", *, layers: int = 2, vocab: int = 64,
                   heads: int = 4, kv_heads: int = 2, hidden: int = 64,
                   chat_template: str | None = None):
    """``folder`` as the exporters leave it: ``model.onnx`` (``kv_decoder``) with an
    onnxruntime-genai ``genai_config.json`` (``style="gqa"``) or an HF/optimum ``config.json``
    and ``generation_config.json`` (``style="hf"``), a tokenizer (``numbered_tokenizer``) and its
    config. Returns the model's path."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = kv_decoder(style, layers=layers, vocab=vocab, hidden=hidden, heads=heads,
                       kv_heads=kv_heads)
    onnx.save(model, folder / "model.onnx")
    kv_heads = heads if style == "hf" else kv_heads
    (folder / "tokenizer.json").write_text(numbered_tokenizer(vocab))
    tok_config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    if style == "gqa":
        config = {
            "model": {
                "bos_token_id": 0, "context_length": 256, "eos_token_id": 1, "pad_token_id": 1,
                "type": "qwen2", "vocab_size": vocab,
                "decoder": {
                    "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                    "filename": "model.onnx", "head_size": hidden // heads,
                    "hidden_size": hidden, "num_attention_heads": heads,
                    "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
                    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                               "past_key_names": "past_key_values.%d.key",
                               "past_value_names": "past_key_values.%d.value"},
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                "present_value_names": "present.%d.value"}}},
            "search": {"do_sample": False, "max_length": 256, "min_length": 0, "num_beams": 1,
                       "past_present_share_buffer": False, "top_k": 1, "top_p": 1.0,
                       "temperature": 1.0, "repetition_penalty": 1.0}}
        (folder / "genai_config.json").write_text(json.dumps(config, indent=4))
    else:
        config = {"architectures": ["TinyForCausalLM"], "model_type": "tiny",
                  "hidden_size": hidden, "num_attention_heads": heads,
                  "num_key_value_heads": kv_heads, "num_hidden_layers": layers,
                  "intermediate_size": 4 * hidden, "vocab_size": vocab,
                  "bos_token_id": 0, "eos_token_id": 1}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        (folder / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 0, "eos_token_id": 1}))
    return folder / "model.onnx"


def hf_decoder_io(layers: int, vocab: int, kv_heads: int, head: int
                  ) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """An HF/optimum decoder's inputs (input_ids, attention_mask, position_ids, the past) and
    outputs (logits, the present), as optimum names and sizes them."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch_size", d])
              for n, d in (("input_ids", "sequence_length"),
                           ("attention_mask", "total_sequence_length"),
                           ("position_ids", "sequence_length"))]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", vocab])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                ["batch_size", kv_heads, "past_sequence_length", head]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", TensorProto.FLOAT,
                ["batch_size", kv_heads, "total_sequence_length", head]))
    return inputs, outputs


def llama_decoder(*, layers: int = 2, vocab: int = 64, hidden: int = 64, heads: int = 4,
                  kv_heads: int = 2, norm: str = "div", axes: str = "attribute",
                  bias: bool = False, seed: int = 0) -> onnx.ModelProto:
    """A Llama-family decoder as torch's exporter writes it for HF/optimum (SmolLM2, Llama,
    Qwen2 without biases): RMSNorm as Cast/Pow/ReduceMean/Add/Sqrt/(Div 1 by | Reciprocal)/Mul/
    Cast/Mul by a float16 weight behind a Cast; residual Adds whose sum the next norm casts to
    float and the following residual reads through that Cast; rotary embeddings computed from
    position_ids (Unsqueeze/Cast/Mul by inv_freq, Concat, Cos/Sin) and applied with rotate_half,
    whose Slices split the last axis at Shape/2; repeat_kv with Expand, causal plus padding mask,
    a SiLU MLP. ``norm`` is "div" or "reciprocal"; ``axes`` "attribute" (opset 17) or "input"
    (opset 18, ReduceMean's axes as an input); ``bias`` adds q/k/v biases (Qwen2)."""
    rng = np.random.default_rng(seed)
    head = hidden // heads
    group = heads // kv_heads
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{name}_output_0"], name=name, **attrs))
        return f"{name}_output_0"

    def weight(name: str, shape: tuple[int, ...], scale: float = 0.3, offset: float = 0.0) -> str:
        w = (offset + scale * rng.standard_normal(shape)).astype(np.float16)
        const(name + "_fp16", w)
        nodes.append(helper.make_node("Cast", [name + "_fp16"], [name], to=TensorProto.FLOAT,
                                      name=name + "_cast"))
        return name

    def constant(name: str, value: np.ndarray) -> str:
        """A Constant node, as torch's exporter writes a norm's exponent and epsilon."""
        nodes.append(helper.make_node("Constant", [], [f"{name}_output_0"], name=name,
                                      value=numpy_helper.from_array(value)))
        return f"{name}_output_0"

    def rms_norm(x: str, scope: str, w: str) -> str:
        x = node("Cast", [x], f"{scope}/Cast", to=TensorProto.FLOAT)
        sq = node("Pow", [x, constant(f"{scope}/Constant", np.array(2.0, np.float32))],
                  f"{scope}/Pow")
        if axes == "attribute":
            mean = node("ReduceMean", [sq], f"{scope}/ReduceMean", axes=[-1], keepdims=1)
        else:
            mean = node("ReduceMean", [sq, const(f"{scope}/axes", np.array([-1], np.int64))],
                        f"{scope}/ReduceMean", keepdims=1)
        var = node("Add", [mean, constant(f"{scope}/Constant_1", np.array(1e-5, np.float32))],
                   f"{scope}/Add")
        rms = node("Sqrt", [var], f"{scope}/Sqrt")
        if norm == "div":
            inv = node("Div", [const(f"{scope}/one", np.array(1.0, np.float32)), rms],
                       f"{scope}/Div")
        else:
            inv = node("Reciprocal", [rms], f"{scope}/Reciprocal")
        y = node("Cast", [node("Mul", [x, inv], f"{scope}/Mul")], f"{scope}/Cast_1",
                 to=TensorProto.FLOAT)
        return node("Mul", [w, y], f"{scope}/Mul_1")

    def i64(name: str, *values: int) -> str:
        return const(name, np.array(values, np.int64))

    inputs, outputs = hf_decoder_io(layers, vocab, kv_heads, head)

    emb = weight("model.embed_tokens.weight", (vocab, hidden), 1.0)
    x = node("Gather", [emb, "input_ids"], "/model/embed_tokens/Gather")
    # rotary: angles [batch, seq, head] from position_ids
    r = "/model/rotary_emb"
    pos = node("Cast", [node("Unsqueeze", ["position_ids", i64(f"{r}/axis2", 2)],
                             f"{r}/Unsqueeze")], f"{r}/Cast", to=TensorProto.FLOAT)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, head, 2, dtype=np.float32) / head)
    freqs = node("Mul", [pos, const(f"{r}/inv_freq", inv_freq.astype(np.float32))], f"{r}/Mul")
    angles = node("Concat", [freqs, freqs], f"{r}/Concat", axis=-1)
    one = const(f"{r}/scaling", np.array(1.0, np.float32))
    cos = node("Cast", [node("Mul", [node("Cos", [angles], f"{r}/Cos"), one], f"{r}/Mul_1")],
               f"{r}/Cast_1", to=TensorProto.FLOAT)
    sin = node("Cast", [node("Mul", [node("Sin", [angles], f"{r}/Sin"), one], f"{r}/Mul_2")],
               f"{r}/Cast_2", to=TensorProto.FLOAT)
    # mask [batch, 1, seq, total]: causal and padding, additive
    m = "/model/mask"
    total = node("Gather", [node("Shape", ["attention_mask"], f"{m}/Shape"),
                            const(f"{m}/one", np.array(1, np.int64))], f"{m}/Gather", axis=0)
    seq = node("Gather", [node("Shape", ["input_ids"], f"{m}/Shape_1"),
                          const(f"{m}/one_b", np.array(1, np.int64))], f"{m}/Gather_1", axis=0)
    step = const(f"{m}/step", np.array(1, np.int64))
    rows = node("Unsqueeze", [node("Range", [node("Sub", [total, seq], f"{m}/Sub"), total, step],
                                   f"{m}/Range"), i64(f"{m}/axis1", 1)], f"{m}/Unsqueeze")
    cols = node("Unsqueeze", [node("Range", [const(f"{m}/zero", np.array(0, np.int64)), total,
                                             step], f"{m}/Range_1"), i64(f"{m}/axis0", 0)],
                f"{m}/Unsqueeze_1")
    pad = node("Unsqueeze", [node("Cast", ["attention_mask"], f"{m}/Cast", to=TensorProto.BOOL),
                             i64(f"{m}/axes12", 1, 2)], f"{m}/Unsqueeze_2")
    allowed = node("And", [node("LessOrEqual", [cols, rows], f"{m}/LessOrEqual"), pad],
                   f"{m}/And")
    additive = node("Where", [allowed, const(f"{m}/zero_f", np.array(0.0, np.float32)),
                          const(f"{m}/min", np.array(np.finfo(np.float32).min, np.float32))],
                f"{m}/Where")

    qkv_shape = i64("/model/qkv_shape", 0, 0, -1, head)
    kv_expand = i64("/model/kv_expand", 1, 1, group, 1, 1)
    kv_shape = i64("/model/kv_shape", 0, heads, -1, head)
    out_shape = i64("/model/out_shape", 0, 0, hidden)
    for i in range(layers):
        lp = f"/model/layers.{i}"
        a = f"{lp}/self_attn"
        h = rms_norm(x, f"{lp}/input_layernorm",
                     weight(f"model.layers.{i}.input_layernorm.weight", (hidden,), 0.1, 1.0))
        residual = f"{lp}/input_layernorm/Cast_output_0"

        def project(name: str, width: int, src: str, *, lp: str = lp, a: str = a,
                    i: int = i) -> str:
            mm = node("MatMul", [src, weight(f"model.layers.{i}.{name}.weight", (hidden, width))],
                      f"{a}/{name.split('.')[-1]}/MatMul")
            if bias:
                mm = node("Add", [const(f"model.layers.{i}.{name}.bias", (
                    0.3 * rng.standard_normal(width)).astype(np.float32)), mm],
                    f"{a}/{name.split('.')[-1]}/Add")
            return node("Transpose", [node("Reshape", [mm, qkv_shape], f"{a}/{name}/Reshape")],
                        f"{a}/{name}/Transpose", perm=[0, 2, 1, 3])

        def rotate(t: str, tag: str, *, a: str = a) -> str:
            c = node("Unsqueeze", [cos, i64(f"{a}/{tag}/axis1", 1)], f"{a}/{tag}/Unsqueeze")
            s = node("Unsqueeze", [sin, i64(f"{a}/{tag}/axis1b", 1)], f"{a}/{tag}/Unsqueeze_1")
            half = node("Div", [node("Gather", [node("Shape", [t], f"{a}/{tag}/Shape"),
                                                const(f"{a}/{tag}/three",
                                                      np.array(3, np.int64))],
                                     f"{a}/{tag}/Gather", axis=0),
                                const(f"{a}/{tag}/two", np.array(2, np.int64))],
                        f"{a}/{tag}/Div")
            half = node("Unsqueeze", [half, i64(f"{a}/{tag}/axis0", 0)], f"{a}/{tag}/Unsqueeze_2")
            last = i64(f"{a}/{tag}/last", 3)
            stride = i64(f"{a}/{tag}/stride", 1)
            x1 = node("Slice", [t, i64(f"{a}/{tag}/start", 0), half, last, stride],
                      f"{a}/{tag}/Slice")
            x2 = node("Slice", [t, half, i64(f"{a}/{tag}/end", 2 ** 62), last, stride],
                      f"{a}/{tag}/Slice_1")
            rot = node("Concat", [node("Neg", [x2], f"{a}/{tag}/Neg"), x1], f"{a}/{tag}/Concat",
                       axis=-1)
            return node("Add", [node("Mul", [t, c], f"{a}/{tag}/Mul"),
                                node("Mul", [rot, s], f"{a}/{tag}/Mul_1")], f"{a}/{tag}/Add")

        q = rotate(project("self_attn.q_proj", heads * head, h), "q_rot")
        k = rotate(project("self_attn.k_proj", kv_heads * head, h), "k_rot")
        v = project("self_attn.v_proj", kv_heads * head, h)
        k = node("Concat", [f"past_key_values.{i}.key", k], f"{a}/Concat_k", axis=-2)
        v = node("Concat", [f"past_key_values.{i}.value", v], f"{a}/Concat_v", axis=-2)
        nodes[-2].output[0] = f"present.{i}.key"
        nodes[-1].output[0] = f"present.{i}.value"
        k, v = f"present.{i}.key", f"present.{i}.value"

        def repeat(t: str, tag: str, *, a: str = a) -> str:
            e = node("Expand", [node("Unsqueeze", [t, i64(f"{a}/{tag}/axis2", 2)],
                                     f"{a}/{tag}/Unsqueeze"), kv_expand], f"{a}/{tag}/Expand")
            return node("Reshape", [e, kv_shape], f"{a}/{tag}/Reshape")

        kt = node("Transpose", [repeat(k, "repeat_k")], f"{a}/Transpose_kt", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [q, kt], f"{a}/MatMul"),
                              const(f"{a}/scale", np.array(head ** -0.5, np.float32))],
                      f"{a}/Mul_scale")
        probs = node("Softmax", [node("Add", [scores, additive], f"{a}/Add_mask")], f"{a}/Softmax",
                     axis=-1)
        ctx = node("MatMul", [probs, repeat(v, "repeat_v")], f"{a}/MatMul_1")
        ctx = node("Reshape", [node("Transpose", [ctx], f"{a}/Transpose_ctx", perm=[0, 2, 1, 3]),
                               out_shape], f"{a}/Reshape_ctx")
        o = node("MatMul", [ctx, weight(f"model.layers.{i}.self_attn.o_proj.weight",
                                        (heads * head, hidden))], f"{a}/o_proj/MatMul")
        x = node("Add", [residual, o], f"{lp}/Add")
        h = rms_norm(x, f"{lp}/post_attention_layernorm",
                     weight(f"model.layers.{i}.post_attention_layernorm.weight", (hidden,), 0.1,
                            1.0))
        residual = f"{lp}/post_attention_layernorm/Cast_output_0"
        gate = node("MatMul", [h, weight(f"model.layers.{i}.mlp.gate_proj.weight",
                                         (hidden, 2 * hidden))], f"{lp}/mlp/gate_proj/MatMul")
        act = node("Mul", [gate, node("Sigmoid", [gate], f"{lp}/mlp/act_fn/Sigmoid")],
                   f"{lp}/mlp/act_fn/Mul")
        up = node("MatMul", [h, weight(f"model.layers.{i}.mlp.up_proj.weight",
                                       (hidden, 2 * hidden))], f"{lp}/mlp/up_proj/MatMul")
        down = node("MatMul", [node("Mul", [act, up], f"{lp}/mlp/Mul"),
                               weight(f"model.layers.{i}.mlp.down_proj.weight",
                                      (2 * hidden, hidden))], f"{lp}/mlp/down_proj/MatMul")
        x = node("Add", [residual, down], f"{lp}/Add_1")
    h = rms_norm(x, "/model/norm", weight("model.norm.weight", (hidden,), 0.1, 1.0))
    lm = node("Transpose", [emb], "lm_head_tied_transpose", perm=[1, 0])
    nodes.append(helper.make_node("MatMul", [h, lm], ["logits"], name="/lm_head/MatMul"))
    graph = helper.make_graph(nodes, "llama_decoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 17 if axes == "attribute" else 18)])
    model.ir_version = 8
    return model


def llama_inputs(seq: int = 4, past: int = 3, *, layers: int = 2, vocab: int = 64,
                 kv_heads: int = 2, head: int = 16, seed: int = 1) -> dict[str, np.ndarray]:
    """A decode-shaped feed for ``llama_decoder``: ``seq`` new tokens after ``past``."""
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64),
             "attention_mask": np.ones((1, past + seq), np.int64),
             "position_ids": np.arange(past, past + seq, dtype=np.int64).reshape(1, seq)}
    for i in range(layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal(
                (1, kv_heads, past, head)).astype(np.float32)
    return feeds
