"""A plan as a Microsoft Olive workflow, for teams whose pipeline runs Olive.

Olive's ONNX passes take node lists, so the quantization steps of a plan carry over with the
nodes opstudio chose (the step's selection on the original model, less the nodes its technique
cannot take, as ``optimize`` resolves it):

- ``int4-weight`` / ``int8-weight`` with round-to-nearest → ``OnnxBlockWiseRtnQuantization``
  (``bits``, ``block_size``, ``is_symmetric``, ``accuracy_level``, ``nodes_to_include``);
- ``int8-dynamic`` → ``OnnxDynamicQuantization`` (``nodes_to_quantize``, ``per_channel``);
- ``fp16`` → ``OnnxFloatToFloat16`` (``node_include_list``, the graph's inputs and outputs kept
  float32 as opstudio keeps them).

What Olive has no ONNX pass for (low-rank factorization, pruning), what needs more than a node
list (``int8-static``'s calibration data, the GPTQ/HQQ/AWQ/k-quant rounding of ``int4-weight``)
is not written as a pass: each such step is listed, with the reason, under the input model's
``model_attributes`` as ``opstudio_not_exported`` (Olive refuses fields it does not know, and
keeps a model's attributes as given) and in what the caller prints. A step that names nodes a dropped step rewrote is applied by Olive to the original
nodes, and says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.plan.recipe import Recipe, Step, known_as, named_later

OLIVE_VERSION = "0.13"
NOT_EXPORTED_KEY = "opstudio_not_exported"
_REASONS = {
    "lowrank": "Olive has no ONNX pass for low-rank factorization",
    "prune": "Olive has no ONNX pass for pruning",
    "int8-static": "Olive's OnnxStaticQuantization needs a data_config of calibration data, "
                   "which a node list cannot carry",
}
_REWRITES = {"lowrank", "prune"}  # steps that replace the nodes they take


@dataclass
class OliveExport:
    workflow: dict[str, Any]
    passes: list[tuple[int, str, str, int]] = field(default_factory=list)  # step, technique,
    # Olive pass, nodes
    not_exported: list[tuple[int, str, str]] = field(default_factory=list)  # step, technique, why
    notes: list[str] = field(default_factory=list)


def olive_workflow(recipe: Recipe, model: onnx.ModelProto, model_path: str | Path,
                   output_dir: str | Path) -> OliveExport:
    """The Olive workflow config that reproduces what it can of ``recipe`` on ``model`` (read
    from ``model_path``; its weights are read for the nodes' checks), writing to ``output_dir``."""
    from opstudio.core.passes import get_pass

    path = Path(model_path).absolute()
    passes: dict[str, dict[str, Any]] = {}
    out = OliveExport(workflow={})
    later = named_later(recipe)
    rewritten: set[str] = set()
    for index, step in enumerate(recipe.steps, start=1):
        technique = step.technique
        params = get_pass(technique).validate_params(step.params)
        why = _REASONS.get(technique) or _unsupported_params(technique, params)
        nodes = _chosen(model, step, later[index - 1], params)
        if why is not None:
            out.not_exported.append((index, technique, why))
            if technique in _REWRITES:
                rewritten.update(nodes)
            continue
        taken_from_dropped = sorted(set(nodes) & rewritten)
        if taken_from_dropped:
            out.notes.append(f"step {index} ({technique}) takes {_few(taken_from_dropped)}, "
                             "which a step Olive does not run rewrote: Olive applies it to the "
                             "original node(s)")
        if technique in ("int4-weight", "int8-weight"):
            derived = [n for n in nodes if not _initializer_weight(model, n)]
            if derived:
                out.notes.append(f"step {index} ({technique}): Olive's round-to-nearest pass "
                                 "quantizes only a MatMul whose weight is an initializer, so "
                                 f"{_few(derived)} (a weight computed from constants, which "
                                 "opstudio folds) stay float in Olive's result")
        if not nodes:
            out.notes.append(f"step {index} ({technique}) takes no node of the original model; "
                             "no pass written")
            continue
        olive_pass = _olive_pass(technique, params, nodes)
        passes[f"s{index}_{technique.replace('-', '_')}"] = olive_pass
        out.passes.append((index, technique, olive_pass["type"], len(nodes)))
        if technique in ("int4-weight", "int8-weight") and params.get("accuracy_level") == "auto":
            out.notes.append(f"step {index} ({technique}): accuracy_level 'auto' is measured on "
                             "this machine by opstudio; Olive leaves it unset (set "
                             "accuracy_level in the pass to choose one)")
    if not passes:
        raise OpstudioError("no step of the plan has an Olive ONNX pass: "
                            + "; ".join(f"step {i} ({t}): {w}" for i, t, w in out.not_exported))
    out.workflow = {
        "input_model": {"type": "ONNXModel", "model_path": str(path.parent),
                        "onnx_file_name": path.name,
                        # Olive forbids unknown fields but keeps a model's attributes as given
                        "model_attributes": {NOT_EXPORTED_KEY: [
                            {"step": i, "technique": t, "reason": w}
                            for i, t, w in out.not_exported]}},
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": passes,
        "host": "local_system",
        "target": "local_system",
        "output_dir": str(Path(output_dir).absolute()),
    }
    return out


def _unsupported_params(technique: str, params: Mapping[str, Any]) -> str | None:
    algorithm = params.get("algorithm", "rtn")
    if technique == "int4-weight" and algorithm != "rtn":
        return (f"its '{algorithm}' rounding has no Olive counterpart that takes the same "
                "options; only round-to-nearest (OnnxBlockWiseRtnQuantization) is exported")
    if params.get("calibration") not in (None, "random") and technique != "fp16":
        return "it calibrates on data, which a node list cannot carry"
    return None


def _chosen(model: onnx.ModelProto, step: Step, later: Mapping[str, int],
            params: Mapping[str, Any]) -> list[str]:
    """The original model's nodes the step takes, as ``optimize`` resolves them."""
    from opstudio.core.passes import get_pass

    pass_ = get_pass(step.technique)
    if step.nodes is not None:
        wanted = [n for n in model.graph.node if n.name in step.nodes]
    else:
        wanted = [n for n in model.graph.node if step.selects(n.op_type, known_as(n))
                  and not any(k in later for k in known_as(n))]
    return [n.name for n in wanted if pass_.check(model, n, params) is None]


def _initializer_weight(model: onnx.ModelProto, name: str) -> bool:
    inits = {t.name for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == name)
    slot = 0 if node.op_type == "Gather" else 1
    return len(node.input) > slot and node.input[slot] in inits


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _olive_pass(technique: str, params: Mapping[str, Any], nodes: list[str]) -> dict[str, Any]:
    if technique in ("int4-weight", "int8-weight"):
        level = params.get("accuracy_level", "auto")
        config: dict[str, Any] = {
            "type": "OnnxBlockWiseRtnQuantization",
            "bits": 4 if technique == "int4-weight" else 8,
            "block_size": int(params["block_size"]),
            "is_symmetric": bool(params["symmetric"]),
            "nodes_to_include": nodes,
        }
        if level != "auto":
            config["accuracy_level"] = int(level)
        return config
    if technique == "int8-dynamic":
        # as opstudio calls onnxruntime's quantize_dynamic: int8 weights, constant weights
        # only, float for tensors whose type shape inference cannot give (after contrib ops)
        return {"type": "OnnxDynamicQuantization", "nodes_to_quantize": nodes,
                "precision": "int8", "per_channel": bool(params.get("per_channel", False)),
                "quant_preprocess": False,
                "extra_options": {"MatMulConstBOnly": True,
                                  "DefaultTensorType": onnx.TensorProto.FLOAT}}
    if technique == "fp16":
        return {"type": "OnnxFloatToFloat16", "node_include_list": nodes, "keep_io_types": True}
    raise AssertionError(technique)
