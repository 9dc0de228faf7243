"""``opstudio generate``: the texts side by side, where they part, and the timings."""

from __future__ import annotations

import json

import onnx

from llm_builders import runtime_folder
from opstudio.cli import main


def test_two_models_print_both_texts_the_divergence_and_timings(tmp_path, capsys):
    before = runtime_folder(tmp_path / "a")
    after = tmp_path / "other.onnx"
    onnx.save(onnx.load(runtime_folder(tmp_path / "c", layers=1)), after)
    assert main(["generate", str(before), str(after), "--prompt", "w5 w7 w9",
                 "--max-tokens", "8", "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    at = report["diverges_at"]
    assert at is not None
    assert f"the texts part at generated token {at + 1} (marked ⟦)" in out
    assert out.count("⟦") == 3  # in both texts and the line that explains it
    assert "before — " in out and "after — " in out
    assert "time to first token" in out and "tokens/s" in out
    assert [r["label"] for r in report["runs"]] == ["before", "after"]


def test_one_model_and_errors(tmp_path, capsys):
    model = runtime_folder(tmp_path / "a")
    assert main(["generate", str(model), "--prompt", "w5", "--max-tokens", "3"]) == 0
    assert "⟦" not in capsys.readouterr().out
    (tmp_path / "a" / "tokenizer.json").unlink()
    assert main(["generate", str(model), "--prompt", "w5"]) == 1
    assert "name one with --tokenizer FILE" in capsys.readouterr().err
    assert main(["generate", str(model), str(model), str(model), "--prompt", "w5"]) == 1
    assert "one model, or two" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nope.onnx"), "--prompt", "w5"]) == 1
    assert "no such file" in capsys.readouterr().err
