"""An onnxruntime-genai config for an HF/optimum export whose attention ``fuse`` made
``GroupQueryAttention``.

onnxruntime-genai only loads the models its builder exports, described by a
``genai_config.json``; an HF export fused by opstudio has the inputs and outputs genai's decoder
reads (input_ids, attention_mask, position_ids, past_key_values.N.*, logits, present.N.*) and
every present written by a ``GroupQueryAttention``, which is what genai needs to keep the past
and present in one buffer (``past_present_share_buffer``): each step then writes its token in
place. So the optimized folder gets a ``genai_config.json`` beside its ``config.json``, made from
that config, the generation config and the model itself, and loads in both runtimes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import onnx

from opstudio.core.measure.kv_buffer import shared_pairs

# HF model types onnxruntime-genai's decoder knows by name; any other decoder is loaded as
# "llama", whose decoder reads the same inputs and outputs
GENAI_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2",
                         "gemma3_text", "granite", "olmo", "nemotron", "chatglm", "smollm3"})


def genai_config(hf: Mapping[str, Any], generation: Mapping[str, Any],
                 model: onnx.ModelProto, file_name: str) -> dict[str, Any] | None:
    """The config onnxruntime-genai loads ``model`` (written as ``file_name``) with, or None when
    its cache is not all ``GroupQueryAttention``'s (genai could not share its buffers)."""
    pairs = shared_pairs(model)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    if not pairs or not gqa:
        return None
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    names: dict[str, str] = {}
    for key, among in (("past_key_names", inputs), ("past_value_names", inputs),
                       ("present_key_names", outputs), ("present_value_names", outputs)):
        pattern = _layer_pattern(among, "key" if "key" in key else "value",
                                 "past" if key.startswith("past") else "present")
        if pattern is None:
            return None
        names[key] = pattern
    if "input_ids" not in inputs or "logits" not in outputs:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    heads, kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
    hidden = int(hf.get("hidden_size", 0))
    head = int(hf.get("head_dim") or (hidden // int(hf.get("num_attention_heads", heads))))
    context = _context_length(hf, model, gqa[0])
    decoder_inputs: dict[str, str] = {
        name: name for name in ("input_ids", "attention_mask", "position_ids") if name in inputs}
    decoder_inputs.update(past_key_names=names["past_key_names"],
                          past_value_names=names["past_value_names"])
    eos = generation.get("eos_token_id", hf.get("eos_token_id"))
    pad = generation.get("pad_token_id", hf.get("pad_token_id"))
    model_type = str(hf.get("model_type", "llama"))
    return {
        "model": {
            "bos_token_id": generation.get("bos_token_id", hf.get("bos_token_id")),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": file_name, "head_size": head, "hidden_size": hidden,
                "inputs": decoder_inputs,
                "outputs": {"logits": "logits",
                            "present_key_names": names["present_key_names"],
                            "present_value_names": names["present_value_names"]},
                "num_attention_heads": heads, "num_hidden_layers": len(gqa),
                "num_key_value_heads": kv_heads},
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "type": model_type if model_type in GENAI_TYPES else "llama",
            "vocab_size": hf.get("vocab_size")},
        "search": {
            "do_sample": bool(generation.get("do_sample", False)), "max_length": context,
            "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
            "temperature": float(generation.get("temperature", 1.0)),
            "top_k": int(generation.get("top_k", 50)), "top_p": float(generation.get("top_p", 1.0))},
    }


def _layer_pattern(names: list[str], kind: str, side: str) -> str | None:
    """``past_key_values.%d.key`` from ``past_key_values.0.key`` …: the one pattern every layer's
    cache name of ``side`` and ``kind`` follows, with the layer number as ``%d``."""
    found = {re.sub(r"\.(\d+)\.", ".%d.", n, count=1) for n in names
             if n.startswith(side) and n.endswith(kind) and re.search(r"\.\d+\.", n)}
    return found.pop() if len(found) == 1 else None


def _context_length(hf: Mapping[str, Any], model: onnx.ModelProto, gqa: onnx.NodeProto) -> int:
    """The config's longest sequence, cut to the rows of the fused rotary's cos cache (the
    positions ``fuse`` wrote it for)."""
    longest = int(hf.get("max_position_embeddings") or 0)
    rows = 0
    if len(gqa.input) > 7 and gqa.input[7]:
        for tensor in model.graph.initializer:
            if tensor.name == gqa.input[7]:
                rows = int(tensor.dims[0])
    if rows and longest:
        return min(rows, longest)
    return rows or longest or 2048
