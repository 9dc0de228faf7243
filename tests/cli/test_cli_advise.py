"""`opstudio advise`: measures, plans within the budget and writes a recipe the optimizer takes."""

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from opstudio.cli import main
from opstudio.core.recipe import Recipe


def mlp_model(path):
    rng = np.random.default_rng(1)
    w1 = (rng.standard_normal((128, 256)) * 0.05).astype(np.float32)
    w2 = (rng.standard_normal((256, 64)) * 0.05).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="act"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
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
    recipe = Recipe.load(recipe_path)  # an ordinary recipe: loads and validates
    data = json.loads(report.read_text())
    assert {c["node"] for c in data["sensitivity"]["candidates"]} == {"fc1", "fc2"}
    assert data["plan"]["budget"]["min_snr_db"] == 20
    if recipe.steps:
        assert data["plan"]["verified"]["snr_db"] is None or data["plan"]["verified"]["snr_db"] >= 20
    assert data["machine"]["peak_gflops"] > 0
    # an existing recipe is never replaced without --overwrite
    assert main(["advise", str(model), "--dim", "batch=64", "-o", str(recipe_path)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_advise_rejects_unknown_technique(tmp_path, capsys):
    model = mlp_model(tmp_path / "mlp.onnx")
    code = main(["advise", str(model), "--techniques", "magic", "-o", str(tmp_path / "r.json")])
    assert code == 1
    assert "unknown technique 'magic'" in capsys.readouterr().err
