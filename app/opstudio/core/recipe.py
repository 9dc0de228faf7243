"""The optimization plan: which technique, with which parameters, on which nodes.

A recipe is JSON, shared by the GUI, the CLI and files::

    {"version": 1,
     "steps": [{"nodes": ["mm0", "mm1"], "technique": "lowrank", "params": {"rank": 32}},
               {"op_types": ["Conv"], "technique": "int8-dynamic", "params": {}}]}

Each step names its nodes either explicitly (``nodes``) or by operator type (``op_types``), never
both. Node names are those of the model as opstudio loads it (``model_io.load_model`` names
unnamed nodes ``<OpType>_<index>``) and always refer to the *original* model: a step that
addresses a node an earlier step rewrote acts on the nodes that came from it (see
``optimize.py``). Steps run in order, each on the result of the previous one.

``load``/``from_json`` check the shape of the file; ``validate`` checks it against a model: every
named node and op type exists, the technique is known, its parameters are valid, and each named
node can take the technique (for nodes no earlier step rewrote). Errors name the step (1-based)
and the node: ``step 2 (lowrank): node 'mm9' is not in the model``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.fileio import write_text_atomic

VERSION = 1
_STEP_KEYS = {"technique", "params", "nodes", "op_types"}
_RECIPE_KEYS = {"version", "steps"}


@dataclass
class Step:
    technique: str
    params: dict[str, Any] = field(default_factory=dict)
    nodes: list[str] | None = None
    op_types: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.nodes is not None:
            out["nodes"] = list(self.nodes)
        if self.op_types is not None:
            out["op_types"] = list(self.op_types)
        out["technique"] = self.technique
        out["params"] = dict(self.params)
        return out

    def describe(self, index: int) -> str:
        return f"step {index} ({self.technique})"


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
                            "expected 'technique', 'params' and 'nodes' or 'op_types'")
    if technique is None:
        raise OpstudioError(f"{where}: missing 'technique'")
    if not isinstance(technique, str) or not technique:
        raise OpstudioError(f"{where}: 'technique' must be a name, not {technique!r}")
    params = data.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise OpstudioError(f"{where}: 'params' must be an object, not {_kind(params)}")
    has_nodes, has_types = "nodes" in data, "op_types" in data
    if has_nodes and has_types:
        raise OpstudioError(f"{where}: give either 'nodes' or 'op_types', not both")
    if not has_nodes and not has_types:
        raise OpstudioError(f"{where}: missing 'nodes' or 'op_types' (which nodes to rewrite)")
    key = "nodes" if has_nodes else "op_types"
    names = _name_list(where, key, data[key])
    return Step(technique=technique, params=dict(params),
                nodes=names if has_nodes else None, op_types=names if has_types else None)


def _name_list(where: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise OpstudioError(f"{where}: '{key}' must be a list of names, not {_kind(value)}")
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


def validate(recipe: Recipe, model: onnx.ModelProto) -> None:
    """Check ``recipe`` against ``model``; raise ``OpstudioError`` naming the step and the node.

    Applicability is checked on the original model for the nodes no earlier step has touched;
    the optimizer checks the rest when it reaches them (and writes nothing if one fails).
    """
    from opstudio.core.passes import get_pass

    by_name = {n.name: n for n in model.graph.node}
    op_types = {n.op_type for n in model.graph.node}
    touched: set[str] = set()
    for index, step in enumerate(recipe.steps, start=1):
        where = step.describe(index)
        try:
            pass_ = get_pass(step.technique)
        except OpstudioError as exc:
            raise OpstudioError(f"step {index}: {exc}") from None
        try:
            pass_.validate_params(step.params)
        except OpstudioError as exc:
            raise OpstudioError(f"{where}: {_strip_prefix(str(exc), step.technique)}") from None
        if step.nodes is not None:
            for name in step.nodes:
                node = by_name.get(name)
                if node is None:
                    raise OpstudioError(f"{where}: node '{name}' is not in the model")
                if name in touched:
                    continue
                reason = pass_.check(model, node)
                if reason:
                    raise OpstudioError(f"{where}: node '{name}' ({node.op_type}) cannot take "
                                        f"{step.technique}: {reason}")
            touched.update(step.nodes)
        else:
            for op_type in step.op_types or []:
                if op_type not in op_types:
                    raise OpstudioError(f"{where}: the model has no {op_type!r} nodes")
            touched.update(n.name for n in model.graph.node if n.op_type in (step.op_types or []))


def _strip_prefix(message: str, technique: str) -> str:
    prefix = f"{technique}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def step_from_parts(technique: str, params: Mapping[str, Any] | None = None, *,
                    nodes: list[str] | None = None, op_types: list[str] | None = None) -> Step:
    """A checked ``Step`` built in code (the GUI), with the same rules as a file."""
    data: dict[str, Any] = {"technique": technique, "params": dict(params or {})}
    if nodes is not None:
        data["nodes"] = nodes
    if op_types is not None:
        data["op_types"] = op_types
    return _step_from_json(1, data)
