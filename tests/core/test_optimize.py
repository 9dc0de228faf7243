"""The optimizer: steps in order, node addressing across steps, errors, determinism, files."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import opstudio.core.passes as passes_module
from opstudio.core.errors import Cancelled, OpstudioError
from opstudio.core.model import provenance
from opstudio.core.model.model_io import save_model
from opstudio.core.passes import Pass, PassContext, PassResult
from opstudio.core.passes.lowrank import PASS as LOWRANK
from opstudio.core.plan.optimize import NothingRewritten, optimize, optimize_file
from opstudio.core.plan.recipe import Recipe

# the module, not the function `opstudio.core.plan` names after it
optimize_module = importlib.import_module("opstudio.core.plan.optimize")
RNG = np.random.default_rng(3)


def mlp() -> onnx.ModelProto:
    """x[2,128] → mm0 (128×64) → relu0 → mm1 (64×64) → mm2 (64×16, K=64) → y."""
    def w(k: int, n: int, name: str) -> onnx.TensorProto:
        return numpy_helper.from_array((RNG.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), name)

    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="mm0"),
             helper.make_node("Relu", ["h"], ["r"], name="relu0"),
             helper.make_node("MatMul", ["r", "W1"], ["h1"], name="mm1"),
             helper.make_node("MatMul", ["h1", "W2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 128])],
                              [helper.make_tensor_value_info("y", 1, [2, 16])],
                              [w(128, 64, "W0"), w(64, 64, "W1"), w(64, 16, "W2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def feeds(seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((2, 128)).astype(np.float32)}


def run(model: onnx.ModelProto, x: Mapping[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, dict(x))[0]


def recipe(*steps: dict) -> Recipe:
    return Recipe.from_json({"version": 1, "steps": list(steps)})


def test_steps_apply_in_order_and_report():
    model = mlp()
    original = model.SerializeToString()
    r = recipe({"nodes": ["mm0"], "technique": "int4-weight", "params": {"block_size": 32}},
               {"op_types": ["MatMul"], "technique": "int8-dynamic"},
               {"nodes": ["relu0"], "technique": "fp16"})
    result = optimize(model, r, inputs=feeds())
    assert model.SerializeToString() == original  # the input is never changed
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert [s.index for s in result.steps] == [1, 2, 3]
    first, second, third = result.steps
    assert first.applied == ["mm0"] and first.details["mm0"]["block_size"] == 32
    # step 2 sees the result of step 1: mm0 is MatMulNBits now, only mm1/mm2 are MatMuls
    assert second.applied == ["mm1", "mm2"] and second.skipped == {}
    assert third.applied == ["relu0"]
    ops = [n.op_type for n in out.graph.node]
    assert "MatMulNBits" in ops and ops.count("MatMulInteger") == 2 and "Cast" in ops
    origins = {o for n in out.graph.node for o in provenance.get_origin(n)}
    assert origins == {"mm0", "relu0", "mm1", "mm2"}
    ref, new = run(model, feeds(1)), run(out, feeds(1))
    assert np.linalg.norm(new - ref) / np.linalg.norm(ref) < 0.25
    as_json = result.to_json()
    assert as_json["steps"][0]["technique"] == "int4-weight"
    assert as_json["steps"][1]["params"] == {"per_channel": False}


def test_op_type_selection_skips_nodes_with_reasons():
    result = optimize(mlp(), recipe({"op_types": ["MatMul"], "technique": "int4-weight",
                                     "params": {"block_size": 128}}))
    step = result.steps[0]
    assert step.applied == ["mm0"]
    assert "K=64 is smaller than the block size 128" in step.skipped["mm1"]
    assert set(step.skipped) == {"mm1", "mm2"}


def test_a_named_node_that_cannot_take_it_is_an_error():
    r = recipe({"nodes": ["mm0", "mm2"], "technique": "int4-weight", "params": {"block_size": 128}})
    with pytest.raises(OpstudioError) as info:
        optimize(mlp(), r)
    assert str(info.value) == ("step 1 (int4-weight): node 'mm2' (MatMul) cannot take "
                               "int4-weight: K=64 is smaller than the block size 128")


def test_a_named_node_rewritten_earlier_is_addressed_through_provenance():
    # after int4, "mm0" stands for mm0_Q4 (MatMulNBits), which int8-dynamic cannot take
    r = recipe({"nodes": ["mm0"], "technique": "int4-weight"},
               {"nodes": ["mm0"], "technique": "int8-dynamic"})
    with pytest.raises(OpstudioError) as info:
        optimize(mlp(), r)
    message = str(info.value)
    assert message.startswith("step 2 (int8-dynamic): none of the nodes made from 'mm0'")
    assert "mm0_Q4 (MatMulNBits)" in message


class SplitPass(Pass):
    """Test double: MatMul(x, W) → MatMul(MatMul(x, W), I), both recording the original."""

    technique = "split"
    params = ()

    def check(self, model, node, params=None):
        return None if node.op_type == "MatMul" else "only MatMul"

    def _rewrite(self, work: onnx.ModelProto, chosen: Sequence[str], params: Mapping[str, Any],
                 ctx: PassContext) -> PassResult:
        new_nodes = []
        for node in work.graph.node:
            if node.name not in chosen:
                new_nodes.append(node)
                continue
            n = next(i for i in work.graph.initializer if i.name == node.input[1]).dims[1]
            eye = numpy_helper.from_array(np.eye(n, dtype=np.float32), f"{node.name}_eye")
            work.graph.initializer.append(eye)
            a = helper.make_node("MatMul", [node.input[0], node.input[1]], [f"{node.name}_t"],
                                 name=f"{node.name}_a")
            b = helper.make_node("MatMul", [f"{node.name}_t", eye.name], list(node.output),
                                 name=f"{node.name}_b")
            for created in (a, b):
                provenance.set_origin(created, provenance.get_origin(node))
            new_nodes += [a, b]
        del work.graph.node[:]
        work.graph.node.extend(new_nodes)
        return PassResult(model=work, applied=list(chosen))


class BrokenPass(SplitPass):
    technique = "broken"

    def _rewrite(self, work, chosen, params, ctx):
        result = super()._rewrite(work, chosen, params, ctx)
        result.model.graph.node[0].input[0] = "nowhere"
        return result


@pytest.fixture
def fake_passes(monkeypatch):
    real = passes_module.get_pass
    fakes = {"split": SplitPass(), "broken": BrokenPass()}

    def get_pass(name: str) -> Pass:
        return fakes[name] if name in fakes else real(name)

    monkeypatch.setattr(passes_module, "get_pass", get_pass)
    monkeypatch.setattr(optimize_module, "get_pass", get_pass)


def test_later_steps_reach_all_nodes_made_from_a_named_node(fake_passes):
    r = recipe({"nodes": ["mm1"], "technique": "split"},
               {"nodes": ["mm1"], "technique": "int8-dynamic"})
    result = optimize(mlp(), r)
    assert result.steps[0].applied == ["mm1"]
    assert result.steps[1].applied == ["mm1_a", "mm1_b"]
    quantized = [n for n in result.model.graph.node if n.op_type == "MatMulInteger"]
    assert len(quantized) == 2
    assert all(provenance.get_origin(n) == ["mm1"] for n in quantized)


def test_a_step_producing_an_invalid_model_is_named(fake_passes):
    with pytest.raises(OpstudioError, match=r"^step 2 \(broken\): the result is not a valid"):
        optimize(mlp(), recipe({"nodes": ["mm2"], "technique": "fp16"},
                               {"nodes": ["mm0"], "technique": "broken"}))


def test_same_recipe_same_bytes():
    r = recipe({"nodes": ["mm0"], "technique": "int8-static", "params": {"samples": 4}},
               {"nodes": ["mm1"], "technique": "int4-weight"},
               {"nodes": ["mm2", "relu0"], "technique": "fp16"})
    a = optimize(mlp_fixed(), r, inputs=feeds()).model.SerializeToString()
    b = optimize(mlp_fixed(), r, inputs=feeds()).model.SerializeToString()
    assert a == b


def mlp_fixed() -> onnx.ModelProto:
    global RNG
    saved, RNG = RNG, np.random.default_rng(99)
    try:
        return mlp()
    finally:
        RNG = saved


def test_progress_and_cancel():
    seen: list[float] = []
    optimize(mlp(), recipe({"nodes": ["mm0"], "technique": "int4-weight"},
                           {"nodes": ["mm1"], "technique": "fp16"}),
             progress=lambda f, msg: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == 1.0 and seen[0] == 0.0
    with pytest.raises(Cancelled):
        optimize(mlp(), recipe({"nodes": ["mm0"], "technique": "fp16"}), cancelled=lambda: True)


def test_optimize_file(tmp_path):
    src = tmp_path / "in.onnx"
    save_model(mlp(), src)
    out = tmp_path / "out.onnx"
    r = recipe({"nodes": ["mm0"], "technique": "int8-dynamic"})
    with pytest.raises(OpstudioError, match="is the input model"):
        optimize_file(src, r, src, overwrite=True)
    result = optimize_file(src, r, out)
    assert result.steps[0].applied == ["mm0"]
    onnx.checker.check_model(onnx.load(out), full_check=True)
    with pytest.raises(OpstudioError, match="already exists"):
        optimize_file(src, r, out)
    optimize_file(src, r, out, overwrite=True)
    # a failing recipe writes nothing
    failing = recipe({"nodes": ["relu0"], "technique": "int4-weight"})
    missing = tmp_path / "never.onnx"
    with pytest.raises(OpstudioError, match="node 'relu0'"):
        optimize_file(src, failing, missing)
    with pytest.raises(Cancelled):
        optimize_file(src, r, missing, cancelled=lambda: True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]


def test_lowrank_then_quantize_the_factors():
    r = recipe({"nodes": ["mm0"], "technique": LOWRANK.technique, "params": {"rank": 48}},
               {"nodes": ["mm0"], "technique": "int8-dynamic"},
               {"nodes": ["mm1"], "technique": "prune", "params": {"sparsity": 0.5}},
               {"nodes": ["mm1"], "technique": "int4-weight"})
    result = optimize(mlp(), r, inputs=feeds())
    lowrank, int8, prune, int4 = result.steps
    assert len(lowrank.applied) == 1 and sorted(int8.applied) == ["mm0_lowrank_a", "mm0_lowrank_b"]
    assert prune.applied == ["mm1"] and int4.applied == ["mm1"]
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    quantized = [n for n in out.graph.node if n.op_type == "MatMulInteger"]
    assert len(quantized) == 2 and all(provenance.get_origin(n) == ["mm0"] for n in quantized)
    nbits = [n for n in out.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 1 and provenance.get_origin(nbits[0]) == ["mm1"]
    assert run(out, feeds(2)).shape == (2, 16)


def test_a_portable_recipe_skips_op_types_the_model_lacks():
    model = mlp()
    r = recipe({"op_types": ["MatMul", "Gemm", "Conv"], "technique": "int8-dynamic"})
    (step,) = optimize(model, r).steps
    assert step.applied == ["mm0", "mm1", "mm2"]
    assert "the model has no 'Gemm' nodes (skipped)" in step.notes
    assert "the model has no 'Conv' nodes (skipped)" in step.notes
    ref, new = run(model, feeds(1)), run(optimize(model, r).model, feeds(1))
    assert np.linalg.norm(new - ref) / np.linalg.norm(ref) < 0.1


def test_a_selector_step_that_selects_nothing_is_an_error_naming_it():
    r = recipe({"nodes": ["mm0"], "technique": "fp16"},
               {"op_types": ["Conv", "Gemm"], "technique": "int8-dynamic"})
    with pytest.raises(OpstudioError, match=r"^step 2 \(int8-dynamic\): selects no node: "
                                            r"the model has no 'Conv' or 'Gemm' nodes; "
                                            r"choose op types it has$"):
        optimize(mlp(), r)


def scoped() -> onnx.ModelProto:
    """Two layers named like an exporter's: attn/q_proj, mlp/up_proj, mlp/down_proj each."""
    nodes, inits, x = [], [], "x"
    for layer in range(2):
        for module, proj in (("attn", "q_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")):
            name = f"/model/layers.{layer}/{module}/{proj}/MatMul"
            w = f"w{layer}{proj}"
            inits.append(numpy_helper.from_array(
                (RNG.standard_normal((64, 64)) / 8).astype(np.float32), w))
            nodes.append(helper.make_node("MatMul", [x, w], [name + "_out"], name=name))
            x = name + "_out"
    nodes.append(helper.make_node("Relu", [x], ["y"], name="/model/mlp_out/Relu"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 64])],
                              [helper.make_tensor_value_info("y", 1, [2, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_name_pattern_selects_nodes_by_name_alone_or_with_op_types():
    mlp_nodes = [f"/model/layers.{i}/mlp/{p}/MatMul" for i in range(2)
                 for p in ("up_proj", "down_proj")]
    (step,) = optimize(scoped(), recipe({"name_pattern": "*/mlp/*_proj/MatMul",
                                         "technique": "int8-dynamic"})).steps
    assert step.applied == mlp_nodes and step.skipped == {}
    # a list of patterns: any may match; with op_types a node must match both
    (step,) = optimize(scoped(), recipe({"name_pattern": ["*/layers.1/*", "*mlp*"],
                                         "op_types": ["MatMul"], "technique": "fp16"})).steps
    assert sorted(step.applied) == sorted([*mlp_nodes, "/model/layers.1/attn/q_proj/MatMul"])
    assert "/model/mlp_out/Relu" not in step.applied and not step.skipped


def test_name_pattern_reaches_nodes_an_earlier_step_made_through_their_origin():
    r = recipe({"nodes": ["/model/layers.0/mlp/up_proj/MatMul"], "technique": LOWRANK.technique,
                "params": {"rank": 16}},
               {"name_pattern": "*/layers.0/mlp/up_proj/MatMul", "technique": "int8-dynamic"})
    _, second = optimize(scoped(), r).steps
    assert second.applied == ["/model/layers.0/mlp/up_proj/MatMul_lowrank_a",
                              "/model/layers.0/mlp/up_proj/MatMul_lowrank_b"]


def test_a_node_a_later_step_names_is_left_to_that_step():
    model = mlp()
    r = recipe({"op_types": ["MatMul"], "technique": "int8-dynamic"},
               {"nodes": ["mm0"], "technique": "int4-weight", "params": {"block_size": 32}})
    first, second = optimize(model, r, inputs=feeds()).steps
    assert first.applied == ["mm1", "mm2"]
    assert "left mm0 to step 2 (int4-weight), which names it" in first.notes
    assert second.applied == ["mm0"]
    out = optimize(model, r).model
    kinds = {provenance.get_origin(n)[0]: n.op_type for n in out.graph.node
             if n.op_type in ("MatMulNBits", "MatMulInteger")}
    assert kinds == {"mm0": "MatMulNBits", "mm1": "MatMulInteger", "mm2": "MatMulInteger"}
    ref, new = run(model, feeds(1)), run(out, feeds(1))
    assert np.linalg.norm(new - ref) / np.linalg.norm(ref) < 0.25


def weights_as_inputs() -> onnx.ModelProto:
    """MatMuls whose weights are graph inputs: no weight technique can take them."""
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
             helper.make_node("Relu", ["h"], ["r"], name="relu0"),
             helper.make_node("MatMul", ["r", "w1"], ["y"], name="mm1")]
    inputs = [helper.make_tensor_value_info("x", 1, [2, 64]),
              helper.make_tensor_value_info("w0", 1, [64, 64]),
              helper.make_tensor_value_info("w1", 1, [64, 16])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", 1, [2, 16])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_recipe_that_rewrites_nothing_is_an_error_that_says_why(tmp_path):
    r = recipe({"op_types": ["MatMul", "Conv"], "technique": "int8-dynamic"},
               {"op_types": ["Relu"], "technique": "int4-weight"})
    with pytest.raises(NothingRewritten) as info:
        optimize(weights_as_inputs(), r)
    message = str(info.value)
    assert message.startswith("the recipe rewrote no node, so there is nothing to write — ")
    assert "step 1 (int8-dynamic): the model has no 'Conv' nodes (skipped); 2 node(s) cannot " \
           "take it: its weight '…' is a graph input" in message
    assert "×2" in message
    assert "step 2 (int4-weight): 1 node(s) cannot take it: int4-weight handles MatMul, " \
           "Gemm and embedding Gathers, not Relu" in message
    assert "\n" not in message
    assert [s.index for s in info.value.steps] == [1, 2]
    src = tmp_path / "in.onnx"
    save_model(weights_as_inputs(), src)
    with pytest.raises(NothingRewritten):
        optimize_file(src, r, tmp_path / "out.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["in.onnx"]


def test_a_failure_inside_onnxruntimes_quantizer_names_the_step_and_what_to_do():
    from model_builders import small_mlp

    wrong = {"x": np.ones((2, 32), np.float32)}  # the model takes 64 features
    r = recipe({"op_types": ["MatMul"], "technique": "int8-static", "params": {"samples": 1}})
    with pytest.raises(OpstudioError) as caught:
        optimize(small_mlp(), r, inputs=wrong)
    message = str(caught.value)
    assert message.startswith("step 1 (int8-static): onnxruntime's static quantizer failed "
                              "while calibrating ("), message
    assert message.endswith("give calibration inputs the model runs on (--inputs, or an .npz "
                            "as 'calibration'), or leave these nodes out of the step")


def _fuse_then_kv_cache(attention: bool = True) -> Recipe:
    return recipe({"op_types": ["Pow", "Neg"], "technique": "fuse",
                   "params": {"attention": attention}},
                  {"op_types": ["GroupQueryAttention"], "technique": "kv-cache",
                   "params": {"bits": 8}})


def test_a_step_selects_op_types_an_earlier_step_created():
    from llm_builders import llama_decoder, llama_inputs

    model = llama_decoder(layers=3)
    assert not any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    result = optimize(model, _fuse_then_kv_cache(),
                      calibration=[llama_inputs(past=0, layers=3)])
    fused, cached = result.steps
    gqa = [n for n in result.model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 3 and fused.applied
    # every layer's attention got the quantized cache: the step rewrote each GQA node
    assert len(cached.applied) == 3 and not cached.skipped
    assert all(any(a.name == "k_quant_type" and a.s != b"NONE" for a in n.attribute)
               for n in gqa)


def test_a_step_whose_op_types_an_earlier_step_did_not_create_is_an_error_when_it_runs():
    from llm_builders import llama_decoder, llama_inputs

    with pytest.raises(OpstudioError, match=r"^step 2 \(kv-cache\): selects no node: the model "
                                            r"has no 'GroupQueryAttention' nodes; choose op types "
                                            r"it has \(no earlier step made one\)$"):
        optimize(llama_decoder(layers=1), _fuse_then_kv_cache(attention=False),
                 calibration=[llama_inputs(past=0, layers=1)])
