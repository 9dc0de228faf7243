"""Input resolution and synthetic inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.errors import OpstudioError
from opstudio.core.measure.inputs import index_bounds, make_inputs, resolve_input_specs


def _model(inputs, nodes=(), outputs=None, inits=()):
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(list(nodes), "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_named_dims_defaults_and_flags():
    m = _model([_vi("ids", TensorProto.INT64, ["batch", "seq"]),
                _vi("img", TensorProto.FLOAT, [None, 3, "height", "width"])])
    specs = resolve_input_specs(m, dims={"height": 32, "width": 48})
    assert specs[0].shape == (1, 128)  # batch=1, seq=128 by default
    assert specs[1].shape == (1, 3, 32, 48)  # leading unnamed dim = 1
    assert specs[0].dtype == np.int64
    specs = resolve_input_specs(m, dims={"seq": 7, "height": 2, "width": 2},
                                shapes={"img": [2, 3, 5, 6]})
    assert specs[0].shape == (1, 7)
    assert specs[1].shape == (2, 3, 5, 6)


def test_unresolved_dims_name_the_input_dim_and_flag():
    m = _model([_vi("x", TensorProto.FLOAT, [1, 3, "height", "width"])])
    with pytest.raises(OpstudioError, match=r"input 'x' dim 2 \('height'\) is unknown: "
                                            r"pass --dim height=N or --shape x=1,3,N,N"):
        resolve_input_specs(m)
    m = _model([_vi("x", TensorProto.FLOAT, [None, 3, None, 5])])
    with pytest.raises(OpstudioError, match=r"input 'x' dim 2 \(unnamed\).*--shape x=1,3,N,5"):
        make_inputs(m)


def test_shape_flag_is_checked_against_the_model():
    m = _model([_vi("x", TensorProto.FLOAT, [1, 3, "h", "w"])])
    with pytest.raises(OpstudioError, match="gives 3 dims, the model declares 4"):
        resolve_input_specs(m, shapes={"x": [1, 3, 4]})
    with pytest.raises(OpstudioError, match="dim 1 is fixed at 3"):
        resolve_input_specs(m, shapes={"x": [1, 4, 8, 8]})
    with pytest.raises(OpstudioError, match="no input of that name"):
        resolve_input_specs(m, shapes={"nope": [1]})


def test_scalars_get_sensible_values():
    m = _model([_vi("sr", TensorProto.INT64, []), _vi("gain", TensorProto.FLOAT, []),
                _vi("flag", TensorProto.BOOL, [])])
    feeds = make_inputs(m)
    assert feeds["sr"].shape == () and int(feeds["sr"]) == 16000
    assert feeds["gain"].dtype == np.float32 and float(feeds["gain"]) == 1.0
    assert feeds["flag"].dtype == np.bool_ and not bool(feeds["flag"])


def test_ids_feeding_a_gather_stay_inside_the_table():
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((37, 8))
                                    .astype(np.float32), "emb")
    nodes = [helper.make_node("Cast", ["tok"], ["tok64"], to=TensorProto.INT64),
             helper.make_node("Unsqueeze", ["tok64", "ax"], ["tok3"]),
             helper.make_node("Gather", ["emb", "tok3"], ["y"])]
    ax = numpy_helper.from_array(np.array([0], np.int64), "ax")
    m = _model([_vi("tok", TensorProto.INT32, ["batch", "seq"])], nodes,
               [_vi("y", TensorProto.FLOAT, None)], [table, ax])
    assert index_bounds(m) == {"tok": 37}
    feeds = make_inputs(m, dims={"seq": 4000})
    tok = feeds["tok"]
    assert tok.dtype == np.int32 and tok.shape == (1, 4000)
    assert tok.min() >= 0 and tok.max() < 37 and tok.max() > 30  # spread over the table
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, feeds)[0].shape == (1, 1, 4000, 8)


def test_transformer_inputs():
    m = _model([_vi("input_ids", TensorProto.INT64, ["batch", "sequence_length"]),
                _vi("attention_mask", TensorProto.INT64, ["batch", "total_sequence_length"]),
                _vi("position_ids", TensorProto.INT64, ["batch", "sequence_length"]),
                _vi("token_type_ids", TensorProto.INT64, ["batch", "sequence_length"]),
                _vi("past_key_values.0.key", TensorProto.FLOAT,
                    ["batch", 4, "past_sequence_length", 16])])
    feeds = make_inputs(m, dims={"sequence_length": 10})
    assert feeds["input_ids"].shape == (1, 10)
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < 100
    assert feeds["attention_mask"].shape == (1, 10) and (feeds["attention_mask"] == 1).all()
    assert feeds["position_ids"].tolist() == [list(range(10))]
    assert not feeds["token_type_ids"].any()
    past = feeds["past_key_values.0.key"]
    assert past.shape == (1, 4, 0, 16) and past.dtype == np.float32


def test_float_precision_and_determinism():
    m = _model([_vi("a", TensorProto.FLOAT16, [2, 3]), _vi("b", TensorProto.DOUBLE, [4])])
    one, two, other = make_inputs(m, seed=1), make_inputs(m, seed=1), make_inputs(m, seed=2)
    assert one["a"].dtype == np.float16 and one["b"].dtype == np.float64
    np.testing.assert_array_equal(one["a"], two["a"])
    assert not np.array_equal(one["b"], other["b"])
    # Inputs are independent: a model with only "b" gets the same values for it.
    only_b = make_inputs(_model([_vi("b", TensorProto.DOUBLE, [4])]), seed=1)
    np.testing.assert_array_equal(only_b["b"], one["b"])


def test_oversize_inputs_are_refused_before_allocating():
    m = _model([_vi("x", TensorProto.FLOAT, ["batch", "n_points"])])
    with pytest.raises(OpstudioError, match=r"input 'x' would take 3\.7 GiB .*over the 2\.0 GiB"):
        make_inputs(m, dims={"n_points": 10**9})
    with pytest.raises(OpstudioError, match=r"over the 1\.0 MiB limit"):
        make_inputs(m, dims={"n_points": 10**6}, max_bytes=2**20)


def test_npz_inputs_are_validated(tmp_path):
    m = _model([_vi("ids", TensorProto.INT64, ["batch", "seq"]),
                _vi("mask", TensorProto.INT64, ["batch", "seq"]),
                _vi("img", TensorProto.FLOAT, [1, 3, 4, 4])])
    good = tmp_path / "good.npz"
    np.savez(good, ids=np.arange(6, dtype=np.int64).reshape(2, 3))
    feeds = make_inputs(m, npz_path=good)
    np.testing.assert_array_equal(feeds["ids"], np.arange(6).reshape(2, 3))
    assert feeds["mask"].shape == (2, 3)  # named dims follow the real tensors
    assert list(feeds) == ["ids", "mask", "img"]

    bad_name = tmp_path / "n.npz"
    np.savez(bad_name, idz=np.zeros((1, 2), np.int64))
    with pytest.raises(OpstudioError, match="array 'idz' is not an input"):
        make_inputs(m, npz_path=bad_name)
    bad_type = tmp_path / "t.npz"
    np.savez(bad_type, ids=np.zeros((1, 2), np.int32))
    with pytest.raises(OpstudioError, match="input 'ids' is int32, the model expects int64"):
        make_inputs(m, npz_path=bad_type)
    bad_rank = tmp_path / "r.npz"
    np.savez(bad_rank, img=np.zeros((3, 4, 4), np.float32))
    with pytest.raises(OpstudioError, match="input 'img' has 3 dims, the model expects 4"):
        make_inputs(m, npz_path=bad_rank)
    bad_dim = tmp_path / "d.npz"
    np.savez(bad_dim, img=np.zeros((1, 3, 5, 4), np.float32))
    with pytest.raises(OpstudioError, match="dim 2 is 5, the model fixes it at 4"):
        make_inputs(m, npz_path=bad_dim)
    pickled = tmp_path / "p.npz"
    np.savez(pickled, ids=np.array([{"a": 1}], dtype=object))
    with pytest.raises(OpstudioError, match=r"cannot read as \.npz"):
        make_inputs(m, npz_path=pickled)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(OpstudioError, match=r"junk\.npz"):
        make_inputs(m, npz_path=junk)


def test_generated_inputs_run_in_onnxruntime():
    x = _vi("x", TensorProto.FLOAT, ["batch", "seq", 8])
    m = _model([x], [helper.make_node("Relu", ["x"], ["y"])],
               [_vi("y", TensorProto.FLOAT, ["batch", "seq", 8])])
    onnx.checker.check_model(m)
    feeds = make_inputs(m, dims={"seq": 5})
    out = ort.InferenceSession(m.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(out, np.maximum(feeds["x"], 0))


def test_exporter_made_up_dim_names_count_as_unnamed():
    m = _model([_vi("x", TensorProto.FLOAT,
                    ["p2o.DynamicDimension.0", 3, "p2o.DynamicDimension.1", 320]),
                _vi("src", TensorProto.INT64, ["unk__214", "src_len"])])
    with pytest.raises(OpstudioError, match=r"input 'x' dim 2 \(unnamed, 'p2o\.DynamicDimension"
                                            r"\.1'\) is unknown: pass --shape x=1,3,N,320"):
        resolve_input_specs(m)
    specs = resolve_input_specs(m, dims={"p2o.DynamicDimension.1": 48})
    assert specs[0].shape == (1, 3, 48, 320)
    assert specs[1].shape == (1, 128)  # leading made-up name = batch; src_len is a sequence


def test_decode_step_dims_are_those_a_decode_run_feeds():
    from llm_builders import kv_decoder, tiny_decoder
    from opstudio.core.measure.inputs import decode_step_dims
    from opstudio.core.measure.roofline import dims_from_inputs

    for model in (kv_decoder("gqa", layers=2), kv_decoder("hf", layers=2), tiny_decoder()):
        dims = decode_step_dims(model)
        assert dims == dims_from_inputs(model, make_inputs(model, phase="decode"))
        assert 512 in dims.values() and 1 in dims.values()
    assert decode_step_dims(kv_decoder("gqa", layers=2))["total_sequence_length"] == 513
    # no KV cache, or a head size nothing says: no decode step to show
    plain = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])]))
    assert decode_step_dims(plain) is None
    assert decode_step_dims(kv_decoder("hf", layers=2, head_dim_name="head_dim")) is None


def test_messages_listing_the_inputs_fold_the_kv_cache(tmp_path):
    from llm_builders import kv_decoder

    model = kv_decoder("gqa", layers=30)
    folded = "(inputs: input_ids, attention_mask, past_key_values.{0..29}.{key,value})"
    with pytest.raises(OpstudioError) as info:
        resolve_input_specs(model, shapes={"input_idz": [1, 4]})
    assert str(info.value).endswith(folded)
    with pytest.raises(OpstudioError) as info:
        make_inputs(model, shapes={"input_idz": [1, 4]}, phase="decode")
    assert str(info.value).endswith(folded)
    npz = tmp_path / "p.npz"
    np.savez(npz, idz=np.zeros((1, 4), np.int64))
    with pytest.raises(OpstudioError) as info:
        make_inputs(model, npz_path=npz)
    assert str(info.value).endswith(folded)
