"""Opening a model for display: load, analyse with the run's dims, lay out; cancellable."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from opstudio.core.errors import Cancelled, ModelLoadError
from opstudio.core.session.opening import display_dims, open_for_display


def dynamic_relu(path):
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_opened_model_has_concrete_shapes_from_the_chosen_or_default_dims(tmp_path):
    path = dynamic_relu(tmp_path / "m.onnx")
    steps = []
    opened = open_for_display(path, {"seq": 16}, progress=lambda f, m: steps.append(f))
    assert opened.path == path.resolve()
    assert [n.name for n in opened.graph.nodes] == ["r"]
    assert opened.graph.node("r").output_shapes == [[1, 16, 8]]  # batch defaults to 1
    assert len(opened.layout.x) == 1
    assert steps[0] == 0.0 and steps[-1] == 1.0
    assert display_dims(opened.model, {}) == {"batch": 1, "seq": 128}


def test_cancel_and_bad_files(tmp_path):
    path = dynamic_relu(tmp_path / "m.onnx")
    with pytest.raises(Cancelled):
        open_for_display(path, cancelled=lambda: True)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match=r"bad\.onnx"):
        open_for_display(bad)


def test_a_kv_decoder_opens_with_the_dims_its_run_will_use(tmp_path):
    from llm_builders import kv_decoder
    from opstudio.core.model.model_io import save_model

    path = tmp_path / "decoder.onnx"
    save_model(kv_decoder("hf", layers=3), path)
    # default settings: a past of 0 is bound like any length, the total follows
    opened = open_for_display(path)
    assert display_dims(opened.model, {}) == {
        "batch_size": 1, "sequence_length": 128, "total_sequence_length": 128,
        "past_sequence_length": 0}
    assert opened.graph.flops_unknown() == 0 and not opened.graph.sums_need_every_node()
    # the run settings' phase: one token after a past of 64
    opened = open_for_display(path, phase="decode", past=64)
    assert opened.graph.node("/model/layers.2/attn/k/Concat").output_shapes == [[1, 4, 65, 16]]
    assert opened.graph.flops_unknown() == 0
    # a head size nothing tells: what can be shown is, the rest stays named
    opaque = tmp_path / "opaque.onnx"
    save_model(kv_decoder("hf", layers=1, head_dim_name="head_dim"), opaque)
    assert display_dims(open_for_display(opaque).model, {}) == {
        "batch_size": 1, "sequence_length": 128, "total_sequence_length": 128,
        "past_sequence_length": 0}
