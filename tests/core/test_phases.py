"""Prefill and decode phases of KV-cache decoders: derived dims, past 0, decode after a prompt."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from llm_builders import kv_decoder, prompt_inputs
from opstudio.cli import main
from opstudio.cli.common import parse_dims
from opstudio.core.errors import OpstudioError
from opstudio.core.measure.accuracy import run_outputs
from opstudio.core.measure.inputs import make_inputs
from opstudio.core.model.phases import derive_dims


def _shapes(feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in feeds.items()}


def test_decode_derives_total_and_head_size_from_the_attention_node():
    model = kv_decoder("gqa", head_dim_name="kv_cache_dim")
    feeds = make_inputs(model, phase="decode", past=37)
    shapes = _shapes(feeds)
    assert shapes["input_ids"] == (1, 1)
    assert shapes["attention_mask"] == (1, 38)  # total = past + 1
    # 4 query heads over a 64-wide projection; 2 KV heads fixed in the model
    assert shapes["past_key_values.0.key"] == (1, 2, 37, 16)
    assert (feeds["attention_mask"] == 1).all()
    outputs = run_outputs(model, feeds)
    assert outputs["present.1.value"].shape == (1, 2, 38, 16)
    assert outputs["logits"].shape == (1, 1, 64)


def test_decode_defaults_to_a_past_of_512_and_positions_count_on_from_it():
    model = kv_decoder("hf")
    feeds = make_inputs(model, phase="decode")
    assert feeds["past_key_values.0.key"].shape == (1, 4, 512, 16)
    assert feeds["attention_mask"].shape == (1, 513)
    assert feeds["position_ids"].tolist() == [[512]]
    assert run_outputs(model, feeds)["logits"].shape == (1, 1, 64)


def test_prefill_is_an_empty_past_and_the_prompt_length():
    model = kv_decoder("gqa", head_dim_name="kv_cache_dim")
    feeds = make_inputs(model, phase="prefill")
    assert feeds["input_ids"].shape == (1, 128)
    assert feeds["attention_mask"].shape == (1, 128)
    assert feeds["past_key_values.0.value"].shape == (1, 2, 0, 16)
    assert run_outputs(model, feeds)["present.0.key"].shape == (1, 2, 128, 16)
    hf = kv_decoder("hf")
    feeds = make_inputs(hf, phase="prefill", dims={"sequence_length": 9})
    assert feeds["position_ids"].tolist() == [list(range(9))]
    assert run_outputs(hf, feeds)["logits"].shape == (1, 9, 64)


def test_without_a_phase_the_head_size_is_derived_not_zero():
    # issue 12 A.3: kv_cache_dim used to be taken for a cache length and set to 0
    model = kv_decoder("gqa", head_dim_name="kv_cache_dim")
    feeds = make_inputs(model)
    assert feeds["past_key_values.0.key"].shape == (1, 2, 0, 16)
    assert feeds["input_ids"].shape == (1, 128)
    run_outputs(model, feeds)


def test_past_zero_is_accepted_where_the_dim_is_a_past_length():
    assert parse_dims(["past_sequence_length=0"]) == {"past_sequence_length": 0}
    with pytest.raises(OpstudioError, match="at least 1"):
        parse_dims(["sequence_length=0"])
    with pytest.raises(OpstudioError, match="at least 1"):
        parse_dims(["kv_cache_dim=0"])
    model = kv_decoder("gqa", head_dim_name="kv_cache_dim")
    feeds = make_inputs(model, dims={"past_sequence_length": 0, "sequence_length": 4})
    assert feeds["attention_mask"].shape == (1, 4)
    assert run_outputs(model, feeds)["logits"].shape == (1, 4, 64)
    feeds = make_inputs(model, phase="decode", past=0)
    assert feeds["attention_mask"].shape == (1, 1)
    run_outputs(model, feeds)


def test_head_size_from_genai_config_beside_the_model(tmp_path):
    # plain MatMul attention: no node says how wide a head is
    model = kv_decoder("hf", head_dim_name="kv_cache_dim")
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    with pytest.raises(OpstudioError) as err:
        make_inputs(model, phase="decode", past=8, model_path=path)
    message = str(err.value)
    assert "past_key_values.0.key" in message and "kv_cache_dim" in message
    assert "--dim kv_cache_dim=N" in message and "genai_config.json" in message
    (tmp_path / "genai_config.json").write_text(json.dumps(
        {"model": {"decoder": {"head_size": 16, "num_key_value_heads": 4}}}))
    feeds = make_inputs(model, phase="decode", past=8, model_path=path)
    assert feeds["past_key_values.1.key"].shape == (1, 4, 8, 16)
    assert run_outputs(model, feeds)["present.1.key"].shape == (1, 4, 9, 16)
    # an explicit --dim wins over every source
    feeds = make_inputs(model, phase="decode", past=8, model_path=path,
                        dims={"kv_cache_dim": 32})
    assert feeds["past_key_values.1.key"].shape == (1, 4, 8, 32)


def test_head_size_from_the_kv_outputs_fixed_dims():
    model = kv_decoder("hf", head_dim_name="kv_cache_dim")
    for out in model.graph.output:
        if out.name.startswith("present."):
            out.type.tensor_type.shape.dim[3].dim_value = 16
    dims, notes = derive_dims(model, {}, phase="decode", past=3)
    assert dims["kv_cache_dim"] == 16 and dims["total_sequence_length"] == 4
    assert any("fixed on the KV tensors" in n for n in notes)


def test_head_size_of_a_packed_qkv_projection_and_int4_weights():
    model = kv_decoder("gqa", head_dim_name="kv_cache_dim")
    # as onnxruntime-genai's builder packs them: one MatMulNBits, N = (4 + 2·2) heads × 16
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    for i, node in enumerate(gqa):
        packed = onnx.helper.make_node("MatMulNBits", ["x", "w", "s"], [f"qkv{i}"],
                                       domain="com.microsoft", K=64, N=128, bits=4,
                                       block_size=32, name=f"qkv{i}")
        model.graph.node.append(packed)
        node.input[0], node.input[1], node.input[2] = f"qkv{i}", "", ""
    dims, _ = derive_dims(model, {}, phase="decode")
    assert dims["kv_cache_dim"] == 16


def test_a_dim_that_cannot_be_decided_is_a_named_error():
    model = kv_decoder("hf", head_dim_name="kv_cache_dim")
    with pytest.raises(OpstudioError, match=r"'past_key_values\.0\.key' dim 3 \('kv_cache_dim'\)"):
        make_inputs(model)


def test_phase_errors_are_named():
    plain = kv_decoder("gqa")
    with pytest.raises(OpstudioError, match="a prefill starts from an empty past"):
        make_inputs(plain, phase="prefill", past=5)
    with pytest.raises(OpstudioError, match="disagrees"):
        make_inputs(plain, phase="decode", past=5, dims={"past_sequence_length": 6})
    with pytest.raises(OpstudioError, match="not one of"):
        make_inputs(plain, phase="generate")
    from model_builders import small_mlp  # any model without a KV cache

    with pytest.raises(OpstudioError, match="no past key/value"):
        make_inputs(small_mlp(), phase="decode")


@pytest.mark.parametrize("style", ["gqa", "hf"])
def test_decode_after_a_prompt_uses_its_real_kv_cache(tmp_path, style):
    model = kv_decoder(style, head_dim_name="kv_cache_dim" if style == "gqa" else None)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    prompt = prompt_inputs(7, position_ids=style == "hf")
    npz = tmp_path / "prompt.npz"
    np.savez(npz, **prompt)

    feeds = make_inputs(model, npz_path=npz, phase="decode", model_path=path)
    assert feeds["past_key_values.0.key"].shape[2] == 7
    assert feeds["attention_mask"].shape == (1, 8)
    if style == "hf":
        assert feeds["position_ids"].tolist() == [[7]]
    # the new token is the prefill's own choice
    prefill = make_inputs(model, npz_path=npz, phase="prefill", model_path=path)
    first = run_outputs(model, prefill)
    token = int(first["logits"][0, -1].argmax())
    assert feeds["input_ids"].tolist() == [[token]]
    np.testing.assert_array_equal(feeds["past_key_values.1.value"], first["present.1.value"])

    # decode after the prompt = a prefill of prompt + token, at the last position
    step = run_outputs(model, feeds)["logits"][0, -1]
    longer = {"input_ids": np.concatenate([prompt["input_ids"], [[token]]], axis=1),
              "attention_mask": np.ones((1, 8), np.int64)}
    if style == "hf":
        longer["position_ids"] = np.arange(8, dtype=np.int64).reshape(1, -1)
    np.savez(tmp_path / "longer.npz", **longer)
    whole = run_outputs(model, make_inputs(model, npz_path=tmp_path / "longer.npz",
                                           phase="prefill"))["logits"][0, -1]
    scale = float(np.abs(whole).max())
    np.testing.assert_allclose(step, whole, rtol=1e-4, atol=1e-5 * scale)
    # and it is not what a decode on a synthetic (zero) past gives
    synthetic = run_outputs(model, make_inputs(model, phase="decode", past=7))["logits"][0, -1]
    assert not np.allclose(synthetic, whole, rtol=1e-3)


def test_a_past_that_is_not_the_prompt_is_refused(tmp_path):
    model = kv_decoder("gqa")
    npz = tmp_path / "prompt.npz"
    np.savez(npz, **prompt_inputs(4))
    with pytest.raises(OpstudioError, match="the past is the prompt"):
        make_inputs(model, npz_path=npz, phase="decode", past=9)


def test_cli_profile_decode_on_the_tiny_decoder(tmp_path, capsys):
    path = tmp_path / "decoder.onnx"
    onnx.save(kv_decoder("gqa", head_dim_name="kv_cache_dim"), path)
    out = tmp_path / "p.json"
    assert main(["profile", str(path), "--phase", "decode", "--past", "64", "--runs", "2",
                 "--warmup", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["phase"] == "decode" and data["settings"]["past"] == 64
    names = {n["name"] for n in data["nodes"]}
    assert "/model/layers.0/attn/GroupQueryAttention" in names
    assert main(["profile", str(path), "--dim", "past_sequence_length=0", "--runs", "1",
                 "--warmup", "0"]) == 0
    assert main(["profile", str(path), "--phase", "prefill", "--past", "3"]) == 1
    assert "a prefill starts from an empty past" in capsys.readouterr().err
