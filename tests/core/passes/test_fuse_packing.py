"""fuse packs a fused attention's q|k|v projections and a SiLU MLP's gate|up projections into
one MatMul each, with the same outputs, before and after a weight-only quantizer."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from llm_builders import llama_decoder, llama_inputs
from model_builders import apply_pass, run_ort
from opstudio.core.model import provenance
from opstudio.core.passes import get_pass
from opstudio.core.plan.optimize import optimize
from opstudio.core.plan.recipe import Recipe, Step

FUSE = get_pass("fuse")
A = "/model/layers.0/self_attn"


def _close(before, after, feeds, tol=1e-4):
    for a, b in zip(run_ort(before, feeds), run_ort(after, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)


def _by_name(model):
    return {n.name: n for n in model.graph.node}


@pytest.mark.parametrize("bias", [False, True])
def test_qkv_and_gate_up_are_packed_with_the_same_outputs(bias):
    model = llama_decoder(layers=2, bias=bias)
    result = apply_pass(FUSE, model, [n.name for n in model.graph.node], {})
    assert "2 packed q|k|v" in result.notes[0] and "2 packed gate|up" in result.notes[0]
    ops = Counter(n.op_type for n in result.model.graph.node)
    # a layer: packed q|k|v, o, packed gate|up, down; and lm_head
    assert ops["MatMul"] == 9 and ops["Split"] == 2
    nodes = _by_name(result.model)
    qkv = nodes[f"{A}/qkv_proj/MatMul"]
    (gqa,) = [n for n in result.model.graph.node
              if n.op_type == "GroupQueryAttention" and "layers.0/" in n.name]
    reads = nodes[f"{A}/qkv_proj/Add"].output[0] if bias else qkv.output[0]
    assert list(gqa.input[:3]) == [reads, "", ""]  # packed QKV; key and value empty
    # the packed weight is stored as the projections were: fp16 behind one Cast
    weights = {t.name: t for t in result.model.graph.initializer}
    cast = next(n for n in result.model.graph.node if n.output[0] == qkv.input[1])
    assert cast.op_type == "Cast" and weights[cast.input[0]].data_type == onnx.TensorProto.FLOAT16
    assert list(weights[cast.input[0]].dims) == [64, 64 + 32 + 32]
    assert not [name for name in weights if "q_proj.weight" in name and "qkv" not in name]
    for feeds in (llama_inputs(seq=1, past=9, seed=2), llama_inputs(seq=5, past=0, seed=3)):
        _close(model, result.model, feeds)


def test_each_packed_node_stands_for_the_projections_it_replaced():
    model = llama_decoder(layers=1, bias=True)
    result = apply_pass(FUSE, model, [f"{A}/q_proj/MatMul"], {})
    nodes = _by_name(result.model)
    assert provenance.get_origin(nodes[f"{A}/qkv_proj/MatMul"]) == [
        f"{A}/q_proj/MatMul", f"{A}/k_proj/MatMul", f"{A}/v_proj/MatMul"]
    assert provenance.get_origin(nodes[f"{A}/qkv_proj/Add"]) == [
        f"{A}/q_proj/Add", f"{A}/k_proj/Add", f"{A}/v_proj/Add"]
    (gqa,) = [n for n in result.model.graph.node if n.op_type == "GroupQueryAttention"]
    assert f"{A}/Softmax" in provenance.get_origin(gqa)
    assert f"{A}/q_proj/MatMul" not in provenance.get_origin(gqa)
    # naming a projection fused its layer's attention with it, and nothing of the MLP
    assert "/model/layers.0/mlp/gate_proj/MatMul" in nodes
    derived = provenance.derived_nodes(result.model)
    assert derived[f"{A}/k_proj/MatMul"] == [f"{A}/qkv_proj/MatMul"]
    # the packed weight's one Cast stands for the projections' weight Casts
    (cast,) = derived["model.layers.0.self_attn.v_proj.weight_cast"]
    assert nodes[f"{A}/qkv_proj/MatMul"].input[1] == nodes[cast].output[0]
    # a gate names its MLP's unit only
    mlp = "/model/layers.0/mlp"
    packed = apply_pass(FUSE, model, [f"{mlp}/act_fn/Sigmoid"], {})
    gate_up = _by_name(packed.model)[f"{mlp}/gate_up_proj/MatMul"]
    assert provenance.get_origin(gate_up) == [f"{mlp}/gate_proj/MatMul", f"{mlp}/up_proj/MatMul"]
    (sigmoid,) = [n for n in packed.model.graph.node if n.op_type == "Sigmoid"]
    assert set(provenance.get_origin(sigmoid)) == {f"{mlp}/act_fn/Sigmoid", f"{mlp}/act_fn/Mul"}
    assert not [n for n in packed.model.graph.node if n.op_type == "GroupQueryAttention"]
    _close(model, packed.model, llama_inputs(layers=1))


def test_int4_of_the_packed_weights_is_the_int4_of_each_projection():
    # blocks run along K, so a column quantizes the same packed or apart: packed and unpacked
    # INT4 models give the same outputs up to float rounding
    model = llama_decoder(layers=1)
    int4 = Step("int4-weight", {"accuracy_level": 4}, op_types=["MatMul"])
    fuse = Step("fuse", {}, op_types=["Pow", "Softmax", "Sigmoid"])
    apart = Step("fuse", {"pack": False}, op_types=["Pow", "Softmax"])
    packed = optimize(model, Recipe([fuse, int4])).model
    unpacked = optimize(model, Recipe([apart, int4])).model
    ops = Counter(n.op_type for n in packed.graph.node)
    assert ops["MatMulNBits"] == 5 and ops["MatMul"] == 0  # qkv, o, gate|up, down, lm_head
    feeds = llama_inputs(seq=3, past=5, layers=1)
    _close(unpacked, packed, feeds, tol=2e-4)


def test_without_pack_the_projections_stay_apart():
    model = llama_decoder(layers=1)
    result = apply_pass(FUSE, model, [n.name for n in model.graph.node], {"pack": False})
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert ops["MatMul"] == 8 and "Split" not in ops  # q, k, v, o, gate, up, down, lm_head


def test_a_step_naming_packed_projections_reports_no_split_as_skipped():
    # the Split after a packed gate|up stands for gate and up too; the step that rewrites the
    # MatMul beside it rewrote them
    model = llama_decoder(layers=1)
    mlp = "/model/layers.0/mlp"
    fuse = Step("fuse", {}, op_types=["Pow", "Softmax", "Sigmoid"])
    int8 = Step("int8-weight", {"accuracy_level": 4},
                nodes=[f"{mlp}/gate_proj/MatMul", f"{mlp}/up_proj/MatMul"])
    result = optimize(model, Recipe([fuse, int8]))
    report = result.steps[1]
    assert report.applied == [f"{mlp}/gate_up_proj/MatMul"]
    assert report.skipped == {}
