"""`opstudio optimize` and `compare` print next-token agreement and KL for logits outputs."""

import json

import onnx
import pytest

from llm_builders import tiny_decoder
from opstudio.cli import main

DIMS = ["--dim", "seq=6", "--dim", "past=3"]


@pytest.fixture
def decoder(tmp_path):
    path = tmp_path / "decoder.onnx"
    onnx.save(tiny_decoder(vocab=1200, hidden=32), path)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"version": 1, "steps": [
        {"technique": "int4-weight", "nodes": ["lm_head"]}]}))
    return path, recipe


def test_optimize_prints_kl_and_next_token_summary(decoder, tmp_path, capsys):
    path, recipe = decoder
    out, rep = tmp_path / "int4.onnx", tmp_path / "rep.json"
    assert main(["optimize", str(path), "--recipe", str(recipe), "-o", str(out),
                 "--report", str(rep), *DIMS]) == 0
    printed = capsys.readouterr().out
    assert "KL nats" in printed and "next-token agreement " in printed
    assert "nats on logits" in printed
    acc = json.loads(rep.read_text())["accuracy"]
    logits, present = acc["outputs"]
    assert logits["kind"] == "logits" and logits["kl_divergence"] > 0
    assert present["kind"] == "kv_cache" and present["top1_agreement"] is None
    assert acc["next_token"]["outputs"] == ["logits"]
    assert acc["next_token"]["kl_divergence"] == pytest.approx(logits["kl_divergence"])


def test_compare_json_has_kl_and_the_summary_line_is_printed(decoder, capsys):
    path, _ = decoder
    assert main(["compare", str(path), str(path), "--runs", "2", "--warmup", "0",
                 "--threads", "1", *DIMS]) == 0
    assert "next-token agreement 1.00, KL 0 nats on logits" in capsys.readouterr().out
    assert main(["compare", str(path), str(path), "--runs", "2", "--warmup", "0",
                 "--threads", "1", *DIMS, "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["accuracy"]["next_token"] == {"outputs": ["logits"], "top1_agreement": 1.0,
                                              "kl_divergence": 0.0}
    assert data["accuracy"]["outputs"][1]["top1_agreement"] is None


def test_a_decode_step_after_a_synthetic_past_says_its_accuracy_means_little(tmp_path, capsys):
    import numpy as np

    from llm_builders import kv_decoder, prompt_inputs

    path, recipe = tmp_path / "kv.onnx", tmp_path / "r.json"
    onnx.save(kv_decoder("gqa"), path)
    recipe.write_text(json.dumps({"version": 1, "steps": [
        {"technique": "int8-weight", "op_types": ["MatMul"]}]}))
    out = tmp_path / "q.onnx"
    assert main(["optimize", str(path), "--recipe", str(recipe), "-o", str(out),
                 "--phase", "decode", "--past", "8"]) == 0
    assert "synthetic past of zeros" in capsys.readouterr().out
    prompt = tmp_path / "prompt.npz"
    np.savez(prompt, **prompt_inputs())
    assert main(["compare", str(path), str(out), "--phase", "decode", "--inputs", str(prompt),
                 "--runs", "3"]) == 0
    assert "synthetic past" not in capsys.readouterr().out
