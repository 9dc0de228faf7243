"""Every registered technique keeps the pass contract, checked the same way for each.

The contract (``passes/base.py``): a pass leaves its input alone, returns a model onnxruntime
loads, gives every node it creates the original node it came from, is deterministic, and
declares what the rest of opstudio needs to know about it (plan order, scan, explanation,
colour) so a new technique is its module plus one registry line.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from model_builders import apply_pass, run_ort, small_mlp
from opstudio.core import provenance
from opstudio.core.passes import TECHNIQUES, PassContext, default_scan, get_pass, plan_rank

# params that make each technique rewrite small_mlp's two MatMuls
PARAMS = {
    "lowrank": {"rank": 16},
    "prune": {"sparsity": 0.5},
    "int8-dynamic": {},
    "int8-static": {"samples": 2},
    "int4-weight": {"accuracy_level": 1},
    "int8-weight": {"accuracy_level": 4},
    "fp16": {},
}


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
    model = small_mlp()
    p = get_pass(technique)
    first = apply_pass(p, model, ["fc1", "fc2"], PARAMS[technique])  # input intact, result valid
    assert sorted(first.applied) == ["fc1", "fc2"], first.skipped
    old = {n.name for n in model.graph.node}
    for node in first.model.graph.node:
        if node.name not in old:
            assert provenance.get_origin(node), f"{node.name} ({node.op_type}) has no origin"
    second = p.apply(model, ["fc1", "fc2"], p.validate_params(PARAMS[technique]), PassContext())
    assert first.model.SerializeToString() == second.model.SerializeToString()
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    (y,) = run_ort(first.model, {"x": x})
    assert y.shape == (3, 32) and np.isfinite(y).all()
