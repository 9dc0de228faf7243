"""What every optimization pass provides, and the sequence every pass runs in.

A pass owns one technique. The GUI asks it which nodes it can take (``check`` returns ``None`` or
a sentence saying why not, shown next to the node; it gets the step's params, since a block size
or ``structured`` decides it), which parameters it has (``params``: the GUI builds its editor from
these), and the optimizer asks it to rewrite a set of nodes (``apply``).

``Pass.apply`` is the one entry point and owns the sequence, as ir-py's pass infrastructure does
(requires → call → ensures); a technique writes only ``check`` and ``_rewrite``:

1. the params are validated (``validate_params``: defaults filled in, types and ranges checked);
2. the pass takes its working copy (``ctx.working_copy``: the model itself when the caller
   handed it over with ``ctx.owns_model``, as the optimizer does with its intermediates);
3. the asked-for nodes are partitioned with ``check``: nodes it cannot take are not an exception,
   they are listed in ``PassResult.skipped`` with the reason, and the optimizer decides whether
   that is an error (a node the user named) or not (a node picked by op type);
4. ``_rewrite(work, chosen, params, ctx)`` rewrites the chosen nodes (and may skip more of them);
5. the result is checked, and a breach raises ``ContractBroken`` (a defect of the pass):
   - every node it created records the original node(s) it came from
     (``provenance.set_origin``);
   - the input was not mutated, unless handed over. The check compares a fingerprint taken
     before and after: every node, attribute and small tensor byte for byte, and for tensors of
     more than ``_HASHED_ELEMENTS`` elements their name, type, dims and storage, not their data
     (reading every weight of a multi-gigabyte model again would cost seconds; passes never
     edit a weight in place anyway, they add a new tensor: see ``_weights``);
   - the result is valid as ``validity.check_model`` sees it (onnxruntime loads it; onnx's full
     check passes for the ops onnx knows), unless the caller checks that itself
     (``ctx.check_validity`` False: the optimizer checks each step's result, naming the step).

The result must also be deterministic (the same model, nodes and params give the same bytes);
that is for the contract test to show (``tests/core/passes/test_contract.py``), which runs every
registered technique through all of the above.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, final

import numpy as np
import onnx

from opstudio.core.errors import ContractBroken, OpstudioError
from opstudio.core.model import provenance, validity
from opstudio.core.model.graph_utils import copy_model, nodes_by_name
from opstudio.core.progress import CancelCheck, Progress

ParamKind = Literal["int", "float", "bool", "choice", "path"]


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: ParamKind
    default: Any
    label: str = ""
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] = ()
    optional: bool = False  # may be absent/None (e.g. "rank" when "energy" is given)


@dataclass
class PassContext:
    """What a pass may need besides the model: calibration inputs and the shared temp folder."""

    inputs: Sequence[Mapping[str, np.ndarray]] = ()  # calibration samples (static INT8)
    workdir: str | None = None  # a private temp folder the pass may write into
    # The caller hands the model over (the optimizer's own intermediate): the pass may rewrite
    # it in place instead of copying it first, which halves the memory a big model needs.
    owns_model: bool = False
    # False when the caller checks the result's validity itself (the optimizer, once per step)
    check_validity: bool = True
    progress: Progress | None = None
    cancelled: CancelCheck | None = None

    def report(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(fraction, message)

    def working_copy(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The model a pass rewrites: ``model`` itself when the caller handed it over."""
        return model if self.owns_model else copy_model(model)

    def check_cancelled(self) -> None:
        if self.cancelled is not None and self.cancelled():
            from opstudio.core.errors import Cancelled

            raise Cancelled()


@dataclass
class PassResult:
    model: onnx.ModelProto
    applied: list[str] = field(default_factory=list)  # original node names rewritten
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> reason
    # Per original node: figures to report, e.g. {"params_before", "params_after",
    # "flops_before", "flops_after", "rel_error", "rank", "sparsity", "bytes_before", ...}
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # whole-step remarks (file size effect, …)


ScanParams = Mapping[str, Any] | Sequence[Mapping[str, Any]]


class RewriterFailed(OpstudioError):
    """onnxruntime's quantizer or float16 converter failed on a model a pass handed it in good
    faith; the optimizer prefixes the step, the message says what the user can do."""


