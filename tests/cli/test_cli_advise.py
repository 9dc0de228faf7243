"""`opstudio advise`: measures, plans within the budget and writes a recipe the optimizer takes."""

import json

import onnx

from model_builders import small_mlp
from opstudio.cli import main
from opstudio.core.recipe import Recipe


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
