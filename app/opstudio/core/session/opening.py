"""Opening a model for display: load it, analyse it with the dims a run will use, lay it out.

On a 10k-node model this takes seconds, so the app runs it in its worker (progress, cancel)
instead of on the UI thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx

from opstudio.core.errors import Cancelled, OpstudioError
from opstudio.core.measure.inputs import default_dim, run_dims
from opstudio.core.model.graph import GraphInfo, analyze, symbolic_dims
from opstudio.core.model.layout import Layout, compute_layout
from opstudio.core.model.model_io import load_model
from opstudio.core.model.phases import is_past_length_name


@dataclass
class Opened:
    path: Path
    model: onnx.ModelProto
    graph: GraphInfo
    layout: Layout


def display_dims(model: onnx.ModelProto, chosen: Mapping[str, int], *,
                 phase: str | None = None, past: int | None = None,
                 model_path: str | Path | None = None) -> dict[str, int]:
    """The dims a run will use (the chosen ones, the phase's, those derived from others, else
    the documented defaults), so that shapes and FLOPs shown are concrete. A past of 0 is a
    length too, and a KV head size is derived as a run derives it."""
    with contextlib.suppress(OpstudioError):  # a dim a run would refuse: show what can be
        return run_dims(model, chosen, phase=phase, past=past, model_path=model_path)
    dims: dict[str, int] = {}
    for name in symbolic_dims(model):
        value = chosen.get(name)
        if value is None:
            value = default_dim(name, chosen)[0]
        if value is not None and (value > 0 or is_past_length_name(name)):
            dims[name] = int(value)
    return dims


def open_for_display(path: str | Path, chosen_dims: Mapping[str, int] | None = None, *,
                     phase: str | None = None, past: int | None = None,
                     progress: Callable[[float, str], None] | None = None,
                     cancelled: Callable[[], bool] | None = None) -> Opened:
    def step(fraction: float, message: str) -> None:
        if cancelled is not None and cancelled():
            raise Cancelled()
        if progress is not None:
            progress(fraction, message)

    p = Path(path)
    step(0.0, f"reading {p.name}")
    model = load_model(p, lazy=True)  # the graph and tensor metadata; weights stay on disk
    step(0.3, "analysing the graph")
    graph = analyze(model, display_dims(model, chosen_dims or {}, phase=phase, past=past,
                                        model_path=p))
    step(0.7, "laying out the graph")
    layout = compute_layout(graph)
    step(1.0, "opened")
    return Opened(p.resolve(), model, graph, layout)
