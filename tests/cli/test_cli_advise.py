"""`opstudio advise`: measures, plans within the budget and writes a recipe the optimizer takes."""

import json

import onnx

from model_builders import small_mlp
from opstudio.cli import main
from opstudio.core.plan.recipe import Recipe


def mlp_model(path):
    onnx.save(small_mlp(), path)
    return path


def test_advise_writes_a_valid_recipe_and_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = mlp_model(tmp_path / "mlp.onnx")
    recipe_path, report = tmp_path / "plan.json", tmp_path / "advice.json"
    code = main(["advise", str(model), "--dim", "batch=64", "--runs", "3", "--warmup", "1",
                 "--threads", "1", "--techniques", "int8-dynamic,fp16", "--budget-snr", "20",
                 "-o", str(recipe_path), "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    assert "plan (SNR ≥ 20 dB on every output)" in out
    data = json.loads(report.read_text())
    if not data["plan"]["chosen"]:
        # nothing was faster on this machine: said so, and no empty recipe left behind
        assert "no recipe written" in out and not recipe_path.exists()
        return
    recipe = Recipe.load(recipe_path)  # an ordinary recipe: loads and validates
    assert {c["node"] for c in data["sensitivity"]["candidates"]} == {"fc1", "fc2"}
    assert data["plan"]["budget"]["min_snr_db"] == 20
    assert sum(len(s.nodes) for s in recipe.steps) == len(data["plan"]["chosen"])
    verified = data["plan"]["verified"]["snr_db"]
    assert verified is None or verified >= 20  # None: identical outputs
    assert data["machine"]["peak_gflops"] > 0



def test_advise_never_replaces_an_existing_recipe(tmp_path, capsys):
    model = mlp_model(tmp_path / "mlp.onnx")
    existing = tmp_path / "plan.json"
    existing.write_text("{}")
    assert main(["advise", str(model), "--dim", "batch=4", "-o", str(existing)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert existing.read_text() == "{}"


def test_advise_rejects_unknown_technique(tmp_path, capsys):
    model = mlp_model(tmp_path / "mlp.onnx")
    code = main(["advise", str(model), "--techniques", "magic", "-o", str(tmp_path / "r.json")])
    assert code == 1
    assert "unknown technique 'magic'" in capsys.readouterr().err


def test_advise_says_nothing_could_be_applied_and_exits_1(tmp_path, capsys, monkeypatch):
    # MatMuls whose weights are graph inputs: every weight technique refuses them
    from onnx import TensorProto, helper

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="act"),
         helper.make_node("MatMul", ["r", "w1"], ["y"], name="fc2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64]),
         helper.make_tensor_value_info("w0", TensorProto.FLOAT, [64, 128]),
         helper.make_tensor_value_info("w1", TensorProto.FLOAT, [128, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 32])])
    model = tmp_path / "inputs.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    recipe_path, report = tmp_path / "plan.json", tmp_path / "advice.json"
    code = main(["advise", str(model), "--runs", "3", "--warmup", "1", "--threads", "1",
                 "--techniques", "int8-dynamic,int4-weight,lowrank", "-o", str(recipe_path),
                 "--json", str(report)])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.startswith("error: nothing could be applied (6 tries — ") and err.count("\n") == 1
    assert "int8-dynamic: its weight '…' is a graph input, not a constant initializer; " \
           "onnxruntime's quantizer needs it as an initializer ×2" in err
    assert "int4-weight: its weight '…' is a graph input" in err and "lowrank: " in err
    assert err.rstrip().endswith(f"no recipe written to {recipe_path}")
    assert "best left as it is" not in out  # that is "nothing pays", a different answer
    assert not recipe_path.exists()
    data = json.loads(report.read_text())
    assert data["nothing_applies"] and data["plan"]["chosen"] == []
    assert set(data["sensitivity"]["refused"]) == {"int8-dynamic", "int4-weight", "lowrank"}


def test_advise_plans_a_decoder_for_a_top1_budget_on_its_decode_step(tmp_path, capsys,
                                                                     monkeypatch):
    import numpy as np

    from llm_builders import kv_decoder, prompt_inputs

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "decoder.onnx"
    onnx.save(kv_decoder("hf", layers=2, vocab=2048, hidden=128), model)
    prompt = tmp_path / "prompt.npz"
    np.savez(prompt, **prompt_inputs(16, vocab=2048, position_ids=True))
    recipe_path, report = tmp_path / "plan.json", tmp_path / "advice.json"
    code = main(["advise", str(model), "--inputs", str(prompt), "--phase", "decode",
                 "--budget-top1", "0.9", "--confidence", "0.5", "--techniques", "int8-weight",
                 "--threads", "1", "-o", str(recipe_path), "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    assert "by role (every layer at once), on the prompt:" in out
    assert "frontier (next-token agreement vs decode step speedup" in out
    assert "plan (next-token top-1 agreement ≥ 0.9)" in out
    data = json.loads(report.read_text())
    assert data["kind"] == "llm" and data["phase"] == "decode"
    assert data["budget"]["min_top1"] == 0.9 and data["budget"]["confidence"] == 0.5
    assert {r["variant"] for r in data["roles"]} <= {"int8-weight", "int8-weight64"}
    assert data["roles"]
    if data["recipe"]["steps"]:
        Recipe.load(recipe_path)
        assert data["verified"]["top1"] >= 0.9
    else:
        assert "no recipe written" in out and not recipe_path.exists()


def test_advise_next_token_flags_are_checked(tmp_path, capsys):
    model = mlp_model(tmp_path / "mlp.onnx")
    out = str(tmp_path / "r.json")
    # one budget only
    try:
        main(["advise", str(model), "--budget-top1", "0.9", "--budget-cosine", "0.99",
              "-o", out])
    except SystemExit as exc:
        assert exc.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["advise", str(model), "--budget-kl", "-1", "-o", out]) == 1
    assert "KL budget -1.0 must be a positive number of nats" in capsys.readouterr().err
    assert main(["advise", str(model), "--budget-top1", "0.9", "--techniques", "fp16",
                 "-o", out]) == 1
    assert "does not try fp16" in capsys.readouterr().err
    assert main(["advise", str(model), "--budget-top1", "0.9", "--int4-algorithms", "svdquant",
                 "-o", out]) == 1
    assert "unknown algorithm 'svdquant'" in capsys.readouterr().err
    assert main(["advise", str(model), "--budget-top1", "0.9", "--confidence", "1",
                 "-o", out]) == 1
    assert "confidence 1.0 must be in [0.5, 1)" in capsys.readouterr().err
    assert main(["advise", str(model), "--confidence", "0.8", "-o", out]) == 1
    assert "--confidence applies with --budget-top1" in capsys.readouterr().err
    # a model without logits is told to use cosine or SNR
    assert main(["advise", str(model), "--dim", "batch=4", "--budget-top1", "0.9",
                 "--techniques", "int8-weight", "--threads", "1", "-o", out]) == 1
    assert "no logits output" in capsys.readouterr().err


def test_advise_times_the_decode_step_at_another_past_than_the_prompt(tmp_path, capsys,
                                                                     monkeypatch):
    from llm_builders import runtime_folder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = runtime_folder(tmp_path / "gqa", "gqa")  # with a tokenizer: the built-in text
    code = main(["advise", str(model), "--phase", "decode", "--past", "64", "--budget-top1",
                 "0.5", "--techniques", "int8-weight", "--threads", "1",
                 "-o", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert code in (0, 1)
    assert "prompt: the built-in text" in out
    assert "the decode step is timed after a synthetic past of 64 tokens (--past)" in out
