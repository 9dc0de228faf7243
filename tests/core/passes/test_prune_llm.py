"""prune, structured, on LLM MLPs: gate/up/down pruned jointly, ranked by weights or activations."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_builders import apply_pass, run_ort
from opstudio.core.model import validity
from opstudio.core.model.graph import analyze
from opstudio.core.passes import PassContext
from opstudio.core.passes.prune import PASS

HIDDEN, INTER = 32, 64
SCOPE = "/model/layers.{}/mlp"


def swiglu(act: str = "silu", layers: int = 1, fp16: bool = False, seed: int = 0,
           weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """x → per layer: RMS-norm-like scale → down(act(gate(h)) · up(h)) + residual."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for layer in range(layers):
        scope = SCOPE.format(layer)
        given = weights or {}
        mats = {"gate": given.get("gate", rng.standard_normal((HIDDEN, INTER)) * 0.2),
                "up": given.get("up", rng.standard_normal((HIDDEN, INTER)) * 0.2),
                "down": given.get("down", rng.standard_normal((INTER, HIDDEN)) * 0.2)}
        names = {}
        for role, value in mats.items():
            name = f"model.layers.{layer}.mlp.{role}_proj.weight"
            if fp16:
                inits.append(numpy_helper.from_array(value.astype(np.float16), f"{name}_fp16"))
                nodes.append(helper.make_node("Cast", [f"{name}_fp16"], [name],
                                              name=f"{scope}/{role}_proj/Cast",
                                              to=TensorProto.FLOAT))
            else:
                inits.append(numpy_helper.from_array(value.astype(np.float32), name))
            names[role] = name
        norm_w = f"model.layers.{layer}.post_attention_layernorm.weight"
        inits.append(numpy_helper.from_array(
            (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32), norm_w))
        h = f"{scope}/norm_out"
        nodes.append(helper.make_node("Mul", [x, norm_w], [h],
                                      name=f"/model/layers.{layer}/post_attention_layernorm/Mul"))
        g, u = f"{scope}/gate_proj/out", f"{scope}/up_proj/out"
        nodes.append(helper.make_node("MatMul", [h, names["gate"]], [g],
                                      name=f"{scope}/gate_proj/MatMul"))
        nodes.append(helper.make_node("MatMul", [h, names["up"]], [u],
                                      name=f"{scope}/up_proj/MatMul"))
        a = f"{scope}/act/out"
        if act == "silu":  # as exporters write SiLU: x · Sigmoid(x)
            nodes.append(helper.make_node("Sigmoid", [g], [f"{scope}/act/sig"],
                                          name=f"{scope}/act_fn/Sigmoid"))
            nodes.append(helper.make_node("Mul", [g, f"{scope}/act/sig"], [a],
                                          name=f"{scope}/act_fn/Mul"))
        elif act in ("FastGelu", "QuickGelu"):
            nodes.append(helper.make_node(act, [g], [a], name=f"{scope}/act_fn/{act}",
                                          domain="com.microsoft"))
        else:
            nodes.append(helper.make_node(act, [g], [a], name=f"{scope}/act_fn/{act}"))
        m = f"{scope}/mul_out"
        nodes.append(helper.make_node("Mul", [a, u], [m], name=f"{scope}/Mul"))
        d = f"{scope}/down_proj/out"
        nodes.append(helper.make_node("MatMul", [m, names["down"]], [d],
                                      name=f"{scope}/down_proj/MatMul"))
        y = f"/model/layers.{layer}/residual" if layer < layers - 1 else "y"
        nodes.append(helper.make_node("Add", [x, d], [y], name=f"/model/layers.{layer}/Add"))
        x = y
    graph = helper.make_graph(
        nodes, "decoder_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])],
        inits)
    opsets = [helper.make_opsetid("", 17)]
    if act in ("FastGelu", "QuickGelu"):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    return helper.make_model(graph, opset_imports=opsets)


def name(role: str, layer: int = 0) -> str:
    return f"{SCOPE.format(layer)}/{role}_proj/MatMul"


