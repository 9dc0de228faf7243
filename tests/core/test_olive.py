"""core.olive and ``opstudio export-olive``: the plan's quantization steps as Olive passes with
opstudio's node lists, the rest listed with the reason."""

from __future__ import annotations

import json

import onnx
import pytest

from llm_builders import kv_decoder
from opstudio.cli import main
from opstudio.core.errors import OpstudioError
from opstudio.core.plan.olive import NOT_EXPORTED_KEY, olive_workflow
from opstudio.core.plan.recipe import Recipe

PLAN = {"version": 1, "steps": [
    {"name_pattern": "*/q_proj/MatMul", "technique": "lowrank", "params": {"rank": 8}},
    {"op_types": ["MatMul"], "technique": "int4-weight",
     "params": {"block_size": 16, "symmetric": False, "accuracy_level": 4}},
    {"nodes": ["/model/layers.1/attn/o_proj/MatMul"], "technique": "int8-dynamic",
     "params": {"per_channel": True}},
    {"nodes": ["/model/layers.0/attn/v_proj/MatMul"], "technique": "fp16"},
    {"nodes": ["/model/layers.0/attn/k_proj/MatMul"], "technique": "int8-static"},
]}
L0, L1 = "/model/layers.0/attn", "/model/layers.1/attn"


def test_quantization_steps_become_olive_passes_with_the_nodes_opstudio_chose(tmp_path):
    model = kv_decoder("gqa", layers=2)
    export = olive_workflow(Recipe.from_json(PLAN), model, tmp_path / "m.onnx", tmp_path / "o")
    wf = export.workflow
    assert wf["input_model"]["type"] == "ONNXModel"
    assert (wf["input_model"]["model_path"], wf["input_model"]["onnx_file_name"]) == (
        str(tmp_path), "m.onnx")
    assert wf["output_dir"] == str(tmp_path / "o")
    int4, int8, fp16 = wf["passes"].values()
    # the selector leaves the nodes later steps name to those steps, as optimize does
    assert int4 == {"type": "OnnxBlockWiseRtnQuantization", "bits": 4, "block_size": 16,
                    "is_symmetric": False, "accuracy_level": 4, "nodes_to_include": [
                        f"{L0}/q_proj/MatMul", f"{L0}/o_proj/MatMul",
                        f"{L1}/q_proj/MatMul", f"{L1}/k_proj/MatMul", f"{L1}/v_proj/MatMul",
                        "/lm_head/MatMul"]}
    assert int8["type"] == "OnnxDynamicQuantization" and int8["per_channel"] is True
    assert int8["nodes_to_quantize"] == [f"{L1}/o_proj/MatMul"]
    assert fp16 == {"type": "OnnxFloatToFloat16", "node_include_list": [f"{L0}/v_proj/MatMul"],
                    "keep_io_types": True}
    assert [(i, t) for i, t, _ in export.not_exported] == [(1, "lowrank"), (5, "int8-static")]
    listed = wf["input_model"]["model_attributes"][NOT_EXPORTED_KEY]
    assert listed[0] == {"step": 1, "technique": "lowrank",
                         "reason": "Olive has no ONNX pass for low-rank factorization"}
    assert "data_config" in listed[1]["reason"]
    assert any("q_proj/MatMul" in n and "Olive applies it to the original" in n
               for n in export.notes)
    assert any("/lm_head/MatMul" in n and "stay float in Olive's result" in n
               for n in export.notes)


def test_a_plan_olive_cannot_run_at_all_is_refused(tmp_path):
    plan = Recipe.from_json({"version": 1, "steps": [PLAN["steps"][0]]})
    with pytest.raises(OpstudioError, match="no step of the plan has an Olive ONNX pass"):
        olive_workflow(plan, kv_decoder("gqa"), tmp_path / "m.onnx", tmp_path / "o")


def test_rounding_other_than_round_to_nearest_is_not_exported(tmp_path):
    plan = Recipe.from_json({"version": 1, "steps": [
        {"op_types": ["MatMul"], "technique": "int4-weight", "params": {"algorithm": "k_quant"}},
        {"nodes": ["/lm_head/MatMul"], "technique": "int8-dynamic"}]})
    export = olive_workflow(plan, kv_decoder("gqa"), tmp_path / "m.onnx", tmp_path / "o")
    assert export.not_exported[0][:2] == (1, "int4-weight")
    assert "'k_quant' rounding" in export.not_exported[0][2]
    assert [p["type"] for p in export.workflow["passes"].values()] == ["OnnxDynamicQuantization"]


def test_cli_writes_the_workflow_and_prints_each_step(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(kv_decoder("gqa"), model)
    recipe = tmp_path / "plan.json"
    recipe.write_text(json.dumps(PLAN))
    out = tmp_path / "workflow.json"
    assert main(["export-olive", str(recipe), "--model", str(model), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "step 2 (int4-weight) → OnnxBlockWiseRtnQuantization on 6 node(s)" in printed
    assert "step 1 (lowrank) not exported: Olive has no ONNX pass" in printed
    workflow = json.loads(out.read_text())
    assert workflow["output_dir"] == str(tmp_path / "olive_output")
    assert main(["export-olive", str(recipe), "--model", str(model), "-o", str(out)]) == 1
    assert "already exists (use --overwrite" in capsys.readouterr().err
