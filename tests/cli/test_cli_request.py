"""``profile --request`` and ``compare --request`` on a tiny KV-cache decoder; a model without
a KV cache is refused before anything runs."""

from __future__ import annotations

import json

import pytest
from onnx import TensorProto, helper

from llm_builders import kv_decoder
from opstudio.cli import main
from opstudio.core.model.model_io import save_model

FAST = ["--runs", "4", "--warmup", "1", "--threads", "1", "--top", "3"]


@pytest.fixture
def decoder(tmp_path):
    path = tmp_path / "kv.onnx"
    save_model(kv_decoder("gqa"), path)
    return path


def test_profile_request_prints_and_writes_the_request(decoder, tmp_path, capsys):
    out = tmp_path / "p.json"
    code = main(["profile", str(decoder), *FAST, "--request", "--prompt", "16", "--generate",
                 "8", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "a prompt of 16 tokens, 8 generated" in text
    line = next(x for x in text.splitlines() if "time to first token" in x)
    assert "ms/token" in line and "tokens/s" in line and "a request of 16+8 tokens: " in line
    data = json.loads(out.read_text())
    assert "nodes" in data  # the profile is still there
    req = data["request"]
    assert (req["prompt"], req["generate"], req["rounds"]) == (16, 8, 4)
    assert req["ttft_ci"][0] <= req["ttft_ms"] <= req["ttft_ci"][1]
    assert req["tokens_per_s"] == pytest.approx(1000 / req["decode_ms_per_token"], rel=1e-3)
    assert set(req["decode_at_ms"]) == {"16", "24"}
    assert data["settings"]["request"] is True


def test_prompt_alone_implies_request_with_the_default_generate(decoder, capsys):
    assert main(["profile", str(decoder), *FAST, "--prompt", "8", "--json", "-"]) == 0
    req = json.loads(capsys.readouterr().out)["request"]
    assert (req["prompt"], req["generate"]) == (8, 128)


def test_compare_request_before_and_after(decoder, tmp_path, capsys):
    after = tmp_path / "kv.other.onnx"
    save_model(kv_decoder("gqa", seed=1), after)  # other weights, the same cost
    out = tmp_path / "c.json"
    code = main(["compare", str(decoder), str(after), *FAST, "--request", "--prompt", "16",
                 "--generate", "4", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "before → after" in text and "hint:" not in text
    for label in ("time to first token", "decode", "a request of 16+4 tokens"):
        line = next(x for x in text.splitlines() if x.strip().startswith(label))
        # four pairs: "too few runs", never "≈ 1×"
        assert " → " in line and "(too few runs [" in line and "≈ 1×" not in line
    data = json.loads(out.read_text())
    req = data["request"]
    assert (req["prompt"], req["generate"]) == (16, 4)
    assert req["before"]["rounds"] == req["after"]["rounds"] == 4
    for key in ("ttft", "tokens_per_s", "total"):
        s = req["speedup"][key]
        assert s["ci"][0] <= s["median"] <= s["ci"][1]
        # four pairs never make a verdict
        assert s["label"] == "too few runs" and s["verdict"] == "undecided"
        assert s["significant"] is False


def test_a_model_without_a_kv_cache_is_refused(tmp_path, capsys):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])])
    path = tmp_path / "relu.onnx"
    save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert main(["profile", str(path), *FAST, "--request"]) == 1
    err = capsys.readouterr().err
    assert "no past key/value (KV-cache) input" in err and "relu.onnx" in err
    assert main(["compare", str(path), str(path), *FAST, "--generate", "4"]) == 1
    assert "no past key/value" in capsys.readouterr().err
    assert main(["profile", str(path), *FAST, "--request", "--prompt", "0"]) == 1
    assert "--prompt must be a whole number" in capsys.readouterr().err


def test_compare_of_a_kv_decoder_hints_at_decode_and_request_unless_asked(decoder, capsys):
    hint = "hint: this decoder has a KV cache and is timed here in prefill"
    assert main(["compare", str(decoder), str(decoder), *FAST]) == 0
    out = capsys.readouterr().out
    assert out.count(hint) == 1 and "--phase decode" in out and "--request" in out
    assert main(["compare", str(decoder), str(decoder), *FAST, "--phase", "decode"]) == 0
    assert "hint:" not in capsys.readouterr().out
    # JSON on stdout stays JSON: the hint goes to stderr
    assert main(["compare", str(decoder), str(decoder), *FAST, "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["verdict"] == "undecided" and hint in captured.err


def test_a_request_runs_on_a_shared_kv_buffer(decoder, tmp_path):
    out = tmp_path / "p.json"
    code = main(["profile", str(decoder), *FAST, "--request", "--prompt", "16", "--generate",
                 "8", "--kv-buffer", "shared", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["settings"]["kv_buffer"] == "shared"
    assert data["request"]["ttft_ms"] > 0 and set(data["request"]["decode_at_ms"]) == {"16", "24"}