def weight(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    from opstudio.core.passes import _weights as w

    node = next(n for n in model.graph.node if n.name == node_name)
    value, why = w.constant_array(model, node.input[1])
    assert value is not None, why
    return value


def zeroed_weights(channels: np.ndarray, seed: int = 3) -> dict[str, np.ndarray]:
    """Random gate/up/down with the given intermediate channels' weights all zero."""
    rng = np.random.default_rng(seed)
    gate, up = (rng.standard_normal((HIDDEN, INTER)) * 0.2 for _ in range(2))
    down = rng.standard_normal((INTER, HIDDEN)) * 0.2
    gate[:, channels] = 0
    up[:, channels] = 0
    down[channels] = 0
    return {"gate": gate, "up": up, "down": down}


def feeds(seed: int = 5, scale: np.ndarray | None = None) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((2, 7, HIDDEN))
    return {"x": (x * (1 if scale is None else scale)).astype(np.float32)}


ZEROED = np.sort(np.random.default_rng(9).choice(INTER, 16, replace=False))


@pytest.mark.parametrize("act", ["silu", "Relu", "FastGelu", "QuickGelu"])
@pytest.mark.parametrize("selected", ["gate", "up", "down"])
def test_joint_pruning_is_exact_when_the_removed_channels_are_zero(act: str,
                                                                   selected: str) -> None:
    model = swiglu(act, weights=zeroed_weights(ZEROED))
    result = apply_pass(PASS, model, [name(selected)],
                        {"structured": True, "sparsity": 0.25})
    details = result.details[name(selected)]
    assert result.applied == [name(selected)]
    assert details["removed_channels"] == ZEROED.tolist()
    assert (details["channels_before"], details["channels_after"]) == (64, 48)
    assert sorted(details["joint"]) == sorted(name(r) for r in ("gate", "up", "down"))
    out = result.model
    assert weight(out, name("gate")).shape == (HIDDEN, 48)
    assert weight(out, name("up")).shape == (HIDDEN, 48)
    assert weight(out, name("down")).shape == (48, HIDDEN)
    x = feeds()
    np.testing.assert_allclose(run_ort(out, x)[0], run_ort(model, x)[0], rtol=1e-6, atol=1e-6)
    expected = ("pruned 25% of the 64 intermediate channels of layers.0's MLP jointly: "
                "gate_proj, up_proj, down_proj")
    assert details["note"] == expected and expected in result.notes
    dims = {"batch": 1, "sequence": 1}
    before, after = analyze(model, dims), analyze(out, dims)
    # onnx's shape inference stops at contrib ops (FastGelu…): down_proj's shape is unknown then
    roles = ("gate", "up", "down") if act in ("silu", "Relu") else ("gate", "up")
    assert [after.node(name(r)).flops for r in roles] == [HIDDEN * 48 * 2] * len(roles)
    assert [before.node(name(r)).flops for r in roles] == [HIDDEN * 64 * 2] * len(roles)


def test_activation_importance_is_exact_on_zero_channels_too(tmp_path) -> None:
    model = swiglu(weights=zeroed_weights(ZEROED))
    path = tmp_path / "prompt.npz"
    np.savez(path, x=np.stack([feeds(s)["x"] for s in range(3)]))
    result = apply_pass(PASS, model, [name("down")],
                        {"structured": True, "sparsity": 0.25, "importance": "activation",
                         "calibration": str(path), "samples": 3})
    assert result.details[name("down")]["removed_channels"] == ZEROED.tolist()
    assert any("3 calibration sample(s)" in n for n in result.notes)
    x = feeds(11)
    np.testing.assert_allclose(run_ort(result.model, x)[0], run_ort(model, x)[0],
                               rtol=1e-6, atol=1e-6)


def anisotropic() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """Channels 0–15 read only the 4 input features that carry large activations, with small
    weights; channels 16–31 have larger weights on features that are nearly always ~0."""
    rng = np.random.default_rng(1)
    gate, up = (rng.standard_normal((HIDDEN, INTER)) * 0.2 for _ in range(2))
    down = rng.standard_normal((INTER, HIDDEN)) * 0.2
    loud, quiet = np.arange(4), np.arange(4, HIDDEN)
    for w in (gate, up):
        w[np.ix_(quiet, np.arange(16))] = 0
        w[np.ix_(loud, np.arange(16))] *= 0.3
        w[np.ix_(loud, np.arange(16, 32))] = 0
        w[np.ix_(quiet, np.arange(16, 32))] *= 2.0
    scale = np.full(HIDDEN, 0.05)
    scale[loud] = 10.0
    return swiglu(weights={"gate": gate, "up": up, "down": down}), scale, np.arange(16)


def test_magnitude_and_activation_choose_different_channels(tmp_path) -> None:
    model, scale, loud_channels = anisotropic()
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.stack([feeds(s, scale)["x"] for s in range(4)]))
    common = {"structured": True, "sparsity": 0.25}
    by_weight = apply_pass(PASS, model, [name("gate")], common)
    by_activation = apply_pass(PASS, model, [name("gate")],
                               {**common, "importance": "activation",
                                "calibration": str(path), "samples": 4})
    magnitude = set(by_weight.details[name("gate")]["removed_channels"])
    activation = set(by_activation.details[name("gate")]["removed_channels"])
    assert magnitude != activation
    assert magnitude & set(loud_channels)  # weights alone drop channels that carry the signal
    assert not activation & set(loud_channels)
    # and the activation-aware choice keeps the output closer on held-out inputs
    x = feeds(42, scale)
    want = run_ort(model, x)[0]
    err_w = np.linalg.norm(run_ort(by_weight.model, x)[0] - want)
    err_a = np.linalg.norm(run_ort(by_activation.model, x)[0] - want)
    assert err_a < 0.5 * err_w


