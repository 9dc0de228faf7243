"""The optimization plan: which technique, with which parameters, on which nodes.

A recipe is JSON, shared by the GUI, the CLI and files::

    {"version": 1,
     "steps": [{"nodes": ["mm0", "mm1"], "technique": "lowrank", "params": {"rank": 32}},
               {"op_types": ["MatMul", "Gemm", "Conv"], "technique": "int8-dynamic"},
               {"name_pattern": "*/mlp/*_proj/MatMul", "technique": "int4-weight"}]}

Each step says which nodes it rewrites in one of two ways:

- ``nodes``: names, explicitly. Every name must be in the model, and a named node the technique
  cannot take is an error.
- a selector: ``op_types`` (a list of operator types), ``name_pattern`` (a glob, or a list of
  globs, on node names: ``*`` matches any run of characters including ``/``, ``?`` one
  character, ``[…]`` a set; case-sensitive), or both, in which case a node must match both (one
  of the types *and* one of the patterns). Selected nodes the technique cannot take are
  skipped with the reason. So that one recipe serves many models, op types the model does not
  have are skipped with a note; only a step that selects no node of the model at all is an
  error.

``nodes`` and a selector never go together in one step. Node names are those of the model as
opstudio loads it (``model_io.load_model`` names unnamed nodes ``<OpType>_<index>``) and always
refer to the *original* model: a step that addresses a node an earlier step rewrote acts on the
nodes that came from it, and a name pattern matches a rewritten node by its original name too
(see ``optimize.py``). Steps run in order, each on the result of the previous one, except that
a node some *later* step names explicitly is left to that step by selector steps before it (so
"INT8 on every MatMul, INT4 on ``lm_head``" does what it says).

``load``/``from_json`` check the shape of the file; ``validate`` checks it against a model: every
named node exists, every selector selects at least one node, the technique is known, its
parameters are valid, and each named node can take the technique (for nodes no earlier step
rewrote). A selector is resolved against the model as it is when its step runs, so it may select
op types an earlier step creates (``fuse`` then ``kv-cache`` on ``["GroupQueryAttention"]``);
such a step is checked to select something when it runs. Errors name the step (1-based) and the node: ``step 2 (lowrank): node 'mm9' is not in
the model``.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.fileio import write_text_atomic
from opstudio.core.model import provenance

VERSION = 1
_STEP_KEYS = {"technique", "params", "nodes", "op_types", "name_pattern"}
_RECIPE_KEYS = {"version", "steps"}


@dataclass
class Step:
    technique: str
    params: dict[str, Any] = field(default_factory=dict)
    nodes: list[str] | None = None
    op_types: list[str] | None = None
    name_pattern: list[str] | None = None  # globs on node names; any one may match

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.nodes is not None:
            out["nodes"] = list(self.nodes)
        if self.op_types is not None:
            out["op_types"] = list(self.op_types)
        if self.name_pattern is not None:
            patterns = list(self.name_pattern)
            out["name_pattern"] = patterns[0] if len(patterns) == 1 else patterns
        out["technique"] = self.technique
        out["params"] = dict(self.params)
        return out

    def describe(self, index: int) -> str:
        return f"step {index} ({self.technique})"

    @property
    def is_selector(self) -> bool:
        """Whether the step picks nodes by op type and/or name pattern rather than by name."""
        return self.nodes is None

    def selects(self, op_type: str, names: Iterable[str]) -> bool:
        """Whether a node of ``op_type`` known by ``names`` (its own name and the original
        names it stands for) is one this selector step takes; never true for a ``nodes`` step."""
        if self.nodes is not None:
            return False
        if self.op_types is not None and op_type not in self.op_types:
            return False
        if self.name_pattern is not None:
            return any(fnmatch.fnmatchcase(name, pattern)
                       for name in names for pattern in self.name_pattern)
        return self.op_types is not None

    def describe_target(self) -> str:
        """What the step addresses, in words: ``2 nodes: a, b`` or ``all MatMul named */mlp/*``."""
        if self.nodes is not None:
            shown = ", ".join(self.nodes[:3]) + (f" +{len(self.nodes) - 3}"
                                                 if len(self.nodes) > 3 else "")
            return f"{len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''}: {shown}"
        what = "all " + ", ".join(self.op_types) if self.op_types else "all nodes"
        if self.name_pattern:
            what += " named " + " or ".join(self.name_pattern)
        return what


@dataclass
class Recipe:
    steps: list[Step]
    version: int = VERSION

    @classmethod
    def from_json(cls, data: Any) -> Recipe:
        if not isinstance(data, dict):
            raise OpstudioError(f"recipe: expected a JSON object, not {_kind(data)}")
        unknown = sorted(set(data) - _RECIPE_KEYS)
        if unknown:
            raise OpstudioError(f"recipe: unknown key(s) {', '.join(map(repr, unknown))}; "
                                "expected 'version' and 'steps'")
        if "version" not in data:
            raise OpstudioError("recipe: missing 'version' (this opstudio reads version 1)")
        version = data["version"]
        if isinstance(version, bool) or version != VERSION:
            raise OpstudioError(f"recipe: version {version!r} is not supported "
                                f"(this opstudio reads version {VERSION})")
        steps = data.get("steps")
        if steps is None:
            raise OpstudioError("recipe: missing 'steps'")
        if not isinstance(steps, list):
            raise OpstudioError(f"recipe: 'steps' must be a list, not {_kind(steps)}")
        if not steps:
            raise OpstudioError("recipe: 'steps' is empty; nothing to do")
        return cls(steps=[_step_from_json(i, s) for i, s in enumerate(steps, start=1)],
                   version=VERSION)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "steps": [s.to_json() for s in self.steps]}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recipe:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise OpstudioError(f"{p}: no such recipe file") from None
        except IsADirectoryError:
            raise OpstudioError(f"{p}: is a directory, not a recipe file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise OpstudioError(f"{p}: cannot read ({exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OpstudioError(
                f"{p}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        try:
            return cls.from_json(data)
        except OpstudioError as exc:
            raise OpstudioError(f"{p}: {exc}") from None

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        text = json.dumps(self.to_json(), indent=2) + "\n"
        return write_text_atomic(path, text, overwrite=overwrite)


def _step_from_json(index: int, data: Any) -> Step:
    where = f"step {index}"
    if not isinstance(data, dict):
        raise OpstudioError(f"{where}: expected an object, not {_kind(data)}")
    technique = data.get("technique")
    if technique is not None and isinstance(technique, str):
        where = f"step {index} ({technique})"
    unknown = sorted(set(data) - _STEP_KEYS)
    if unknown:
        raise OpstudioError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                            "expected 'technique', 'params' and 'nodes', or 'op_types' "
                            "and/or 'name_pattern'")
    if technique is None:
        raise OpstudioError(f"{where}: missing 'technique'")
    if not isinstance(technique, str) or not technique:
        raise OpstudioError(f"{where}: 'technique' must be a name, not {technique!r}")
    params = data.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise OpstudioError(f"{where}: 'params' must be an object, not {_kind(params)}")
    has_nodes = "nodes" in data
    selector = [k for k in ("op_types", "name_pattern") if k in data]
    if has_nodes and selector:
        raise OpstudioError(f"{where}: give either 'nodes' or '{selector[0]}', not both")
    if not has_nodes and not selector:
        raise OpstudioError(f"{where}: missing 'nodes', 'op_types' or 'name_pattern' "
                            "(which nodes to rewrite)")
    if has_nodes:
        return Step(technique=technique, params=dict(params),
                    nodes=_name_list(where, "nodes", data["nodes"]))
    op_types = _name_list(where, "op_types", data["op_types"]) if "op_types" in data else None
    patterns = None
    if "name_pattern" in data:
        value = data["name_pattern"]
        patterns = _name_list(where, "name_pattern", [value] if isinstance(value, str) else value,
                              what="a glob or a list of globs")
    return Step(technique=technique, params=dict(params), op_types=op_types,
                name_pattern=patterns)


def _name_list(where: str, key: str, value: Any, what: str = "a list of names") -> list[str]:
    if not isinstance(value, list):
        raise OpstudioError(f"{where}: '{key}' must be {what}, not {_kind(value)}")
    if not value:
        raise OpstudioError(f"{where}: '{key}' is empty")
    seen: set[str] = set()
    for item in value:
        if not isinstance(item, str) or not item:
            raise OpstudioError(f"{where}: '{key}' holds {item!r}; expected non-empty names")
        if item in seen:
            raise OpstudioError(f"{where}: '{key}' lists {item!r} twice")
        seen.add(item)
    return list(value)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def validate(recipe: Recipe, model: onnx.ModelProto) -> set[int]:
    """Check ``recipe`` against ``model``; raise ``OpstudioError`` naming the step and the node.

    Applicability is checked on the original model for the nodes no earlier step has touched;
    the optimizer checks the rest when it reaches them (and writes nothing if one fails). A
    selector that selects nothing in ``model`` but names an op type an earlier step's technique
    creates (``Pass.creates``: ``fuse`` makes GroupQueryAttention, …) is checked when its step
    runs instead; the steps (1-based) left to that check are returned.
    """
    from opstudio.core.passes import get_pass

    by_name = {n.name: n for n in model.graph.node}
    later = named_later(recipe)
    touched: set[str] = set()
    made: set[str] = set()  # op types the steps so far can create
    deferred: set[int] = set()
    for index, step in enumerate(recipe.steps, start=1):
        where = step.describe(index)
        try:
            pass_ = get_pass(step.technique)
        except OpstudioError as exc:
            raise OpstudioError(f"step {index}: {exc}") from None
        try:
            params = pass_.validate_params(step.params)
        except OpstudioError as exc:
            raise OpstudioError(f"{where}: {_strip_prefix(str(exc), step.technique)}") from None
        if step.nodes is not None:
            for name in step.nodes:
                node = by_name.get(name)
                if node is None:
                    raise OpstudioError(f"{where}: node '{name}' is not in the model")
                if name in touched:
                    continue
                reason = pass_.check(model, node, params)
                if reason:
                    raise OpstudioError(f"{where}: node '{name}' ({node.op_type}) cannot take "
                                        f"{step.technique}: {reason}")
            touched.update(step.nodes)
        else:
            selected = [n.name for n in model.graph.node if step.selects(n.op_type, known_as(n))]
            if not selected and made.intersection(step.op_types or ()):
                deferred.add(index)  # an earlier step makes nodes of these types
            elif not selected:
                raise OpstudioError(f"{where}: selects no node: {no_match_reason(step, model)}")
            touched.update(n for n in selected if n not in later[index - 1])
        made.update(pass_.creates)
    return deferred


def named_later(recipe: Recipe) -> list[dict[str, int]]:
    """Per step (0-based list), original node name -> the first later step (1-based) that names
    it explicitly: the nodes a selector step leaves to that later step."""
    out: list[dict[str, int]] = []
    after: dict[str, int] = {}
    for index in range(len(recipe.steps), 0, -1):
        out.append(dict(after))
        for name in recipe.steps[index - 1].nodes or []:
            after[name] = index
    return out[::-1]


def known_as(node: onnx.NodeProto) -> list[str]:
    """The names a name pattern is matched against: the node's own and, for a node a pass
    made, the original nodes it stands for."""
    origins = provenance.get_origin(node)
    return [node.name, *(o for o in origins if o != node.name)]


def no_match_reason(step: Step, model: onnx.ModelProto) -> str:
    """Why a selector step selects nothing in ``model``, in words."""
    present = {n.op_type for n in model.graph.node}
    types = [t for t in step.op_types or [] if t in present]
    if step.op_types is not None and not types:
        missing = f"the model has no {' or '.join(map(repr, step.op_types))} nodes"
        quantized = sorted(present & _QUANTIZED_OPS)
        inside = sorted({t for t in step.op_types if t in _subgraph_op_types(model)})
        if quantized:
            return (f"{missing}: it is quantized already ({', '.join(quantized)}); optimize the "
                    "float model it was made from")
        if inside:
            return (f"{missing} outside If/Loop/Scan bodies ({', '.join(inside)} only inside "
                    "them, which no technique rewrites)")
        return f"{missing}; choose op types it has"
    patterns = " or ".join(map(repr, step.name_pattern or []))
    if step.op_types is None:
        return f"no node name matches {patterns}"
    return f"no {' or '.join(map(repr, types))} node has a name matching {patterns}"


# ops of a model quantized already: a float technique has nothing left to take there
_QUANTIZED_OPS = {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "MatMulNBits",
                  "DynamicQuantizeMatMul", "QGemm", "MatMulIntegerToFloat"}


def _subgraph_op_types(model: onnx.ModelProto) -> set[str]:
    found: set[str] = set()
    todo = [attr for n in model.graph.node for attr in n.attribute]
    while todo:
        attr = todo.pop()
        for sub in ([attr.g] if attr.HasField("g") else list(attr.graphs)):
            for node in sub.node:
                found.add(node.op_type)
                todo.extend(node.attribute)
    return found


def _strip_prefix(message: str, technique: str) -> str:
    prefix = f"{technique}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def step_from_parts(technique: str, params: Mapping[str, Any] | None = None, *,
                    nodes: list[str] | None = None, op_types: list[str] | None = None,
                    name_pattern: str | list[str] | None = None) -> Step:
    """A checked ``Step`` built in code (the GUI), with the same rules as a file."""
    data: dict[str, Any] = {"technique": technique, "params": dict(params or {})}
    if nodes is not None:
        data["nodes"] = nodes
    if op_types is not None:
        data["op_types"] = op_types
    if name_pattern is not None:
        data["name_pattern"] = name_pattern
    return _step_from_json(1, data)
