"""A decoder with a KV cache in the app, as a newcomer meets it: the first Optimize & compare
shows time to first token and tokens/s before → after, says which step the totals are, and
judges next-token agreement on the built-in text when the tokenizer is beside the model (and
says "synthetic tokens" when it is not)."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import shown_window

from llm_builders import kv_decoder, word_tokenizer
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.model.model_io import save_model
from opstudio.core.plan.recipe import Step
from opstudio.qt.run_settings import RunSettingsDialog, app_defaults, settings_from_json

KV_DIMS = ["batch_size", "sequence_length", "total_sequence_length", "past_sequence_length"]


@pytest.fixture
def first_window(app, qtbot, settings):
    """A window of a first session: nothing saved, the app's own defaults."""
    yield from shown_window(qtbot, settings)


def _decoder(tmp_path, style: str, tokenizer: bool):
    folder = tmp_path / style
    folder.mkdir()
    path = folder / "model.onnx"
    save_model(kv_decoder(style), path)
    if tokenizer:
        word_tokenizer(folder / "tokenizer.json", vocab=64)
    return path


def _compare(window, qtbot, path):
    assert window.open_model(path)
    # only smaller and faster than the defaults: the request stays as a first session has it
    window.set_run_settings(dataclasses.replace(window.run_settings, runs=3, warmup=1,
                                                threads=1, request_prompt=16,
                                                request_generate=4))
    window.plan.add(Step("fp16", {}, nodes=["/lm_head/MatMul"]))
    worker = window.run_compare()
    assert worker is not None
    qtbot.waitUntil(lambda: worker.is_done() and window.progress.isHidden(), timeout=120_000)
    assert not window.banner.isVisible(), window.banner_text.text()
    return window.comparison


def test_the_app_compares_a_decoder_per_request_by_default():
    assert app_defaults().request is True
    assert settings_from_json({}).request is True
    assert settings_from_json({"request": False, "runs": 5}).request is False  # a choice stays
    assert ProfileSettings().request is False  # the command line's default stays


@pytest.mark.parametrize("style", ["gqa", "hf"])
def test_first_compare_shows_the_request_and_judges_on_the_text(first_window, qtbot, tmp_path,
                                                                style):
    window = first_window
    assert window.run_settings.request is True
    c = _compare(window, qtbot, _decoder(tmp_path, style, tokenizer=True))
    assert c.request is not None
    request = window.plots.request
    assert request.isVisible()
    assert "first token" in request.text() and "tokens/s" in request.text()
    assert "16 + 4 tokens" in request.text()
    assert window.plots.summary.text().startswith("Prefill of 128 tokens: ")
    # what each model needs of memory, for the people who ask how much RAM it takes
    summary = window.plots.summary.text()
    assert "before memory: weights " in summary and "after memory: weights " in summary
    assert f"KV cache {'1.0 KiB' if style == 'hf' else '512 B'}/token" in summary
    tokens = window.plots.tokens
    assert tokens.isVisible()
    assert "judged on the built-in text (" in tokens.text() and "synthetic" not in tokens.text()
    assert not window.plots.total.isVisible()  # the request stands for the step's total plot
    status = window.statusBar().currentMessage()
    assert status.startswith("Optimized: per request of 16+4 tokens, first token ")
    assert ", tokens/s " in status and "; prefill of 128 tokens: " in status
    # the request reads first, above the totals of one step
    layout = request.parentWidget().layout()
    assert layout.indexOf(request) < layout.indexOf(window.plots.summary)


def test_a_profile_says_which_step_it_timed(first_window, qtbot, tmp_path):
    window = first_window
    assert window.open_model(_decoder(tmp_path, "hf", tokenizer=False))
    window.set_run_settings(dataclasses.replace(window.run_settings, runs=2, warmup=0,
                                                threads=1))
    worker = window.run_profile()
    assert worker is not None
    qtbot.waitUntil(lambda: worker.is_done() and window.progress.isHidden(), timeout=120_000)
    assert window.plots.summary.text().startswith("Prefill of 128 tokens: ")
    assert "<br>memory: weights " in window.plots.summary.text()
    assert "anonymous, KV cache 1.0 KiB/token" in window.plots.summary.text()
    assert window.statusBar().currentMessage().startswith("Profiled (prefill of 128 tokens): ")


def test_without_a_tokenizer_the_accuracy_says_synthetic_tokens(first_window, qtbot, tmp_path):
    c = _compare(first_window, qtbot, _decoder(tmp_path, "gqa", tokenizer=False))
    assert c.accuracy.synthetic
    assert "on synthetic tokens: not a measure of quality — give a prompt in Run settings" \
        in first_window.plots.tokens.text()


def test_run_settings_offer_the_text_and_the_tokenizer(app, tmp_path):
    path = _decoder(tmp_path, "hf", tokenizer=True)
    dlg = RunSettingsDialog(app_defaults(), KV_DIMS, model_path=path, reads_tokens=True)
    assert dlg.prompt_text.isVisibleTo(dlg) and dlg.tokenizer.isVisibleTo(dlg)
    assert dlg.request.isChecked()
    assert dlg.prompt_text.placeholderText() == "the built-in English passage"
    assert dlg.tokenizer.placeholderText() == "tokenizer.json beside the model"
    dlg.prompt_text.setText(str(tmp_path / "mine.txt"))
    dlg.tokenizer.setText(str(tmp_path / "tok.json"))
    s = dlg.settings()
    assert (s.prompt_text, s.tokenizer) == (str(tmp_path / "mine.txt"), str(tmp_path / "tok.json"))
    lonely = RunSettingsDialog(app_defaults(), KV_DIMS, model_path=tmp_path / "x.onnx",
                               reads_tokens=True)
    assert "synthetic tokens" in lonely.tokenizer.placeholderText()
    assert lonely.settings().tokenizer is None
    plain = RunSettingsDialog(ProfileSettings(), ["batch"])
    assert not plain.prompt_text.isVisibleTo(plain)
