"""A request (prompt P, generate G) in the app: the Run settings option for a decoder with a KV
cache, and time to first token and tokens/s before → after once Optimize & compare ran."""

from __future__ import annotations

import dataclasses

import pytest

from llm_builders import kv_decoder
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.model.model_io import save_model
from opstudio.core.plan.recipe import Step
from opstudio.qt.run_settings import RunSettingsDialog, settings_from_json, settings_to_json

KV_DIMS = ["batch_size", "sequence_length", "total_sequence_length", "past_sequence_length"]


def test_request_option_only_for_a_model_with_a_kv_cache(app):
    plain = RunSettingsDialog(ProfileSettings(), ["batch", "seq"])
    assert not plain.request.isVisibleTo(plain)
    assert plain.settings().request is False
    kv = RunSettingsDialog(ProfileSettings(), KV_DIMS)
    assert kv.request.isVisibleTo(kv) and not kv.request.isChecked()
    assert not kv.request_prompt.isEnabled()
    kv.request.setChecked(True)
    assert kv.request_prompt.isEnabled() and kv.request_generate.isEnabled()
    kv.request_prompt.setValue(32)
    kv.request_generate.setValue(16)
    s = kv.settings()
    assert (s.request, s.request_prompt, s.request_generate) == (True, 32, 16)
    s.validate(check_provider=False)
    # kept across sessions, and by a model without a cache opened in between
    again = settings_from_json(settings_to_json(s))
    assert (again.request, again.request_prompt, again.request_generate) == (True, 32, 16)
    assert RunSettingsDialog(again, ["batch"]).settings().request is True


def test_window_shows_the_request_before_and_after(window, qtbot, tmp_path):
    path = tmp_path / "kv.onnx"
    save_model(kv_decoder("gqa"), path)
    assert window.open_model(path)
    window.set_run_settings(dataclasses.replace(window.run_settings, dims={}, request=True,
                                                request_prompt=16, request_generate=4))
    window.plan.add(Step("fp16", {}, nodes=["/lm_head/MatMul"]))
    worker = window.run_compare()
    assert worker is not None
    qtbot.waitUntil(lambda: worker.is_done() and window.progress.isHidden(), timeout=120_000)
    assert not window.banner.isVisible(), window.banner_text.text()
    request = window.comparison.request
    assert request is not None
    data = window.plots.request_data
    assert (data["prompt"], data["generate"]) == (16, 4)
    assert data["ttft_ms"] == (request.before.ttft_ms, request.after.ttft_ms)
    assert data["tokens_per_s"] == pytest.approx((request.before.tokens_per_s,
                                                  request.after.tokens_per_s))
    assert set(data["labels"]) == {"ttft", "tokens_per_s", "total"}
    # 3 runs (the fixture's settings) cannot tell: said so, never "≈ 1×"
    assert set(data["labels"].values()) == {"too few runs"}
    assert window.plots.request.isVisible()
    text = window.plots.request.text()
    assert "16 + 4 tokens" in text and "first token" in text and "tokens/s" in text
    assert "→" in text and "time to first token" in window.plots.request.toolTip()
    # a plain profile afterwards has no request to show
    window.plots.show_profile(window.comparison.before)
    assert window.plots.request_data is None and not window.plots.request.isVisible()
