"""The "Try it" panel and "Save optimized model as" for a model from a runtime folder."""

from __future__ import annotations

import json

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFileDialog, QMessageBox

from llm_builders import runtime_folder
from opstudio.core.measure.generate import side_by_side
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.plan.recipe import Recipe

INT4 = {"version": 1, "steps": [{"op_types": ["MatMul"], "technique": "int4-weight",
                                 "params": {"block_size": 16}}]}


def wait_run(qtbot, window, worker, timeout=60000):
    qtbot.waitUntil(lambda: worker.is_done() and window.progress.isHidden(), timeout=timeout)
    assert not window.banner.isVisible(), window.banner_text.text()


@pytest.fixture
def decoder_window(window, tmp_path):
    path = runtime_folder(tmp_path / "src")
    window.set_run_settings(ProfileSettings(runs=2, warmup=1, threads=1))
    assert window.open_model(path)
    return window, path


def test_try_it_shows_both_texts_where_they_part_and_timings(qtbot, decoder_window):
    window, path = decoder_window
    panel = window.try_it
    panel.prompt.setPlainText("w5 w7 w9")
    panel.max_tokens.setValue(8)
    # before any optimization: the original's text alone
    qtbot.mouseClick(panel.generate_button, Qt.MouseButton.LeftButton)
    wait_run(qtbot, window, window.worker)
    assert [r.label for r in panel.result.runs] == ["original"]
    assert panel.texts[1].isHidden() and "time to first token" in panel.timings[0].text()

    window.plan.replace(Recipe.from_json(INT4).steps, "int4")
    wait_run(qtbot, window, window.run_compare(), timeout=120000)
    qtbot.mouseClick(panel.generate_button, Qt.MouseButton.LeftButton)
    wait_run(qtbot, window, window.worker)
    result = panel.result
    assert [r.label for r in result.runs] == ["original", "optimized"]
    # the same texts as the core gives for the saved files
    expected = side_by_side([path, window.optimized.model], "w5 w7 w9", model_path=path,
                            max_tokens=8)
    assert [r.tokens for r in result.runs] == [r.tokens for r in expected.runs]
    assert result.diverges_at == expected.diverges_at is not None
    shown = [t.toPlainText() for t in panel.texts]
    assert shown[0].startswith(result.runs[0].text.split()[0])
    # from the first differing token on, each text is highlighted
    for k, run in enumerate(result.runs):
        marked = result.marked(run, "|")
        assert shown[k].replace(" ", "") == marked.replace("|", "").replace(" ", "")
        assert "#fde2e0" in panel.texts[k].toHtml()
    assert (f"The texts part at generated token {result.diverges_at + 1}"
            in panel.summary.text())
    assert all("tokens/s" in t.text() for t in panel.timings)
    assert not window.try_it_dock.isHidden()


def test_try_it_without_a_tokenizer_says_how_to_name_one(qtbot, decoder_window):
    window, path = decoder_window
    (path.parent / "tokenizer.json").rename(path.parent / "tok.json")
    worker = window.run_generate()
    qtbot.waitUntil(lambda: worker.is_done() and window.progress.isHidden(), timeout=30000)
    assert window.banner.isVisible() and "--tokenizer" in window.banner_text.text()
    window.try_it.tokenizer.setText(str(path.parent / "tok.json"))
    window.try_it.max_tokens.setValue(2)
    wait_run(qtbot, window, window.run_generate())
    assert window.try_it.result.tokenizer == path.parent / "tok.json"


def test_save_optimized_writes_a_genai_folder_and_asks_before_replacing(
        qtbot, decoder_window, tmp_path, monkeypatch):
    window, _ = decoder_window
    window.plan.replace(Recipe.from_json(INT4).steps, "int4")
    wait_run(qtbot, window, window.run_compare(), timeout=120000)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(out))
    window.exports.save_optimized_dialog()
    assert sorted(p.name for p in out.iterdir()) == [
        "genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"][
        "filename"] == "model.onnx"
    # not empty now: asked, and "No" writes nothing
    asked = []
    monkeypatch.setattr(QMessageBox, "question",
                        lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.No)
    before = (out / "model.onnx").stat().st_mtime_ns
    window.exports.save_optimized_dialog()
    assert asked and "is not empty" in asked[0]
    assert (out / "model.onnx").stat().st_mtime_ns == before


def test_export_plan_as_olive_workflow_from_the_menu(qtbot, decoder_window, tmp_path,
                                                     monkeypatch):
    window, path = decoder_window
    action = window.window_actions.export_olive
    assert not action.isEnabled()  # no plan yet
    window.plan.replace(Recipe.from_json(INT4).steps, "int4")
    assert action.isEnabled()
    target = tmp_path / "workflow.json"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    action.trigger()
    workflow = json.loads(target.read_text())
    assert workflow["input_model"]["onnx_file_name"] == path.name
    (olive_pass,) = workflow["passes"].values()
    assert olive_pass["type"] == "OnnxBlockWiseRtnQuantization"
    assert "/model/layers.0/attn/q_proj/MatMul" in olive_pass["nodes_to_include"]
    assert window.statusBar().currentMessage() == f"Wrote {target}"
