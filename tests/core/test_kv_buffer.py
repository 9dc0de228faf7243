"""A GroupQueryAttention decoder's past and present in one buffer, as onnxruntime-genai runs it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from llm_builders import kv_decoder, runtime_folder
from opstudio.core.errors import OpstudioError
from opstudio.core.measure import kv_buffer
from opstudio.core.measure.profiler import ProfileSettings, profile_model
from opstudio.core.measure.rounds import run_failed
from opstudio.core.measure.settings import FeedSpec, RunSettings
from opstudio.core.measure.workload import Workload


def _decode_feeds(path, past: int = 6) -> dict[str, np.ndarray]:
    return Workload.of(str(path), FeedSpec(phase="decode", past=past)).main()


def test_every_present_of_a_gqa_export_pairs_with_its_past_and_an_hf_export_has_none():
    pairs = kv_buffer.shared_pairs(kv_decoder("gqa", layers=2))
    assert pairs == {f"present.{i}.{kind}": f"past_key_values.{i}.{kind}"
                     for i in range(2) for kind in ("key", "value")}
    assert kv_buffer.shared_pairs(kv_decoder("hf", layers=2)) == {}


def test_the_shared_buffer_gives_the_logits_and_present_of_separate_arrays(tmp_path):
    path = runtime_folder(tmp_path / "gqa", "gqa")
    feeds = _decode_feeds(path, past=6)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    separate = dict(zip(names, sess.run(None, feeds), strict=True))
    pairs = kv_buffer.shared_pairs(onnx.load(str(path)))
    shared = kv_buffer.SharedFed(sess, feeds, pairs, run_failed)
    for _ in range(3):  # every run writes the same token at the same place
        shared.run(None, None)
    out = dict(zip(shared.output_names, shared.binding.copy_outputs_to_cpu(), strict=True))
    np.testing.assert_allclose(out["logits"], separate["logits"], rtol=1e-5, atol=1e-5)
    # the buffer holds the past, then the step's token: the separate present exactly
    np.testing.assert_allclose(out["present.1.key"], separate["present.1.key"], atol=1e-6)
    assert feeds["past_key_values.0.key"].shape[2] == 6  # the caller's arrays are untouched


def test_auto_follows_the_genai_config_and_copy_never_shares(tmp_path):
    path = runtime_folder(tmp_path / "gqa", "gqa")
    model = onnx.load(str(path))
    assert kv_buffer.resolve("auto", model, path) == {}  # the test config says false
    config = path.parent / "genai_config.json"
    data = json.loads(config.read_text())
    data["search"]["past_present_share_buffer"] = True
    config.write_text(json.dumps(data))
    assert len(kv_buffer.resolve("auto", model, path)) == 4
    assert kv_buffer.resolve("copy", model, path) == {}
    assert len(kv_buffer.resolve("shared", model, None)) == 4


def test_a_profile_says_how_the_cache_was_fed(tmp_path):
    gqa = runtime_folder(tmp_path / "gqa", "gqa")
    hf = runtime_folder(tmp_path / "hf", "hf")
    settings = ProfileSettings(runs=3, warmup=1, phase="decode", past=8, kv_buffer="shared")
    shared = profile_model(gqa, settings)
    assert any(n.startswith("KV cache: past and present share one buffer (4 bound)")
               for n in shared.notes)
    assert shared.plain_ms is not None and shared.plain_ms["p50"] > 0
    separate = profile_model(hf, settings)
    assert any("fed as separate arrays although --kv-buffer shared" in n for n in separate.notes)
    plain = profile_model(gqa, ProfileSettings(runs=3, warmup=1, phase="decode", past=8))
    assert not any(n.startswith("KV cache:") for n in plain.notes)


def test_an_unknown_mode_is_refused_in_words():
    with pytest.raises(OpstudioError, match="--kv-buffer takes one of auto, copy, shared"):
        RunSettings(kv_buffer="inplace").validate(check_provider=False)
