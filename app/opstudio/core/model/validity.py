"""Is a rewritten model valid? As onnxruntime sees it.

A result is valid when onnxruntime loads it and onnx's checker (with shape inference) passes for the
ops onnx knows. Exporters write ops onnx has never heard of: onnxruntime's contrib ops
(``com.microsoft``), and ops that onnxruntime-genai's builder puts in the *default* domain
(``SimplifiedLayerNormalization``). onnx's checker refuses the latter ("No Op registered for …"),
onnxruntime runs them: they are never a reason to refuse a model.

The checker runs on a skeleton of the model: the same nodes, with every initializer declared as a
typed graph input instead of carrying its data, and without the recorded intermediate shapes. It sees the whole structure and infers every shape
without a second copy of gigabytes of weights; the data itself is onnxruntime's to check when it
loads the model. What the skeleton hides, the rules on initializers themselves (unique names,
and before IR version 4 each one declared as a graph input too, a rule onnxruntime does not
enforce), is checked on the real graph by name. Nodes of the default domain that onnx does not register are moved to a private
domain in the skeleton, so the checker skips them as it skips ``com.microsoft`` nodes.
"""

from __future__ import annotations

import onnx
from onnx import helper

from opstudio.core.errors import OpstudioError
from opstudio.core.model.model_io import without_initializers
from opstudio.core.model.runtime import create_session, session_options

_ONNX_DOMAINS = ("", "ai.onnx")
# where the skeleton puts default-domain ops onnx does not know (onnxruntime's, by exporters)
_FOREIGN_DOMAIN = "opstudio.unregistered"


class InvalidModel(OpstudioError):
    """The model breaks onnx's rules or onnxruntime cannot load it."""


def check_model(model: onnx.ModelProto) -> None:
    """Raise :class:`InvalidModel` with onnx's or onnxruntime's first line if ``model`` is not valid."""
    check_structure(model)
    check_loads(model)


def unregistered_ops(model: onnx.ModelProto) -> set[str]:
    """Op types of the default domain that onnx's checker does not know (in any subgraph too)."""
    version = _onnx_opset(model)
    found: set[str] = set()
    for node in _all_nodes(model.graph):
        if node.domain in _ONNX_DOMAINS and not _onnx_knows(node.op_type, version):
            found.add(node.op_type)
    return found


def check_structure(model: onnx.ModelProto) -> None:
    """onnx's rules for initializers on the real graph, then onnx's full check (with
    strict-enough shape inference) of the model's skeleton."""
    problem = initializer_problem(model)
    if problem:
        raise InvalidModel(f"not a valid ONNX model ({problem})")
    skeleton = _skeleton(model)
    try:
        onnx.checker.check_model(skeleton, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise InvalidModel(f"not a valid ONNX model ({first_line(exc)})") from exc


def initializer_problem(model: onnx.ModelProto) -> str | None:
    """What onnx's checker would say of the top-level initializers, from their names alone.

    The skeleton declares every initializer as a graph input, which would hide these rules:
    names must be unique and non-empty, and before IR version 4 every initializer must also be
    a graph input (onnxruntime loads such a file all the same; other runtimes and onnx's
    checker do not)."""
    graph = model.graph
    declared = {v.name for v in graph.input}
    seen: set[str] = set()
    for init in graph.initializer:
        if not init.name:
            return "an initializer has no name"
        if init.name in seen:
            return f"{init.name} initializer name is not unique"
        seen.add(init.name)
        if model.ir_version < 4 and init.name not in declared:
            return (f"{init.name} in initializer but not in graph input: IR version "
                    f"{model.ir_version} requires every initializer to be a graph input")
    return None


def check_loads(model: onnx.ModelProto) -> None:
    """onnxruntime (CPU) creates a session for ``model``: every op is registered, types agree.

    A big model is written with its weights as external data in opstudio's temp folder and
    loaded from there: onnxruntime then maps the weights from the file instead of holding a
    serialized copy and its own copy of them beside the model.
    """
    # loading is the question, not speed: prepacked copies of the weights cost seconds and
    # memory the size of the weights, and graph optimizations fold the Casts around an fp16
    # model's MatMuls into fp32 copies of every weight (GiBs on an LLM). Every kernel is still
    # resolved with optimizations off.
    options = session_options(threads=1, prepacking=False, opt_level="disable")
    try:
        create_session(model, options)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InvalidModel(f"not loadable by onnxruntime ({first_line(exc)})") from exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its initializers as typed graph inputs and the default-domain ops onnx does
    not know moved to a private domain; built field by field so no weight data is copied."""
    out = without_initializers(model)
    graph, src = out.graph, model.graph
    # Recorded intermediate shapes are the exporter's notes, sometimes wrong (onnxruntime-genai
    # annotates a [1] constant as a scalar) and ignored by onnxruntime: shapes are inferred anew.
    graph.ClearField("value_info")
    declared = {i.name for i in src.input}
    for init in src.initializer:
        if init.name not in declared:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type,
                                                             list(init.dims)))
    unknown = unregistered_ops(model)
    if unknown:
        for node in _all_nodes(graph):
            if node.domain in _ONNX_DOMAINS and node.op_type in unknown:
                node.domain = _FOREIGN_DOMAIN
        out.opset_import.append(helper.make_opsetid(_FOREIGN_DOMAIN, 1))
    return out


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else list(attr.graphs)):
                yield from _all_nodes(sub)


def _onnx_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in _ONNX_DOMAINS),
                onnx.defs.onnx_opset_version())


def _onnx_knows(op_type: str, version: int) -> bool:
    try:
        onnx.defs.get_schema(op_type, version, "")
    except onnx.defs.SchemaError:
        return False
    return True