def test_all_three_selected_prune_once_and_report_the_members() -> None:
    model = swiglu(layers=2)
    chosen = [name(r, layer) for layer in (0, 1) for r in ("down", "gate", "up")]
    result = apply_pass(PASS, model, chosen, {"structured": True, "sparsity": 0.5})
    assert result.applied == chosen and not result.skipped
    for layer in (0, 1):
        leader = result.details[name("down", layer)]
        assert (leader["channels_before"], leader["channels_after"]) == (64, 32)  # once
        for role in ("gate", "up"):
            assert result.details[name(role, layer)]["joint_with"] == name("down", layer)
        assert weight(result.model, name("gate", layer)).shape == (HIDDEN, 32)
    assert [n for n in result.notes if "jointly" in n] == [
        f"pruned 50% of the 64 intermediate channels of layers.{k}'s MLP jointly: "
        "gate_proj, up_proj, down_proj" for k in (0, 1)]
    # the fp32 originals are gone: only the pruned weights remain
    assert len(result.model.graph.initializer) == len(model.graph.initializer)


def test_fp16_weights_behind_cast() -> None:
    model = swiglu(fp16=True, weights=zeroed_weights(ZEROED))
    result = apply_pass(PASS, model, [name("up")], {"structured": True, "sparsity": 0.25})
    assert result.details[name("up")]["removed_channels"] == ZEROED.tolist()
    inits = {i.name: i for i in result.model.graph.initializer}
    assert not any(n.endswith("_fp16") and "mlp" in n for n in inits)  # nothing reads them
    # stored as they were: float16, cast to float32 by a new Cast each
    halves = sorted(tuple(i.dims) for i in inits.values() if i.data_type == TensorProto.FLOAT16)
    assert halves == sorted([(HIDDEN, 48), (HIDDEN, 48), (48, HIDDEN)])
    casts = [n for n in result.model.graph.node if n.op_type == "Cast"]
    assert len(casts) == 3 and all(inits[c.input[0]].data_type == TensorProto.FLOAT16
                                   for c in casts)
    assert result.model.ByteSize() < 0.85 * model.ByteSize()  # 3/4 of the weights, names aside
    assert "3 pruned weight(s) kept in float16 behind a Cast, as the originals were" \
        in result.notes
    x = feeds()
    np.testing.assert_allclose(run_ort(result.model, x)[0], run_ort(model, x)[0],
                               rtol=1e-5, atol=1e-5)


