"""fp16, int8-dynamic, lowrank and prune on a model whose weights stay in their files: one
weight at a time into a scratch file, with the bytes of the in-memory pass (onnxruntime's
converter and quantizer there)."""

from __future__ import annotations

import pytest

from lazy_models import streamed_and_reference
from opstudio.core.passes import _stream as stream


def test_fp16_casts_each_weight_as_onnxruntimes_converter_does(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "CHUNK_BYTES", 700)  # several bands per weight
    streamed = streamed_and_reference(tmp_path, "fp16", {}, ["mm_in", "mm", "mm_out"])
    assert streamed.applied == ["mm_in", "mm", "mm_out"]


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_dynamic_quantizes_each_weight_as_onnxruntimes_quantizer_does(
        tmp_path, monkeypatch, per_channel):
    monkeypatch.setattr(stream, "CHUNK_BYTES", 700)
    streamed = streamed_and_reference(tmp_path, "int8-dynamic", {"per_channel": per_channel},
                                      ["mm_in", "mm", "mm_out"])
    assert streamed.applied == ["mm_in", "mm", "mm_out"]
