"""What every optimization pass provides.

A pass owns one technique. The GUI asks it which nodes it can take (``check`` returns ``None`` or
a sentence saying why not, shown next to the node), which parameters it has (``params``: the GUI
builds its editor from these), and the optimizer asks it to rewrite a set of nodes (``apply``).

Rules every pass keeps:
- ``apply`` works on its own copy of the model (``ctx.working_copy``) and never mutates the one
  passed in, unless the caller handed it over (``ctx.owns_model``);
- every node it creates records its original node with ``provenance.set_origin``;
- the result is valid as ``validity.check_model`` sees it (onnxruntime loads it; onnx's full check
  passes for the ops onnx knows) and is deterministic: the same
  model, nodes and params give the same bytes;
- nodes it cannot take are not an exception: they are listed in ``PassResult.skipped`` with the
  reason, and the optimizer decides whether that is an error (a node the user named) or not
  (a node picked by op type).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError

Progress = Callable[[float, str], None]
CancelCheck = Callable[[], bool]

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
    progress: Progress | None = None
    cancelled: CancelCheck | None = None

    def report(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(fraction, message)

    def working_copy(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The model a pass rewrites: ``model`` itself when the caller handed it over."""
        if self.owns_model:
            return model
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out

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


class Pass:
    """Base class; subclasses set the class attributes and implement ``check`` and ``apply``.

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

    def check(self, model: onnx.ModelProto, node: onnx.NodeProto) -> str | None:
        """``None`` if this pass can rewrite ``node``, else the reason in words."""
        raise NotImplementedError

    def apply(self, model: onnx.ModelProto, nodes: Sequence[str], params: Mapping[str, Any],
              ctx: PassContext) -> PassResult:
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
