"""Planning and applying optimizations: recipes, ``optimize``, optimize & compare, the
advisors, reports, deploy folders and Olive workflows. Imports the passes, measuring and model
layers.

The names below are the layer's public API; its modules stay importable for tests and for
monkeypatching."""

from __future__ import annotations

from opstudio.core.plan.advisor import Advice, advise
from opstudio.core.plan.budget import CONFIDENCE, Budget
from opstudio.core.plan.deploy import (
    FolderExport,
    check_loads,
    check_target,
    runtime_kind,
    wants_folder,
    write_folder,
)
from opstudio.core.plan.llm import LLM_TECHNIQUES, LlmAdvice, advise_llm, variants_for
from opstudio.core.plan.olive import olive_workflow
from opstudio.core.plan.optimize import OptimizeResult, optimize
from opstudio.core.plan.optimize_compare import optimize_and_compare
from opstudio.core.plan.recipe import Recipe, Step
from opstudio.core.plan.report import json_default
from opstudio.core.plan.sensitivity import DEFAULT_TECHNIQUES

__all__ = [
    "CONFIDENCE",
    "DEFAULT_TECHNIQUES",
    "LLM_TECHNIQUES",
    "Advice",
    "Budget",
    "FolderExport",
    "LlmAdvice",
    "OptimizeResult",
    "Recipe",
    "Step",
    "advise",
    "advise_llm",
    "check_loads",
    "check_target",
    "json_default",
    "olive_workflow",
    "optimize",
    "optimize_and_compare",
    "runtime_kind",
    "variants_for",
    "wants_folder",
    "write_folder",
]
