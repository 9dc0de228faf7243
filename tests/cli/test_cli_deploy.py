"""``opstudio optimize -o DIR/`` on a model in a runtime folder: a folder the runtime loads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llm_builders import runtime_folder
from opstudio.cli import main
from opstudio.core.measure.generate import Greedy

INT4 = {"version": 1, "steps": [{"op_types": ["MatMul"], "technique": "int4-weight",
                                 "params": {"block_size": 16}}]}
HEADS = {"version": 1, "steps": [{"name_pattern": "*/q_proj/MatMul", "technique": "prune",
                                  "params": {"structured": True, "sparsity": 0.5}}]}
PROMPT = [0, 5, 7, 9]


def recipe(tmp_path, steps) -> str:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(steps))
    return str(path)


def genai_tokens(folder, n: int) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + n, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([PROMPT], dtype=np.int32))
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def ort_tokens(model_path, n: int) -> list[int]:
    runner = Greedy(model_path, np.array(PROMPT))
    return [runner.step()[0] for _ in range(n)]


def test_int4_genai_folder_runs_in_onnxruntime_genai_as_written(tmp_path, capsys):
    src = runtime_folder(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["optimize", str(src), "--recipe", recipe(tmp_path, INT4),
                 "-o", f"{out}/"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "genai_config.json").read_text())
    source = json.loads((src.parent / "genai_config.json").read_text())
    assert config == source  # same file name, same heads: nothing to change
    assert "wrote the onnxruntime-genai folder" in printed
    # onnxruntime-genai greedy = opstudio's own loop on the written model, token for token
    tokens = genai_tokens(out, 12)
    assert len(tokens) == 12 and tokens == ort_tokens(out / "model.onnx", 12)
    assert "onnxruntime-genai loads" in printed and "generated 8 token(s)" in printed


def test_head_pruning_writes_the_new_head_count_and_the_folder_generates(tmp_path, capsys):
    src = runtime_folder(tmp_path / "src", heads=4, kv_heads=2)
    out = tmp_path / "out"
    assert main(["optimize", str(src), "--recipe", recipe(tmp_path, HEADS), "-o", str(out) + "/",
                 "--report", str(tmp_path / "r.json")]) == 0
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["num_attention_heads"] == 2 and decoder["num_key_value_heads"] == 2
    assert decoder["head_size"] == 16  # the KV cache keeps its shape
    search = json.loads((src.parent / "genai_config.json").read_text())["search"]
    assert json.loads((out / "genai_config.json").read_text())["search"] == search
    assert "config: model.decoder.num_attention_heads = 2" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["folder"]["config_changes"] == {"model.decoder.num_attention_heads": 2}
    tokens = genai_tokens(out, 10)
    assert tokens == ort_tokens(out / "model.onnx", 10)


def test_hf_folder_keeps_config_and_copies_generation_and_tokenizer_files(tmp_path, capsys):
    src = runtime_folder(tmp_path / "src", style="hf")
    out = tmp_path / "out"
    assert main(["optimize", str(src), "--recipe", recipe(tmp_path, INT4),
                 "-o", f"{out}/"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.onnx", "tokenizer.json",
        "tokenizer_config.json"]
    assert (json.loads((out / "config.json").read_text())
            == json.loads((src.parent / "config.json").read_text()))
    printed = capsys.readouterr().out
    assert "wrote the HF/optimum folder" in printed
    assert "with its cache fed back and generated 8 token(s)" in printed


def test_a_folder_that_is_not_empty_is_refused_unless_overwrite(tmp_path, capsys):
    src = runtime_folder(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["optimize", str(src), "--recipe", recipe(tmp_path, INT4), "-o", str(out)]
    assert main(args) == 1
    assert "is a folder that is not empty (use --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main([*args, "--overwrite"]) == 0
    # the files the export writes are replaced; the user's others stay
    assert (out / "notes.txt").read_text() == "mine" and (out / "genai_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".opstudio-export-")]


def test_the_source_folder_itself_is_refused(tmp_path, capsys):
    src = runtime_folder(tmp_path / "src")
    assert main(["optimize", str(src), "--recipe", recipe(tmp_path, INT4), "-o",
                 str(src.parent) + "/", "--overwrite"]) == 1
    assert "is the original model's folder" in capsys.readouterr().err


def test_a_model_outside_a_runtime_folder_is_written_as_a_file_into_the_folder(tmp_path):
    src = runtime_folder(tmp_path / "src")
    (src.parent / "genai_config.json").unlink()
    out = tmp_path / "out"
    out.mkdir()
    assert main(["optimize", str(src), "--recipe", recipe(tmp_path, INT4), "-o", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ["model.onnx"]


def test_a_fused_hf_folder_also_loads_in_onnxruntime_genai_and_says_the_same(tmp_path, capsys):
    from llm_builders import llama_decoder
    from opstudio.core.model.model_io import save_model

    src = runtime_folder(tmp_path / "src", style="hf")
    save_model(llama_decoder(layers=2, vocab=64, hidden=64, heads=4, kv_heads=2), src,
               overwrite=True)
    config = json.loads((src.parent / "config.json").read_text())
    config.update(model_type="llama", num_key_value_heads=2, max_position_embeddings=512)
    (src.parent / "config.json").write_text(json.dumps(config))
    fuse = {"version": 1, "steps": [{"op_types": ["Pow", "Neg", "Sigmoid"],
                                     "technique": "fuse"}]}
    out = tmp_path / "out"
    assert main(["optimize", str(src), "--recipe", recipe(tmp_path, fuse), "-o", f"{out}/"]) == 0
    printed = capsys.readouterr().out
    assert "genai_config.json written too" in printed
    assert "onnxruntime-genai loads" in printed and "with its cache fed back" in printed
    genai = json.loads((out / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (4, 2)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["inputs"]["position_ids"] == "position_ids"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert genai["search"]["past_present_share_buffer"] is True
    assert genai["model"]["context_length"] == 512  # the config's, below the rotary cache's
    assert genai_tokens(out, 6) == ort_tokens(src, 6)
    # optimized again, the folder keeps serving both runtimes
    kv8 = {"version": 1, "steps": [{"op_types": ["GroupQueryAttention"], "technique": "kv-cache",
                                    "params": {"bits": 8}}]}
    again = tmp_path / "again"
    assert main(["optimize", str(out / "model.onnx"), "--recipe", recipe(tmp_path, kv8),
                 "-o", f"{again}/"]) == 0
    printed = capsys.readouterr().out
    assert "wrote the onnxruntime-genai and HF/optimum folder" in printed
    assert {"config.json", "genai_config.json"} <= {p.name for p in again.iterdir()}
    assert "onnxruntime-genai loads" in printed and "with its cache fed back" in printed


def test_an_unfused_hf_folder_gets_no_genai_config(tmp_path):
    src = runtime_folder(tmp_path / "src", style="hf")
    out = tmp_path / "out"
    assert main(["optimize", str(src), "--recipe", recipe(tmp_path, INT4),
                 "-o", f"{out}/"]) == 0
    assert not (out / "genai_config.json").exists()