def plain_mlp() -> onnx.ModelProto:
    """x → fc1 (+bias) → Gelu-free Relu → fc2 → + x: a BERT-style MLP with its residual."""
    rng = np.random.default_rng(4)
    inits = {"W1": rng.standard_normal((HIDDEN, INTER)), "b1": rng.standard_normal(INTER),
             "W2": rng.standard_normal((INTER, HIDDEN))}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="/encoder/mlp/fc1/MatMul"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="/encoder/mlp/fc1/Add"),
             helper.make_node("Relu", ["hb"], ["r"], name="/encoder/mlp/act/Relu"),
             helper.make_node("MatMul", ["r", "W2"], ["o"], name="/encoder/mlp/fc2/MatMul"),
             helper.make_node("Add", ["x", "o"], ["y"], name="/encoder/residual")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, HIDDEN])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("chosen", [["fc1"], ["fc2"], ["fc1", "fc2"], ["fc2", "fc1"]])
def test_plain_mlp(chosen: list[str]) -> None:
    model = plain_mlp()
    nodes = [f"/encoder/mlp/{c}/MatMul" for c in chosen]
    result = apply_pass(PASS, model, nodes, {"structured": True, "sparsity": 0.25})
    assert result.applied == nodes and not result.skipped
    leader = result.details[nodes[0]]
    assert (leader["channels_before"], leader["channels_after"]) == (64, 48)  # pruned once
    assert leader["note"].endswith("of encoder's MLP jointly: fc1, fc2")
    removed = leader["removed_channels"]
    # the same as zeroing those channels' bias and the second layer's rows
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for init in reference.graph.initializer:
        value = numpy_helper.to_array(init).copy()
        if init.name == "W2":
            value[removed] = 0
            init.CopyFrom(numpy_helper.from_array(value, "W2"))
    x = {"x": np.random.default_rng(0).standard_normal((3, HIDDEN)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(result.model, x)[0], run_ort(reference, x)[0],
                               rtol=1e-5, atol=1e-4)
    shapes = sorted(tuple(i.dims) for i in result.model.graph.initializer)
    assert shapes == sorted([(HIDDEN, 48), (48,), (48, HIDDEN)])


def test_check_and_remark_name_the_joint_rewrite() -> None:
    model = swiglu()
    by_name = {n.name: n for n in model.graph.node}
    for role in ("gate", "up", "down"):
        assert PASS.check(model, by_name[name(role)], {"structured": True}) is None
    remark = PASS.remark(model, [by_name[name("down")]])
    assert remark == ("structured: prunes layers.0's MLP jointly (gate_proj, up_proj, "
                      "down_proj): the same intermediate channels leave all of them, because "
                      "the outputs of gate_proj and up_proj meet channel by channel in "
                      "'/model/layers.0/mlp/Mul' before down_proj")
    # several projections of one MLP are described once
    assert PASS.remark(model, [by_name[name(r)] for r in ("gate", "up", "down")]) == remark
    assert PASS.remark(model, [by_name["/model/layers.0/Add"]]) is None


def test_joint_refusals_say_why() -> None:
    model = swiglu()
    # up_proj's output also leaves the graph: the MLP cannot shrink
    model.graph.output.append(helper.make_tensor_value_info(
        f"{SCOPE.format(0)}/up_proj/out", TensorProto.FLOAT, None))
    result = PASS.apply(model, [name("gate"), name("down")],
                        PASS.validate_params({"structured": True}), PassContext())
    assert result.applied == []
    assert "reach the graph output '/model/layers.0/mlp/up_proj/out'" in result.skipped[name("gate")]
    assert "jointly with its MLP" in result.skipped[name("down")]
    assert "graph output" in result.skipped[name("down")]
    # a gate weight read twice: slicing it would need a copy
    shared = swiglu()
    up = next(n for n in shared.graph.node if n.name == name("up"))
    up.input[1] = "model.layers.0.mlp.gate_proj.weight"
    reason = PASS.check(shared, up, {"structured": True})
    assert "shared with" in reason


def test_activation_importance_skips_convs_with_the_reason() -> None:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), k)
             for k, s in (("W1", (8, 3, 3, 3)), ("W2", (4, 8, 1, 1)))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W1"], ["c"], name="conv1"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "W2"], ["y"], name="conv2")], "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = apply_pass(PASS, model, ["conv1"], {"structured": True,
                                                  "importance": "activation"})
    assert "importance 'activation' handles channels from MatMul/Gemm" in result.skipped["conv1"]
    validity.check_model(result.model)
