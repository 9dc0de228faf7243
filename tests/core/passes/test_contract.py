"""Every registered technique keeps the pass contract, checked the same way for each.

The contract (``passes/base.py``): ``Pass.apply`` validates the params, takes the working copy,
partitions the nodes with ``check`` (which sees the params) and calls the technique's
``_rewrite``, then refuses a result that mutated its input, left a created node without its
original node, or is not valid. The result is deterministic, the same whether the pass rewrote
a copy or a model handed over to it, and the pass declares what the rest of opstudio needs to
know about it (plan order, scan, explanation, colour) so a new technique is its module plus one
registry line.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import helper

from llm_builders import kv_decoder, llama_decoder, llama_inputs, prompt_inputs
from model_builders import apply_pass, run_ort, small_mlp
from opstudio.core.errors import OpstudioError
from opstudio.core.model import provenance
from opstudio.core.model.graph_utils import copy_model
from opstudio.core.model.model_io import is_lazy, load_model, save_model
from opstudio.core.model.runtime import create_session
from opstudio.core.passes import (
    TECHNIQUES,
    ContractBroken,
    Pass,
    PassContext,
    PassResult,
    default_scan,
    get_pass,
    plan_rank,
)
from opstudio.core.plan.optimize import optimize
from opstudio.core.plan.recipe import Recipe, Step

# params that make each technique rewrite small_mlp's two MatMuls
PARAMS = {
    "lowrank": {"rank": 16},
    "prune": {"sparsity": 0.5},
    "int8-dynamic": {},
    "int8-static": {"samples": 2},
    "int4-weight": {"accuracy_level": 1},
    "int8-weight": {"accuracy_level": 4},
    "fp16": {},
    "fuse": {},
    "kv-cache": {"samples": 1},
}


def _case(technique):
    """The model each technique is run on, the nodes it must rewrite, a feed and the first
    output's shape: small_mlp's two MatMuls, or for fuse a decoder's first norm, the rotary
    embedding of its queries (its attention, packed) and its SiLU gate (packed)."""
    if technique == "kv-cache":
        model = kv_decoder("gqa", layers=1)
        nodes = [n.name for n in model.graph.node if n.op_type == "GroupQueryAttention"]
        feeds = {**prompt_inputs(4), **{f"past_key_values.0.{kind}": np.zeros((1, 2, 0, 16),
                                                                             np.int8)
                                        for kind in ("key", "value")}}
        return model, nodes, feeds, (1, 4, 64)
    if technique == "fuse":
        nodes = ["/model/layers.0/input_layernorm/Pow", "/model/layers.0/self_attn/q_rot/Neg",
                 "/model/layers.0/mlp/act_fn/Sigmoid"]
        return llama_decoder(layers=1), nodes, llama_inputs(layers=1), (1, 4, 64)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    return small_mlp(), ["fc1", "fc2"], {"x": x}, (3, 32)


def test_every_technique_is_covered_here():
    assert set(PARAMS) == set(TECHNIQUES)


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_declares_what_the_rest_of_opstudio_needs(technique):
    p = get_pass(technique)
    assert p.technique == technique and p.label and p.description
    assert re.fullmatch(r"#[0-9a-f]{6}", p.colour)
    assert p.helps_when in ("memory", "compute")
    assert p.because
    assert isinstance(plan_rank(technique), int)
    if p.scan_params is not None:
        variants = p.scan_params if isinstance(p.scan_params, (list, tuple)) else [p.scan_params]
        for variant in variants:
            p.validate_params(variant)
    assert set(default_scan()) <= set(TECHNIQUES)


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_keeps_the_contract_on_a_small_mlp(technique):
    model, nodes, feeds, shape = _case(technique)
    p = get_pass(technique)
    first = apply_pass(p, model, nodes, PARAMS[technique])  # input intact, result valid
    assert sorted(first.applied) == sorted(nodes), first.skipped
    old = {n.name for n in model.graph.node}
    created = [n for n in first.model.graph.node if n.name not in old]
    # prune rewrites weights, kv-cache the attention's attributes and cache types, not nodes
    assert created or technique in ("prune", "kv-cache")
    for node in created:
        recorded = [p.value for p in node.metadata_props if p.key == provenance.ORIGIN_KEY]
        assert recorded and set(recorded[0].split(",")) <= old, f"{node.name} ({node.op_type})"
    second = p.apply(model, nodes, p.validate_params(PARAMS[technique]), PassContext())
    assert first.model.SerializeToString() == second.model.SerializeToString()
    # the optimizer hands its own model over: rewritten in place, the same bytes
    owned = copy_model(model)
    third = p.apply(owned, nodes, PARAMS[technique], PassContext(owns_model=True))
    assert third.model.SerializeToString() == first.model.SerializeToString()
    y = run_ort(first.model, feeds)[0]
    assert y.shape == shape and np.isfinite(y).all()


LAZY = [t for t in TECHNIQUES if get_pass(t).reads_lazy(get_pass(t).validate_params(PARAMS[t]))]


def test_the_passes_that_rewrite_one_weight_at_a_time_read_weights_from_their_files():
    assert set(LAZY) == {"int4-weight", "int8-weight", "int8-dynamic", "fp16", "lowrank",
                         "prune"}


@pytest.mark.parametrize("technique", LAZY)
def test_keeps_the_contract_on_a_model_whose_weights_stay_in_their_files(technique, tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save_model(small_mlp(), str(source), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    model = load_model(source, lazy=True)
    p = get_pass(technique)
    params = p.validate_params(PARAMS[technique])
    # apply checks that the input is intact and the result valid (onnxruntime loads it)
    first = apply_pass(p, model, ["fc1", "fc2"], params)
    assert sorted(first.applied) == ["fc1", "fc2"], first.skipped
    assert is_lazy(first.model)  # the quantized weights are in a file, not in the model
    for node in first.model.graph.node:
        if node.name not in {"fc1", "fc2", "act"}:
            assert provenance.get_origin(node), node.name
    owned = load_model(source, lazy=True)
    second = p.apply(owned, ["fc1", "fc2"], params, PassContext(owns_model=True))
    # deterministic: the same files, whether the pass rewrote a copy or the model handed over
    written = []
    for k, result in enumerate((first, second)):
        (tmp_path / str(k)).mkdir()
        out = save_model(result.model, tmp_path / str(k) / "out.onnx")
        written.append((out.read_bytes(), (out.parent / "out.onnx.data").read_bytes()))
        x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
        (y,) = create_session(out).run(None, {"x": x})
        assert y.shape == (3, 32) and np.isfinite(y).all()
    assert written[0] == written[1]


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_what_check_refuses_apply_skips_with_the_same_reason(technique):
    model, nodes, _, _ = _case(technique)
    p = get_pass(technique)
    params = p.validate_params(PARAMS[technique])
    names = [n.name for n in model.graph.node]
    result = p.apply(model, [*names, nodes[0], "nope"], params, PassContext())
    assert result.skipped["nope"] == "no such node"
    for node in model.graph.node:
        reason = p.check(model, node, params)
        if reason is not None:
            assert result.skipped[node.name] == reason
        else:
            assert node.name in result.applied, result.skipped.get(node.name)
    assert result.applied.count(nodes[0]) == 1  # a node asked for twice is rewritten once


def test_check_sees_the_params():
    model = small_mlp()  # fc1: K = 64, fc2: K = 128
    fc1, fc2 = model.graph.node[0], model.graph.node[2]
    int4 = get_pass("int4-weight")
    assert int4.check(model, fc1) is None  # block size 32 by default
    assert int4.check(model, fc1, {"block_size": 128}) == "K=64 is smaller than the block size 128"
    assert int4.check(model, fc2, {"block_size": 128}) is None
    assert int4.check_any(model, fc1, [{"block_size": 128}, {"block_size": 64}]) is None
    assert "block size 128" in int4.check_any(model, fc1, [{"block_size": 128}])
    # prune: a lone projection's output channels are the model's output, they cannot go
    prune = get_pass("prune")
    lone = small_mlp()
    del lone.graph.node[1:]
    lone.graph.output[0].name = "h"
    assert prune.check(lone, lone.graph.node[0], {"structured": False}) is None
    assert "output" in prune.check(lone, lone.graph.node[0], {"structured": True})
    opset10 = small_mlp()
    opset10.opset_import[0].version = 10
    assert "opset 11" in prune.check(opset10, opset10.graph.node[0], {"storage": "sparse"})


def test_a_recipe_is_checked_with_its_params():
    step = Step("int4-weight", {"block_size": 128}, nodes=["fc1"])
    with pytest.raises(OpstudioError, match=r"node 'fc1' \(MatMul\) cannot take int4-weight: "
                                            "K=64 is smaller than the block size 128"):
        optimize(small_mlp(), Recipe([step]))


class Tagged(Pass):
    """A minimal technique: an Identity after each chosen MatMul."""

    technique = "tagged"
    record_origin = True

    def check(self, model, node, params=None):
        return None if node.op_type == "MatMul" else "only MatMul"

    def _rewrite(self, work, chosen, params, ctx):
        nodes = []
        for node in work.graph.node:
            nodes.append(node)
            if node.name in chosen:
                out = node.output[0]
                node.output[0] = f"{out}_pre"
                tag = helper.make_node("Identity", [f"{out}_pre"], [out], name=f"{node.name}_tag")
                if self.record_origin:
                    provenance.set_origin(tag, provenance.get_origin(node))
                nodes.append(tag)
        del work.graph.node[:]
        work.graph.node.extend(nodes)
        return PassResult(model=work, applied=list(chosen))


def test_a_pass_writes_only_its_rewrite():
    result = Tagged().apply(small_mlp(), ["fc1", "act"], {}, PassContext())
    assert result.applied == ["fc1"] and result.skipped == {"act": "only MatMul"}
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Identity", "Relu",
                                                             "MatMul"]
    with pytest.raises(TypeError, match="implements _rewrite"):
        type("Overriding", (Pass,), {"apply": lambda self, *a: None})


def test_a_created_node_without_its_origin_is_refused():
    forgetful = Tagged()
    forgetful.record_origin = False
    with pytest.raises(ContractBroken, match=r"created node 'fc1_tag' \(Identity\) records no "
                                             "original node"):
        forgetful.apply(small_mlp(), ["fc1"], {}, PassContext())


class Meddling(Tagged):
    """Rewrites the model it was given as well as its copy: a node or a weight in place."""

    victim: onnx.ModelProto | None = None
    where = "node"

    def _rewrite(self, work, chosen, params, ctx):
        assert self.victim is not None
        if self.where == "node":
            self.victim.graph.node[1].doc_string = "touched"
        else:
            weight = self.victim.graph.initializer[0]
            weight.raw_data = weight.raw_data[::-1]
        return super()._rewrite(work, chosen, params, ctx)


@pytest.mark.parametrize("where", ["node", "weight"])
def test_a_mutated_input_is_refused_unless_handed_over(where):
    p = Meddling()
    p.where = where
    p.victim = small_mlp()
    with pytest.raises(ContractBroken, match="changed the model it was given"):
        p.apply(p.victim, ["fc1"], {}, PassContext())
    p.victim = small_mlp()
    assert p.apply(p.victim, ["fc1"], {}, PassContext(owns_model=True)).applied == ["fc1"]


class Dangling(Tagged):
    technique = "dangling"

    def _rewrite(self, work, chosen, params, ctx):
        result = super()._rewrite(work, chosen, params, ctx)
        result.model.graph.node[0].input[0] = "nowhere"
        return result


def test_an_invalid_result_is_refused_unless_the_caller_checks_it():
    with pytest.raises(ContractBroken, match="dangling: the result is not a valid ONNX model"):
        Dangling().apply(small_mlp(), ["fc1"], {}, PassContext())
    # the optimizer checks each step's result itself (and names the step): not twice
    result = Dangling().apply(small_mlp(), ["fc1"], {}, PassContext(check_validity=False))
    assert result.model.graph.node[0].input[0] == "nowhere"
