"""Optimization passes, one technique per module. ``get_pass(name)`` / ``all_passes()``."""

from __future__ import annotations

import importlib

from opstudio.core.errors import OpstudioError

# the helpers of passes/ the rest of opstudio uses: callers outside passes/ import them from here
from opstudio.core.passes._calibration import model_inputs
from opstudio.core.passes._ort_support import constant_value
from opstudio.core.passes.base import (
    ContractBroken,
    ParamSpec,
    Pass,
    PassContext,
    PassResult,
    RewriterFailed,
    ScanParams,
)

# technique name -> module defining a module-level ``PASS`` instance
_MODULES = {
    "lowrank": "opstudio.core.passes.lowrank",
    "prune": "opstudio.core.passes.prune",
    "int8-dynamic": "opstudio.core.passes.quantize_int8",
    "int8-static": "opstudio.core.passes.quantize_int8",
    "int4-weight": "opstudio.core.passes.quantize_int4",
    "int8-weight": "opstudio.core.passes.quantize_int8_weight",
    "fp16": "opstudio.core.passes.fp16",
    "fuse": "opstudio.core.passes.fuse",
    "kv-cache": "opstudio.core.passes.kv_cache",
}

TECHNIQUES = tuple(_MODULES)


def get_pass(technique: str) -> Pass:
    module_name = _MODULES.get(technique)
    if module_name is None:
        raise OpstudioError(
            f"unknown technique {technique!r}; expected one of {', '.join(TECHNIQUES)}")
    module = importlib.import_module(module_name)
    passes = getattr(module, "PASSES", None) or {module.PASS.technique: module.PASS}
    return passes[technique]


def all_passes() -> list[Pass]:
    return [get_pass(t) for t in TECHNIQUES]


def plan_rank(technique: str) -> int:
    """Where a step of ``technique`` goes in a plan (see ``Pass.plan_order``)."""
    return get_pass(technique).plan_order


def default_scan() -> dict[str, ScanParams]:
    """Technique -> the params the advisor's scan tries by default."""
    return {p.technique: p.scan_params for p in all_passes() if p.scan_params is not None}


__all__ = ["TECHNIQUES", "ContractBroken", "ParamSpec", "Pass", "PassContext", "PassResult",
           "RewriterFailed", "ScanParams",
           "all_passes", "constant_value", "default_scan", "get_pass", "model_inputs",
           "plan_rank"]
