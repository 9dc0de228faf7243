"""`compare`, `optimize` and `advise` judge a language model on the built-in text when its
tokenizer is beside it (or named), and say "synthetic tokens" when there is none."""

from __future__ import annotations

import json

import pytest

from llm_builders import kv_decoder, word_tokenizer
from opstudio.cli import main
from opstudio.core.model.model_io import save_model

FAST = ["--runs", "2", "--warmup", "0", "--threads", "1"]


@pytest.fixture
def decoder(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    path = folder / "model.onnx"
    save_model(kv_decoder("hf"), path)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"version": 1, "steps": [
        {"technique": "fp16", "nodes": ["/lm_head/MatMul"]}]}))
    return path, recipe


def test_compare_judges_on_the_builtin_text_beside_a_tokenizer(decoder, capsys):
    path, _ = decoder
    word_tokenizer(path.parent / "tokenizer.json")
    assert main(["compare", str(path), str(path), *FAST]) == 0
    out = capsys.readouterr().out
    assert "next-token agreement 1.00, KL 0 nats on logits, judged on the built-in text (" in out
    assert "synthetic" not in out
    assert "step: prefill of 128 tokens" in out  # the timing stays as documented
    assert main(["compare", str(path), str(path), *FAST, "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["accuracy"]["judged_on"].startswith("the built-in text (")
    assert data["step"] == "prefill of 128 tokens"


def test_compare_without_a_tokenizer_says_synthetic_tokens(decoder, capsys):
    path, _ = decoder
    assert main(["compare", str(path), str(path), *FAST]) == 0
    out = capsys.readouterr().out
    assert "on synthetic tokens: not a measure of quality — give the model's tokenizer.json " \
           "with --tokenizer" in out
    assert main(["compare", str(path), str(path), *FAST, "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"]["judged_on"] == "synthetic tokens"


def test_optimize_takes_a_named_tokenizer_and_another_text(decoder, tmp_path, capsys):
    path, recipe = decoder
    word_tokenizer(tmp_path / "tokenizer.json")  # not beside the model: named
    text = tmp_path / "story.txt"
    text.write_text("The sun warms the water of the sea, and the clouds grow heavy.")
    out_path, report = tmp_path / "out.onnx", tmp_path / "rep.json"
    assert main(["optimize", str(path), "--recipe", str(recipe), "-o", str(out_path),
                 "--tokenizer", str(tmp_path), "--prompt-text", str(text),
                 "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "accuracy vs the original, judged on story.txt (15 tokens):" in out
    assert "judged on story.txt (15 tokens)" in out.splitlines()[-2]
    acc = json.loads(report.read_text())["accuracy"]
    assert acc["judged_on"] == "story.txt (15 tokens)"
    assert acc["outputs"][0]["shape"] == [1, 15, 64]


def test_optimize_without_a_tokenizer_says_synthetic(decoder, tmp_path, capsys):
    path, recipe = decoder
    assert main(["optimize", str(path), "--recipe", str(recipe),
                 "-o", str(tmp_path / "o.onnx")]) == 0
    out = capsys.readouterr().out
    assert "accuracy vs the original (synthetic inputs):" in out
    assert "on synthetic tokens: not a measure of quality" in out
    assert main(["optimize", str(path), "--recipe", str(recipe), "-o", str(tmp_path / "p.onnx"),
                 "--prompt-text", str(recipe)]) == 1
    assert "name one with --tokenizer" in capsys.readouterr().err


def test_a_decode_step_judged_on_the_text_has_no_zero_past_note(decoder, capsys):
    path, _ = decoder
    word_tokenizer(path.parent / "tokenizer.json")
    assert main(["compare", str(path), str(path), *FAST, "--phase", "decode",
                 "--past", "16"]) == 0
    out = capsys.readouterr().out
    assert "judged on the built-in text" in out and "synthetic past" not in out
    assert "step: decode step after 16 tokens" in out


def test_advise_by_cosine_refuses_the_text_flags(decoder, tmp_path, capsys):
    path, _ = decoder
    assert main(["advise", str(path), "-o", str(tmp_path / "r.json"),
                 "--tokenizer", str(tmp_path)]) == 1
    assert "--tokenizer applies with --budget-top1" in capsys.readouterr().err


def test_advise_for_a_top1_budget_judges_on_the_builtin_text(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "genai"
    folder.mkdir()
    model = folder / "model.onnx"
    save_model(kv_decoder("gqa", vocab=256), model)
    word_tokenizer(folder / "tokenizer.json", vocab=256)
    report = tmp_path / "advice.json"
    assert main(["advise", str(model), "--budget-top1", "0.5", "--confidence", "0.5",
                 "--techniques", "int8-weight", "--threads", "1", "--no-cache",
                 "-o", str(tmp_path / "plan.json"), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "prompt: the built-in text (" in out  # the planner's log
    assert "synthetic" not in out
    assert json.loads(report.read_text())["kind"] == "llm"
    (folder / "tokenizer.json").unlink()
    assert main(["advise", str(model), "--budget-top1", "0.5", "--confidence", "0.5",
                 "--techniques", "int8-weight", "--threads", "1", "--no-cache",
                 "-o", str(tmp_path / "plan2.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("note: no --inputs prompt and no tokenizer: agreement is judged on "
                          "synthetic tokens")
    assert "prompt: synthetic tokens: not a measure of quality" in out
