"""The Run settings dialog's phase and past length, for a decoder with a KV cache."""

from __future__ import annotations

from opstudio.core.measure.profiler import ProfileSettings
from opstudio.qt.run_settings import RunSettingsDialog

KV_DIMS = ["batch_size", "sequence_length", "total_sequence_length", "past_sequence_length",
           "kv_cache_dim"]


def test_phase_rows_only_for_a_model_with_a_past(app):
    plain = RunSettingsDialog(ProfileSettings(), ["batch", "seq"])
    assert not plain.phase.isVisibleTo(plain)
    s = plain.settings()
    assert s.phase is None and s.past is None
    assert s.dims == {}  # dims left at their defaults are not pinned
    kv = RunSettingsDialog(ProfileSettings(), KV_DIMS)
    assert kv.phase.isVisibleTo(kv) and kv.past.isVisibleTo(kv)


def test_decode_sets_phase_and_past_and_frees_the_derived_dims(app):
    dlg = RunSettingsDialog(ProfileSettings(dims={"past_sequence_length": 7}), KV_DIMS)
    assert dlg.dims["past_sequence_length"].value() == 7
    assert dlg.dims["kv_cache_dim"].text() == "auto"  # derived from the model, not 0
    assert not dlg.past.isEnabled()
    dlg.phase.setCurrentText("decode")
    assert dlg.past.isEnabled()
    assert not dlg.dims["past_sequence_length"].isEnabled()
    assert not dlg.dims["total_sequence_length"].isEnabled()
    dlg.past.setValue(64)
    s = dlg.settings()
    assert (s.phase, s.past) == ("decode", 64)
    assert "past_sequence_length" not in s.dims and "kv_cache_dim" not in s.dims
    s.validate(check_provider=False)


def test_the_kv_cache_buffer_is_offered_for_a_model_with_a_past(app):
    plain = RunSettingsDialog(ProfileSettings(), ["batch", "seq"])
    assert not plain.kv_buffer.isVisibleTo(plain)
    kv = RunSettingsDialog(ProfileSettings(kv_buffer="shared"), KV_DIMS)
    assert kv.kv_buffer.isVisibleTo(kv) and kv.kv_buffer.currentText() == "shared"
    kv.kv_buffer.setCurrentText("copy")
    assert kv.settings().kv_buffer == "copy"


def test_the_dims_show_what_the_phase_runs_without_pinning_them(app):
    dlg = RunSettingsDialog(ProfileSettings(phase="decode", past=512), KV_DIMS)
    dims = dlg.dims
    shown = {n: dims[n].value() for n in ("sequence_length", "past_sequence_length",
                                          "total_sequence_length")}
    assert shown == {"sequence_length": 1, "past_sequence_length": 512,
                     "total_sequence_length": 513}
    dlg.past.setValue(100)
    assert dims["total_sequence_length"].value() == 101
    assert dlg.settings().dims == {}  # shown, not pinned: the phase decides them
    dlg.phase.setCurrentText("prefill")
    assert (dims["sequence_length"].value(), dims["past_sequence_length"].value(),
            dims["total_sequence_length"].value()) == (128, 0, 128)
    dims["sequence_length"].setValue(16)
    assert dims["total_sequence_length"].value() == 16
    assert dlg.settings().dims == {"sequence_length": 16}


def test_past_zero_is_a_value_and_prefill_has_no_past(app):
    dlg = RunSettingsDialog(ProfileSettings(), KV_DIMS)
    dlg.dims["past_sequence_length"].setValue(3)
    dlg.dims["past_sequence_length"].setValue(0)
    dlg.dims["sequence_length"].setValue(16)
    s = dlg.settings()
    assert s.phase is None and s.dims == {"sequence_length": 16}
    dlg.phase.setCurrentText("prefill")
    s = dlg.settings()
    assert (s.phase, s.past) == ("prefill", None) and s.dims == {"sequence_length": 16}


def test_the_model_inputs_are_listed_with_the_kv_cache_folded(window, qtbot, tmp_path,
                                                              monkeypatch):
    from llm_builders import kv_decoder
    from opstudio.core.model.model_io import save_model

    path = tmp_path / "decoder30.onnx"
    save_model(kv_decoder("gqa", layers=30), path)
    assert window.open_model(path)
    shown = []

    def exec_(dialog):  # look at the dialog the window builds instead of waiting on a user
        shown.append(dialog)
        return 0

    monkeypatch.setattr(RunSettingsDialog, "exec", exec_)
    window.edit_run_settings()
    [dlg] = shown
    assert dlg.inputs_list.isVisibleTo(dlg)
    assert dlg.inputs_list.text().splitlines() == [
        "input_ids: int64 [batch_size,sequence_length]",
        "attention_mask: int64 [batch_size,total_sequence_length]",
        "past_key_values.{0..29}.{key,value}: float32 [batch_size,2,past_sequence_length,16]"]
    # a model's inputs are listed only when there is a model
    empty = RunSettingsDialog(ProfileSettings(), [])
    empty.show()
    assert not empty.inputs_list.isVisibleTo(empty)
    empty.close()
