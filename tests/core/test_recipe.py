"""The recipe format: schema errors, load/save, validation against a model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from opstudio.core.errors import OpstudioError
from opstudio.core.plan.recipe import Recipe, Step, named_later, step_from_parts, validate


def model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W0"),
             numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "W1")]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="mm0"),
             helper.make_node("Relu", ["h"], ["r"], name="relu0"),
             helper.make_node("MatMul", ["r", "W1"], ["y"], name="mm1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 64])],
                              [helper.make_tensor_value_info("y", 1, [2, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


GOOD = {"version": 1, "steps": [
    {"nodes": ["mm0"], "technique": "int4-weight", "params": {"block_size": 64}},
    {"op_types": ["MatMul"], "technique": "int8-dynamic", "params": {}},
]}


def test_round_trip():
    recipe = Recipe.from_json(GOOD)
    assert recipe.steps[0] == Step("int4-weight", {"block_size": 64}, nodes=["mm0"])
    assert recipe.steps[1].op_types == ["MatMul"] and recipe.steps[1].nodes is None
    assert recipe.to_json() == GOOD
    validate(recipe, model())


def test_params_may_be_left_out():
    recipe = Recipe.from_json({"version": 1, "steps": [{"nodes": ["mm0"], "technique": "fp16"}]})
    assert recipe.steps[0].params == {}


def test_save_and_load(tmp_path):
    path = tmp_path / "r.json"
    Recipe.from_json(GOOD).save(path)
    assert Recipe.load(path).to_json() == GOOD
    with pytest.raises(OpstudioError, match="already exists"):
        Recipe.from_json(GOOD).save(path)
    Recipe.from_json(GOOD).save(path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left


@pytest.mark.parametrize(("data", "message"), [
    ([], "recipe: expected a JSON object, not a list"),
    ({"steps": []}, "recipe: missing 'version'"),
    ({"version": 2, "steps": []}, "recipe: version 2 is not supported"),
    ({"version": True, "steps": []}, "version True is not supported"),
    ({"version": 1}, "recipe: missing 'steps'"),
    ({"version": 1, "steps": {}}, "'steps' must be a list, not an object"),
    ({"version": 1, "steps": []}, "'steps' is empty"),
    ({"version": 1, "steps": [], "extra": 1}, "unknown key(s) 'extra'"),
    ({"version": 1, "steps": ["fp16"]}, "step 1: expected an object, not a string"),
    ({"version": 1, "steps": [{"nodes": ["a"]}]}, "step 1: missing 'technique'"),
    ({"version": 1, "steps": [{"nodes": ["a"], "technique": 3}]}, "'technique' must be a name"),
    ({"version": 1, "steps": [{"technique": "fp16"}]},
     "step 1 (fp16): missing 'nodes', 'op_types' or 'name_pattern'"),
    ({"version": 1, "steps": [{"technique": "fp16", "nodes": ["a"], "op_types": ["Relu"]}]},
     "step 1 (fp16): give either 'nodes' or 'op_types', not both"),
    ({"version": 1, "steps": [{"technique": "fp16", "nodes": ["a"], "name_pattern": "a*"}]},
     "step 1 (fp16): give either 'nodes' or 'name_pattern', not both"),
    ({"version": 1, "steps": [{"technique": "fp16", "name_pattern": []}]},
     "step 1 (fp16): 'name_pattern' is empty"),
    ({"version": 1, "steps": [{"technique": "fp16", "name_pattern": 3}]},
     "'name_pattern' must be a glob or a list of globs, not a number"),
    ({"version": 1, "steps": [{"technique": "fp16", "name_pattern": ""}]},
     "'name_pattern' holds ''; expected non-empty names"),
    ({"version": 1, "steps": [{"technique": "fp16", "nodes": []}]}, "step 1 (fp16): 'nodes' is empty"),
    ({"version": 1, "steps": [{"technique": "fp16", "op_types": "Relu"}]},
     "'op_types' must be a list of names, not a string"),
    ({"version": 1, "steps": [{"technique": "fp16", "nodes": ["a", "a"]}]}, "lists 'a' twice"),
    ({"version": 1, "steps": [{"technique": "fp16", "nodes": [""]}]}, "expected non-empty names"),
    ({"version": 1, "steps": [{"technique": "fp16", "nodes": ["a"], "params": []}]},
     "'params' must be an object"),
    ({"version": 1, "steps": [GOOD["steps"][0], {"technique": "fp16", "node": ["a"]}]},
     "step 2 (fp16): unknown key(s) 'node'"),
])
def test_schema_errors(data, message):
    with pytest.raises(OpstudioError) as info:
        Recipe.from_json(data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(OpstudioError, match="no such recipe file"):
        Recipe.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1,\n "steps": [}')
    with pytest.raises(OpstudioError, match=r"bad.json: not valid JSON \(line 2"):
        Recipe.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"version": 7, "steps": []}))
    with pytest.raises(OpstudioError, match=r"wrong.json: recipe: version 7"):
        Recipe.load(wrong)


def steps(*items: dict) -> Recipe:
    return Recipe.from_json({"version": 1, "steps": list(items)})


@pytest.mark.parametrize(("recipe", "message"), [
    (steps(GOOD["steps"][0], {"nodes": ["mm9"], "technique": "int8-dynamic"}),
     "step 2 (int8-dynamic): node 'mm9' is not in the model"),
    (steps({"op_types": ["Conv"], "technique": "int8-dynamic"}),
     "step 1 (int8-dynamic): selects no node: the model has no 'Conv' nodes"),
    (steps(GOOD["steps"][0], {"op_types": ["Conv", "Gemm"], "technique": "fp16"}),
     "step 2 (fp16): selects no node: the model has no 'Conv' or 'Gemm' nodes"),
    (steps({"name_pattern": "*/mlp/*", "technique": "fp16"}),
     "step 1 (fp16): selects no node: no node name matches '*/mlp/*'"),
    (steps({"name_pattern": ["relu*", "mm9"], "op_types": ["MatMul"], "technique": "fp16"}),
     "step 1 (fp16): selects no node: no 'MatMul' node has a name matching 'relu*' or 'mm9'"),
    (steps(GOOD["steps"][0], {"nodes": ["mm1"], "technique": "sharpen"}),
     "step 2: unknown technique 'sharpen'; expected one of"),
    (steps({"nodes": ["mm0"], "technique": "int4-weight", "params": {"block_size": 48}}),
     "step 1 (int4-weight): parameter 'block_size' must be one of"),
    (steps({"nodes": ["mm0"], "technique": "int8-dynamic", "params": {"rank": 3}}),
     "step 1 (int8-dynamic): unknown parameter(s) rank"),
    (steps({"nodes": ["relu0"], "technique": "int4-weight"}),
     "step 1 (int4-weight): node 'relu0' (Relu) cannot take int4-weight: "
     "int4-weight handles MatMul, Gemm and embedding Gathers, not Relu"),
    (steps({"nodes": ["mm1"], "technique": "int4-weight", "params": {"block_size": 64}}),
     "step 1 (int4-weight): node 'mm1' (MatMul) cannot take int4-weight: "
     "K=32 is smaller than the block size 64"),
    (steps({"nodes": ["mm0", "mm1"], "technique": "int8-static",
            "params": {"calibration": "missing.npz"}}),
     "step 1 (int8-static): calibration file missing.npz does not exist"),
])
def test_validate_errors_name_step_and_node(recipe, message):
    with pytest.raises(OpstudioError) as info:
        validate(recipe, model())
    assert message in str(info.value)


def test_nodes_rewritten_by_an_earlier_step_are_checked_later():
    # mm0 is MatMulNBits after step 1; int8-dynamic could not take that, but validate only
    # checks nodes on the original model, the optimizer checks the rest.
    validate(steps({"nodes": ["mm0"], "technique": "int4-weight", "params": {}},
                   {"nodes": ["mm0"], "technique": "int8-dynamic"}), model())


def test_step_from_parts_uses_the_same_rules():
    assert step_from_parts("fp16", nodes=["mm0"]).nodes == ["mm0"]
    with pytest.raises(OpstudioError, match="not both"):
        step_from_parts("fp16", nodes=["mm0"], op_types=["MatMul"])


def test_a_portable_step_lists_op_types_the_model_lacks():
    # only a step that selects no node at all is an error
    validate(steps({"op_types": ["MatMul", "Gemm", "Conv"], "technique": "int8-dynamic"}), model())


def test_name_pattern_round_trip_and_selection():
    data = {"version": 1, "steps": [
        {"name_pattern": "mm*", "technique": "fp16", "params": {}},
        {"op_types": ["MatMul", "Relu"], "name_pattern": ["*0", "relu?"], "technique": "fp16",
         "params": {}}]}
    recipe = Recipe.from_json(data)
    assert recipe.steps[0].name_pattern == ["mm*"] and recipe.steps[0].op_types is None
    assert recipe.to_json() == data  # one pattern is written back as a string
    one, both = recipe.steps
    assert one.is_selector and both.is_selector
    assert one.selects("MatMul", ["mm0"]) and one.selects("Relu", ["mm0"])
    assert not one.selects("MatMul", ["relu0"])
    # both keys: one of the types AND one of the patterns
    assert both.selects("MatMul", ["mm0"]) and both.selects("Relu", ["relu0"])
    assert not both.selects("MatMul", ["mm1"]) and not both.selects("Add", ["x0"])
    # a rewritten node is matched by the original name it stands for
    assert one.selects("MatMulNBits", ["q4_node", "mm1"])
    # '*' crosses '/' and matching is case-sensitive
    slash = step_from_parts("fp16", name_pattern="*/mlp/*_proj/MatMul")
    assert slash.selects("MatMul", ["/model/layers.3/mlp/up_proj/MatMul"])
    assert not slash.selects("MatMul", ["/model/layers.3/attn/q_proj/MatMul"])
    assert not slash.selects("MatMul", ["/model/layers.3/MLP/up_proj/MatMul"])
    assert not Step("fp16", nodes=["mm0"]).selects("MatMul", ["mm0"])
    validate(recipe, model())


def test_named_later_maps_names_to_the_first_later_step_naming_them():
    recipe = steps({"op_types": ["MatMul"], "technique": "int8-dynamic"},
                   {"nodes": ["mm1"], "technique": "fp16"},
                   {"name_pattern": "mm*", "technique": "fp16"},
                   {"nodes": ["mm1", "mm0"], "technique": "int4-weight"})
    assert named_later(recipe) == [{"mm1": 2, "mm0": 4}, {"mm1": 4, "mm0": 4},
                                   {"mm1": 4, "mm0": 4}, {}]


def test_a_node_named_later_is_checked_on_the_original_model():
    # step 1 leaves mm1 to step 2, so step 2's check sees mm1 as it is in the file
    validate(steps({"op_types": ["MatMul"], "technique": "int4-weight"},
                   {"nodes": ["mm1"], "technique": "int8-dynamic"}), model())
    with pytest.raises(OpstudioError, match=r"step 2 \(int4-weight\): node 'relu0' \(Relu\) "
                                            "cannot take int4-weight"):
        validate(steps({"op_types": ["MatMul", "Relu"], "technique": "fp16"},
                       {"nodes": ["relu0"], "technique": "int4-weight"}), model())


def test_a_selector_finding_nothing_says_what_the_user_can_do():
    quantized = helper.make_model(helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"], name="mmi")], "q",
        [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [2, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [2, 3])],
        [numpy_helper.from_array(np.ones((4, 3), np.int8), "w")]),
        opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(OpstudioError, match=r"no 'MatMul' nodes: it is quantized already "
                                            r"\(MatMulInteger\); optimize the float model"):
        validate(steps({"op_types": ["MatMul"], "technique": "fp16"}), quantized)
    inner = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["z"], name="mm")], "body",
                              [], [helper.make_tensor_value_info("z", 1, [2, 3])])
    branched = helper.make_model(helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="if", then_branch=inner, else_branch=inner)],
        "b", [helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
              helper.make_tensor_value_info("x", 1, [2, 4])],
        [helper.make_tensor_value_info("y", 1, [2, 3])],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")]),
        opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(OpstudioError, match=r"no 'MatMul' or 'Conv' nodes outside If/Loop/Scan "
                                            r"bodies \(MatMul only inside them"):
        validate(steps({"op_types": ["MatMul", "Conv"], "technique": "fp16"}), branched)


def test_a_selector_for_op_types_an_earlier_step_creates_is_checked_when_it_runs():
    # MatMulNBits exists only after int4-weight: validate leaves step 2 to the optimizer
    made = steps({"nodes": ["mm0"], "technique": "int4-weight", "params": {}},
                 {"op_types": ["MatMulNBits"], "technique": "fp16"})
    assert validate(made, model()) == {2}
    # int8-dynamic makes no MatMulNBits, so nothing can produce what step 2 selects
    never = steps({"nodes": ["mm0"], "technique": "int8-dynamic"},
                  {"op_types": ["MatMulNBits"], "technique": "fp16"})
    with pytest.raises(OpstudioError, match=r"^step 2 \(fp16\): selects no node: the model has "
                                            r"no 'MatMulNBits' nodes; choose op types it has$"):
        validate(never, model())
    # a step before the one that creates them does not count
    early = steps({"op_types": ["MatMulNBits"], "technique": "fp16"},
                  {"nodes": ["mm0"], "technique": "int4-weight", "params": {}})
    with pytest.raises(OpstudioError, match=r"^step 1 \(fp16\): selects no node"):
        validate(early, model())