class Pass:
    """Base class; subclasses set the class attributes and implement ``check`` and ``_rewrite``.

    Everything the rest of opstudio needs to know about a technique is here, so a new technique
    is its module plus one line in ``passes/__init__.py``: how a plan orders it, what the
    advisor's scan tries, how the advisor explains it and the colour the app draws it in.
    """

    technique: str = ""  # recipe name: "lowrank", "prune", "int8-dynamic", …
    label: str = ""  # shown in the GUI
    description: str = ""  # one sentence, shown as a tooltip
    params: tuple[ParamSpec, ...] = ()
    # Where a plan puts its step: rewrites that change shapes or weights' float values first,
    # quantizers last, so no step quantizes a weight a later step still has to read as float.
    plan_order: int = 50
    # What the advisor's sensitivity scan tries by default (a list: each variant is its own
    # candidate); None: not scanned unless asked for.
    scan_params: ClassVar[ScanParams | None] = None
    # The roofline regime it helps ("memory" or "compute") and why, for the advisor's sentence.
    helps_when: str = ""
    because: str = ""
    colour: str = "#2a3240"
    # check analyses the whole model the first time it is asked (seconds on a large model):
    # the app asks it off the UI thread
    slow_check: bool = False
    # Op types its rewrite puts into a model: a later recipe step may select them by op type
    # although the original model has none (``recipe.validate`` defers such a selector).
    creates: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "apply" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: a pass implements _rewrite; apply runs the pass "
                            "contract around it and is not overridden")

    def reads_lazy(self, params: Mapping[str, Any]) -> bool:
        """True when the pass, with these validated ``params``, works on a model whose weights
        stay in their files (``model_io.load_model(lazy=True)``), reading one weight at a time;
        else the optimizer reads every weight into the model before the step."""
        return False

    def check(self, model: onnx.ModelProto, node: onnx.NodeProto,
              params: Mapping[str, Any] | None = None) -> str | None:
        """``None`` if this pass can rewrite ``node`` with ``params``, else the reason in words.

        ``params`` are the step's, validated or as given (``given_params`` puts them over the
        defaults; ``None``: the defaults). What is wrong with the params themselves is
        ``validate_params``'s to say, not ``check``'s.
        """
        raise NotImplementedError

    def check_any(self, model: onnx.ModelProto, node: onnx.NodeProto,
                  scan: ScanParams | None) -> str | None:
        """``check`` for a scan's params (one set or a list of variants): ``None`` if some
        variant takes ``node``, else the first variant's reason."""
        variants: list[Mapping[str, Any] | None] = (
            [scan] if scan is None or isinstance(scan, Mapping) else list(scan) or [None])
        first = None
        for variant in variants:
            reason = self.check(model, node, variant)
            if reason is None:
                return None
            first = first or reason
        return first

    def given_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """``params`` over the defaults, unchecked: what ``check`` reads."""
        return {**{spec.name: spec.default for spec in self.params}, **dict(params or {})}

    @final
    def apply(self, model: onnx.ModelProto, nodes: Sequence[str], params: Mapping[str, Any],
              ctx: PassContext) -> PassResult:
        """Rewrite ``nodes`` of ``model``: validate, copy, partition, ``_rewrite``, check the
        result (the sequence of this module's docstring)."""
        params = self.validate_params(params)
        before = None if ctx.owns_model else _fingerprint(model)
        originals = {n.name for n in model.graph.node}  # before ``work`` may be rewritten
        work = ctx.working_copy(model)
        chosen, skipped = self._partition(work, list(dict.fromkeys(nodes)), params)
        result = self._rewrite(work, chosen, params, ctx) if chosen else PassResult(model=work)
        result.skipped = {**skipped, **result.skipped}
        if before is not None and _fingerprint(model) != before:
            raise ContractBroken(f"{self.technique}: changed the model it was given instead of "
                                 "its working copy", self.technique)
        for node in result.model.graph.node:
            if node.name not in originals and not _has_origin(node):
                raise ContractBroken(
                    f"{self.technique}: created node '{node.name}' ({node.op_type}) records no "
                    "original node", self.technique)
        if ctx.check_validity and result.applied:
            try:
                validity.check_model(result.model)
            except validity.InvalidModel as exc:
                raise ContractBroken(f"{self.technique}: the result is {exc}",
                                     self.technique) from exc
        ctx.report(1.0, f"{self.technique}: done")
        return result

    def _partition(self, work: onnx.ModelProto, nodes: Sequence[str],
                   params: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
        """The asked-for nodes this pass takes, and the others with the reason: each node by
        ``check``. A pass whose nodes decide together narrows what is checked here."""
        by_name = nodes_by_name(work.graph)
        chosen: list[str] = []
        skipped: dict[str, str] = {}
        for name in nodes:
            node = by_name.get(name)
            reason = "no such node" if node is None else self.check(work, node, params)
            if reason:
                skipped[name] = reason
            else:
                chosen.append(name)
        return chosen, skipped

    def _rewrite(self, work: onnx.ModelProto, chosen: Sequence[str], params: Mapping[str, Any],
                 ctx: PassContext) -> PassResult:
        """Rewrite ``chosen`` (nodes ``check`` accepted, at least one) in ``work``, the pass's
        own model; validated ``params``. Nodes it still cannot take go to ``skipped``."""
        raise NotImplementedError

    def validate_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults filled in, types and ranges checked; unknown keys are an error."""
        params = dict(params or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise OpstudioError(
                f"{self.technique}: unknown parameter(s) {', '.join(unknown)}; "
                f"expected {', '.join(known) or 'none'}")
        out: dict[str, Any] = {}
        for spec in self.params:
            value = params.get(spec.name, spec.default)
            if value is None:
                if not spec.optional and spec.default is not None:
                    raise OpstudioError(f"{self.technique}: parameter '{spec.name}' is required")
                out[spec.name] = None
                continue
            out[spec.name] = _coerce(self.technique, spec, value)
        return out


def _coerce(technique: str, spec: ParamSpec, value: Any) -> Any:
    where = f"{technique}: parameter '{spec.name}'"
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise OpstudioError(f"{where} must be true or false, not {value!r}")
        return value
    if spec.kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OpstudioError(f"{where} must be a number, not {value!r}")
        if spec.kind == "int":
            if float(value) != int(value):
                raise OpstudioError(f"{where} must be a whole number, not {value!r}")
            value = int(value)
        else:
            value = float(value)
        if spec.minimum is not None and value < spec.minimum:
            raise OpstudioError(f"{where} must be at least {spec.minimum}, not {value}")
        if spec.maximum is not None and value > spec.maximum:
            raise OpstudioError(f"{where} must be at most {spec.maximum}, not {value}")
        return value
    if spec.kind == "choice":
        if value not in spec.choices:
            options = ", ".join(repr(c) for c in spec.choices)
            raise OpstudioError(f"{where} must be one of {options}, not {value!r}")
        return value
    if spec.kind == "path":
        if not isinstance(value, str) or not value:
            raise OpstudioError(f"{where} must be a file path")
        return value
    raise AssertionError(spec.kind)


def _has_origin(node: onnx.NodeProto) -> bool:
    return any(p.key == provenance.ORIGIN_KEY and p.value for p in node.metadata_props)


# Tensors of up to this many elements are fingerprinted byte for byte; bigger ones by name, type,
# dims and storage: hashing every weight of a multi-gigabyte model again would cost seconds.
_HASHED_ELEMENTS = 1 << 18


def _fingerprint(model: onnx.ModelProto) -> bytes:
    """A digest that changes with any edit of ``model``'s graph (big tensors' data aside).

    Built field by field: ``ByteSize`` or ``SerializeToString`` of the whole model would encode
    every weight (protobuf's upb computes a size by encoding).
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{model.ir_version}\0{model.producer_name}".encode())
    for part in (*model.opset_import, *model.metadata_props, *model.functions):
        digest.update(part.SerializeToString())
    _hash_graph(digest, model.graph)
    return digest.digest()


def _hash_graph(digest: Any, graph: onnx.GraphProto) -> None:
    digest.update(graph.name.encode())
    for info in (*graph.input, *graph.output, *graph.value_info):
        digest.update(info.SerializeToString())
    for tensor in graph.initializer:
        _hash_tensor(digest, tensor)
    for sparse in graph.sparse_initializer:
        digest.update(str(list(sparse.dims)).encode())
        _hash_tensor(digest, sparse.values)
        _hash_tensor(digest, sparse.indices)
    for node in graph.node:
        digest.update("\0".join([node.name, node.op_type, node.domain, node.doc_string,
                                  *node.input, "->", *node.output]).encode())
        for prop in node.metadata_props:
            digest.update(prop.SerializeToString())
        for attr in node.attribute:
            digest.update(f"{attr.name}\0{attr.type}".encode())
            if attr.type in (onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS):
                for tensor in [attr.t] if attr.HasField("t") else attr.tensors:
                    _hash_tensor(digest, tensor)
            elif attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                    _hash_graph(digest, sub)
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                _hash_tensor(digest, attr.sparse_tensor.values)
                _hash_tensor(digest, attr.sparse_tensor.indices)
            else:
                digest.update(attr.SerializeToString())


def _hash_tensor(digest: Any, tensor: onnx.TensorProto) -> None:
    if math.prod(tensor.dims) <= _HASHED_ELEMENTS:
        digest.update(tensor.SerializeToString())
        return
    digest.update(f"{tensor.name}\0{tensor.data_type}\0{list(tensor.dims)}\0"
                  f"{tensor.data_location}".encode())
    for entry in tensor.external_data:
        digest.update(entry.SerializeToString())
