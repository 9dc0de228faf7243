"""``opstudio optimize``: exit codes, what it prints, what it writes and refuses to write."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from model_builders import framed_matmul, unsized_matmul
from opstudio.cli import main
from opstudio.core.model.model_io import save_model
from opstudio.core.passes import PassResult, get_pass


def mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(5)

    def w(k: int, n: int, name: str) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), name)

    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="mm0"),
             helper.make_node("Relu", ["h"], ["r"], name="relu0"),
             helper.make_node("MatMul", ["r", "W1"], ["logits"], name="mm1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["batch", 128])],
                              [helper.make_tensor_value_info("logits", 1, ["batch", 10])],
                              [w(128, 64, "W0"), w(64, 10, "W1")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def files(tmp_path):
    model = tmp_path / "model.onnx"
    save_model(mlp(), model)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"version": 1, "steps": [
        {"nodes": ["mm0"], "technique": "int4-weight", "params": {"block_size": 32}},
        {"op_types": ["MatMul", "Relu"], "technique": "int8-dynamic", "params": {}},
    ]}))
    return tmp_path, model, recipe


def test_optimize_prints_steps_and_accuracy(files, capsys):
    tmp, model, recipe = files
    out = tmp / "out.onnx"
    code = main(["optimize", str(model), "--recipe", str(recipe), "-o", str(out),
                 "--dim", "batch=4", "--report", str(tmp / "report.json")])
    text = capsys.readouterr().out
    assert code == 0, text
    first = next(line for line in text.splitlines() if line.startswith("step 1:"))
    assert first.startswith("step 1: int4-weight (block_size=32, symmetric=True")
    assert "— 1 node(s) rewritten, 0 skipped" in first
    assert "bytes 32.0 KiB → " in text
    # mm0 is MatMulNBits after step 1, so op type MatMul now selects only mm1
    assert "step 2: int8-dynamic" in text and "1 node(s) rewritten, 1 skipped" in text
    assert "skipped relu0: int8-dynamic handles Conv, Gemm, MatMul, not Relu" in text
    assert "accuracy vs the original (synthetic inputs)" in text
    assert "logits" in text and "[4,10]" in text and "cosine" in text
    onnx.checker.check_model(onnx.load(out), full_check=True)
    report = json.loads((tmp / "report.json").read_text())
    assert [s["technique"] for s in report["steps"]] == ["int4-weight", "int8-dynamic"]
    (acc,) = report["accuracy"]["outputs"]
    assert acc["name"] == "logits" and 0.9 < acc["cosine"] <= 1.0
    assert report["size_bytes"]["after"] < report["size_bytes"]["before"]


def test_report_to_stdout_is_pure_json(files, capsys):
    tmp, model, recipe = files
    code = main(["optimize", str(model), "--recipe", str(recipe), "-o", str(tmp / "o.onnx"),
                 "--report", "-"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["output"].endswith("o.onnx")


def test_refuses_to_overwrite_the_input(files, capsys):
    _, model, recipe = files
    before = model.read_bytes()
    code = main(["optimize", str(model), "--recipe", str(recipe), "-o", str(model), "--overwrite"])
    assert code == 1
    assert "is the input model" in capsys.readouterr().err
    assert model.read_bytes() == before


def test_existing_output_needs_overwrite(files, capsys):
    tmp, model, recipe = files
    out = tmp / "out.onnx"
    out.write_bytes(b"keep me")
    assert main(["optimize", str(model), "--recipe", str(recipe), "-o", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["optimize", str(model), "--recipe", str(recipe), "-o", str(out),
                 "--overwrite"]) == 0
    onnx.checker.check_model(onnx.load(out))


@pytest.mark.parametrize(("step", "message"), [
    ({"nodes": ["nope"], "technique": "fp16"}, "error: step 1 (fp16): node 'nope' is not in the model"),
    ({"nodes": ["relu0"], "technique": "int4-weight"},
     "error: step 1 (int4-weight): node 'relu0' (Relu) cannot take int4-weight"),
    ({"nodes": ["mm0"], "technique": "magic"}, "error: step 1: unknown technique 'magic'"),
    ({"op_types": ["Conv"], "technique": "fp16"},
     "error: step 1 (fp16): selects no node: the model has no 'Conv' nodes"),
    ({"op_types": ["Relu", "Conv"], "technique": "int4-weight"},
     "error: the recipe rewrote no node, so there is nothing to write — step 1 (int4-weight): "
     "the model has no 'Conv' nodes (skipped); 1 node(s) cannot take it: int4-weight handles "
     "MatMul, Gemm and embedding Gathers, not Relu"),
    ({"nodes": ["mm0"], "technique": "fp16", "params": {"x": 1}},
     "error: step 1 (fp16): unknown parameter(s) x"),
])
def test_bad_recipes_fail_cleanly_and_write_nothing(files, capsys, step, message):
    tmp, model, _ = files
    recipe = tmp / "bad.json"
    recipe.write_text(json.dumps({"version": 1, "steps": [step]}))
    out = tmp / "never.onnx"
    assert main(["optimize", str(model), "--recipe", str(recipe), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not out.exists()
    assert sorted(p.name for p in tmp.iterdir()) == ["bad.json", "model.onnx", "r.json"]


def test_usage_errors_exit_2(files, capsys):
    _, model, _ = files
    with pytest.raises(SystemExit) as info:
        main(["optimize", str(model)])
    assert info.value.code == 2
    assert "--recipe" in capsys.readouterr().err


def test_a_portable_recipe_runs_on_a_model_lacking_some_op_types(files, capsys):
    tmp, model, _ = files
    recipe = tmp / "portable.json"
    recipe.write_text(json.dumps({"version": 1, "steps": [
        {"op_types": ["MatMul", "Gemm", "Conv"], "technique": "int8-dynamic"}]}))
    out = tmp / "out.onnx"
    assert main(["optimize", str(model), "--recipe", str(recipe), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 node(s) rewritten" in text
    assert "note: the model has no 'Gemm' nodes (skipped)" in text
    assert "note: the model has no 'Conv' nodes (skipped)" in text
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_zero_rewrites_exit_1_and_write_nothing(tmp_path, capsys):
    # weights fed as graph inputs: no MatMul can take a weight technique
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm0")], "g",
        [helper.make_tensor_value_info("x", 1, [2, 8]), helper.make_tensor_value_info("w", 1, [8, 4])],
        [helper.make_tensor_value_info("y", 1, [2, 4])])
    model = tmp_path / "inputs.onnx"
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"version": 1, "steps": [
        {"op_types": ["MatMul", "Gemm"], "technique": "int8-dynamic"},
        {"op_types": ["MatMul"], "technique": "int4-weight"}]}))
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model), "--recipe", str(recipe), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the recipe rewrote no node") and err.count("\n") == 1
    assert "step 1 (int8-dynamic): the model has no 'Gemm' nodes (skipped); 1 node(s) cannot " \
           "take it: its weight 'w' is a graph input" in err
    assert "step 2 (int4-weight): 1 node(s) cannot take it: its weight 'w' is a graph input" in err
    assert not out.exists()


def test_the_result_is_written_before_it_is_judged(files, capsys, monkeypatch):
    from opstudio.core.errors import OpstudioError
    from opstudio.core.measure import accuracy

    def fails(*_args, **_kwargs):
        raise OpstudioError("onnxruntime could not run the model (out of memory)")

    monkeypatch.setattr(accuracy, "compare_outputs", fails)
    tmp, model, recipe = files
    out = tmp / "out.onnx"
    code = main(["optimize", str(model), "--recipe", str(recipe), "-o", str(out),
                 "--dim", "batch=4"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == (f"error: wrote {out}, but could not check its accuracy: "
                           "onnxruntime could not run the model (out of memory)")
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_an_external_data_model_is_judged_from_the_files(tmp_path, capsys):
    model = tmp_path / "model.onnx"
    onnx.save_model(mlp(), str(model), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"version": 1, "steps": [
        {"op_types": ["MatMul"], "technique": "int8-weight", "params": {}}]}))
    out = tmp_path / "out" / "out.onnx"
    out.parent.mkdir()
    code = main(["optimize", str(model), "--recipe", str(recipe), "-o", str(out),
                 "--dim", "batch=4", "--report", "-"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["accuracy"]["outputs"][0]["cosine"] > 0.99
    # the sizes are the files on disk, external data included
    assert report["size_bytes"]["before"] == (model.stat().st_size
                                              + (tmp_path / "model.onnx.data").stat().st_size)
    assert report["size_bytes"]["after"] == out.stat().st_size


def _unsized(tmp_path):
    """A model whose input has a dim no default covers ('height')."""
    model = tmp_path / "unsized.onnx"
    save_model(unsized_matmul(), model)
    return model


def _recipe(tmp_path, technique):
    recipe = tmp_path / f"{technique}.json"
    recipe.write_text(json.dumps({"version": 1, "steps": [
        {"op_types": ["MatMul"], "technique": technique}]}))
    return recipe


def test_optimize_without_inputs_for_the_accuracy_writes_the_model_and_says_so(tmp_path, capsys):
    model, out = _unsized(tmp_path), tmp_path / "out.onnx"
    code = main(["optimize", str(model), "--recipe", str(_recipe(tmp_path, "int8-dynamic")),
                 "-o", str(out), "--report", str(tmp_path / "report.json")])
    text = capsys.readouterr().out
    assert code == 0, text
    assert ("accuracy vs the original: not measured, input 'x' dim 1 ('height') is unknown; "
            "to measure it, pass --dim height=N or --shape x=1,N,32") in text
    assert "wrote " in text
    onnx.checker.check_model(onnx.load(out), full_check=True)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["accuracy"] is None
    assert "--dim height=N" in report["accuracy_not_measured"]
    # the flag it names measures it
    code = main(["optimize", str(model), "--recipe", str(_recipe(tmp_path, "int8-dynamic")),
                 "-o", str(out), "--overwrite", "--dim", "height=5"])
    text = capsys.readouterr().out
    assert code == 0 and "accuracy vs the original (synthetic inputs)" in text and "[1,5,16]" in text


def test_a_technique_that_calibrates_still_refuses_naming_the_flag(tmp_path, capsys):
    model, out = _unsized(tmp_path), tmp_path / "out.onnx"
    code = main(["optimize", str(model), "--recipe", str(_recipe(tmp_path, "int8-static")),
                 "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: step 1 (int8-static) runs the model on sample inputs, which "
                          "cannot be made: input 'x' dim 1 ('height') is unknown: "
                          "pass --dim height=N"), err
    assert not out.exists()


def test_original_that_does_not_run_on_synthetic_inputs_leaves_accuracy_unmeasured(tmp_path,
                                                                                   capsys):
    model, out = tmp_path / "framed.onnx", tmp_path / "out.onnx"
    save_model(framed_matmul(), model)
    recipe = _recipe(tmp_path, "int8-dynamic")
    code = main(["optimize", str(model), "--recipe", str(recipe), "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert ("accuracy vs the original: not measured, onnxruntime could not run the original "
            "model on synthetic inputs (") in text
    assert "to measure it, pass inputs it runs on with --inputs, --dim or --shape" in text
    onnx.checker.check_model(onnx.load(out), full_check=True)
    code = main(["optimize", str(model), "--recipe", str(recipe), "-o", str(out), "--overwrite",
                 "--dim", "sequence=192"])
    text = capsys.readouterr().out
    assert code == 0 and "[2,8]" in text


def test_a_big_model_is_quantized_tensor_by_tensor_with_a_progress_bar(tmp_path, capsys,
                                                                       monkeypatch):
    # the module, not the function `opstudio.core.plan` names after it
    optimize_module = importlib.import_module("opstudio.core.plan.optimize")

    # the module, not the function ``opstudio.core.plan`` exports under its name
    optimize_module = importlib.import_module("opstudio.core.plan.optimize")
    monkeypatch.setattr(optimize_module, "STREAM_ABOVE", 0)  # this small model counts as big
    model = tmp_path / "model.onnx"
    onnx.save_model(mlp(), str(model), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"version": 1, "steps": [
        {"op_types": ["MatMul"], "technique": "int4-weight", "params": {"accuracy_level": 4}}]}))
    out = tmp_path / "out" / "out.onnx"
    out.parent.mkdir()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar is drawn on a terminal
    code = main(["optimize", str(model), "--recipe", str(recipe), "-o", str(out),
                 "--dim", "batch=4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    matmuls = sum(n.op_type == "MatMul" for n in mlp().graph.node)
    for k in range(1, matmuls + 1):
        assert f"int4-weight: quantizing tensor {k} of {matmuls}" in captured.err
    assert "cosine" in captured.out
    assert (out.parent / "out.onnx.data").is_file()  # written from the quantized files


def test_a_step_selects_the_op_types_an_earlier_step_creates(tmp_path, capsys):
    from llm_builders import llama_decoder, llama_inputs

    model, prompt, out = tmp_path / "llama.onnx", tmp_path / "prompt.npz", tmp_path / "out.onnx"
    save_model(llama_decoder(layers=2), model)
    np.savez(prompt, **llama_inputs(past=0, layers=2))
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"version": 1, "steps": [
        {"op_types": ["Pow", "Neg"], "technique": "fuse"},
        {"op_types": ["GroupQueryAttention"], "technique": "kv-cache", "params": {"bits": 8}}]}))
    code = main(["optimize", str(model), "--recipe", str(recipe), "-o", str(out),
                 "--inputs", str(prompt)])
    text = capsys.readouterr().out
    assert code == 0, text
    second = next(line for line in text.splitlines() if line.startswith("step 2:"))
    assert second.startswith("step 2: kv-cache") and "2 node(s) rewritten, 0 skipped" in second
    gqa = [n for n in onnx.load(out).graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(
        any(a.name == "k_quant_type" and a.s == b"PER_CHANNEL" for a in n.attribute) for n in gqa)


def test_a_pass_that_breaks_the_contract_is_an_internal_error_with_a_traceback(
        files, capsys, monkeypatch):
    tmp, model, _ = files
    recipe = tmp / "one.json"
    recipe.write_text(json.dumps({"version": 1, "steps": [
        {"nodes": ["mm0"], "technique": "int8-dynamic", "params": {}}]}))
    pass_ = get_pass("int8-dynamic")

    def forgetful(work, chosen, params, ctx):  # adds a node that records no original node
        out = work.graph.node[0].output[0]
        work.graph.node[0].output[0] = f"{out}_pre"
        work.graph.node.insert(1, helper.make_node("Identity", [f"{out}_pre"], [out],
                                                   name="untraced"))
        return PassResult(model=work, applied=list(chosen))

    monkeypatch.setattr(pass_, "_rewrite", forgetful)
    code = main(["optimize", str(model), "--recipe", str(recipe), "-o", str(tmp / "out.onnx"),
                 "--dim", "batch=4"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" in err and "ContractBroken" in err
    assert ("error: internal error: this is a defect of opstudio's int8-dynamic pass: please "
            "report it (step 1 (int8-dynamic): int8-dynamic: created node") in err
    assert "created node 'untraced' (Identity) records no original node" in err
    assert not (tmp / "out.onnx").exists()
