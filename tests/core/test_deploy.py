"""core.deploy: what an HF config records after pruning, and which folders are runtime folders."""

from __future__ import annotations

import json

import onnx
import pytest

from llm_builders import runtime_folder
from opstudio.core.errors import OpstudioError
from opstudio.core.plan.deploy import runtime_kind, wants_folder, write_folder
from opstudio.core.plan.optimize import StepReport


def heads_step(after: dict[str, int]) -> StepReport:
    return StepReport(1, "prune", {}, applied=list(after),
                      details={n: {"heads_before": 4, "heads_after": h, "joint": [n]}
                               for n, h in after.items()})


def mlp_step(after: dict[str, int]) -> StepReport:
    return StepReport(2, "prune", {}, applied=list(after),
                      details={n: {"channels_before": 256, "channels_after": c,
                                   "joint": [n, n + "_up"]} for n, c in after.items()})


def test_hf_config_gets_heads_head_dim_and_intermediate_size_when_every_layer_agrees(tmp_path):
    src = runtime_folder(tmp_path / "src", style="hf", layers=2)
    steps = [heads_step({"q0": 2, "q1": 2}), mlp_step({"g0": 128, "g1": 128})]
    out = write_folder(onnx.load(src), src, tmp_path / "out", steps=steps)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    # head_dim written out: hidden_size / num_attention_heads no longer gives it
    assert (config["num_attention_heads"], config["head_dim"]) == (2, 16)
    assert config["intermediate_size"] == 128
    assert out.changed == {"head_dim": 16, "num_attention_heads": 2, "intermediate_size": 128}
    assert out.notes == []


def test_hf_config_left_as_it_was_with_a_note_when_layers_differ(tmp_path):
    src = runtime_folder(tmp_path / "src", style="hf", layers=2)
    steps = [heads_step({"q0": 2, "q1": 4}), heads_step({"q1": 3}), mlp_step({"g0": 128})]
    out = write_folder(onnx.load(src), src, tmp_path / "out", steps=steps)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_attention_heads"] == 4 and "head_dim" not in config
    assert out.changed == {}
    assert out.notes == [
        "head pruning left 2 of 2 layers with 2–3 query heads; config.json holds one number, "
        "num_attention_heads left at 4",
        "MLP pruning left 1 of 2 layers with 128 intermediate channels; the config holds one "
        "number, intermediate_size left at 256"]


def test_genai_config_names_the_written_model_file(tmp_path):
    src = runtime_folder(tmp_path / "src")
    renamed = src.with_name("decoder.onnx")
    src.rename(renamed)
    out = write_folder(onnx.load(renamed), renamed, tmp_path / "out")
    decoder = json.loads((tmp_path / "out" / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["filename"] == "decoder.onnx" and (tmp_path / "out" / "decoder.onnx").is_file()
    assert out.changed == {"model.decoder.filename": "decoder.onnx"}


def test_runtime_kind_and_folder_targets(tmp_path):
    genai = runtime_folder(tmp_path / "g")
    hf = runtime_folder(tmp_path / "h", style="hf")
    alone = tmp_path / "m.onnx"
    assert (runtime_kind(genai), runtime_kind(hf), runtime_kind(alone)) == ("genai", "hf", None)
    assert wants_folder("out/") and wants_folder(tmp_path) and not wants_folder("out.onnx")
    with pytest.raises(OpstudioError, match="not part of a runtime folder"):
        write_folder(onnx.load(genai), alone, tmp_path / "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(OpstudioError, match="is a file, not a folder"):
        write_folder(onnx.load(genai), genai, tmp_path / "file")
