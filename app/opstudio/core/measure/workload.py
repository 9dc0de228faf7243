"""A ``FeedSpec`` resolved against one model: what a measurement feeds it, made once.

A command measures one model (``profile``) or two on the first one's inputs (``compare``), and
needs several kinds of feed from the same spec: the main one (the step ``--phase``/``--past``
choose), the prefill of a request's prompt and its decode step at a few pasts, and the feed its
accuracy is judged on (``text_prompt.judging``). Each is made when first asked for and kept;
the model's KV layout (``phases.kv_layout``) is read once and handed to everything that makes
or describes a feed, so that one command reads the model's inputs once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.measure.settings import FeedSpec
from opstudio.core.measure.text_prompt import Judging, judging
from opstudio.core.model.phases import KvLayout, kv_layout

PREFILL = "prefill"


def decode_kind(past: int) -> str:
    """The name of a request's decode step after ``past`` tokens among its kinds of run."""
    return f"decode@{past}"


def no_kv_cache(name: str = "the model") -> OpstudioError:
    """What a request of a model without a KV cache is refused with."""
    return OpstudioError(
        f"--request: {name} has no past key/value (KV-cache) input, so it has no decode "
        "step: a request's time (prefill, then one decode step per token) needs a decoder "
        "exported with its KV cache (past_key_values.N.key/value inputs)")


def workload_for(models: Sequence[str | Path | onnx.ModelProto], run: object,
                 workload: Workload | None) -> Workload:
    """``workload`` when a measuring function was given one, else the feed spec that ``run``
    carries when it is a ``ProfileSettings`` (the defaults otherwise), resolved on the first
    of ``models``."""
    if workload is not None:
        return workload
    return Workload.of(models[0], run if isinstance(run, FeedSpec) else FeedSpec())


class Workload:
    """The feeds of ``model`` (its graph is enough; ``path`` is its file, whose folder may hold a
    ``genai_config.json`` and a tokenizer) under ``spec``, by kind (``main``, a request's
    ``prefill`` and ``decode`` at a past), each made on first use."""

    def __init__(self, model: onnx.ModelProto, spec: FeedSpec | None = None,
                 path: str | Path | None = None, *,
                 feeds: Mapping[str, np.ndarray] | None = None) -> None:
        self.model = model
        self.spec = spec if spec is not None else FeedSpec()
        self.path = None if path is None else str(path)
        # tensors the caller already made serve as the main feed
        self._given = None if feeds is None else dict(feeds)
        # what make_inputs made, by its arguments
        self._feeds: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}
        self._layout: KvLayout | None = None
        self._judging: Judging | None = None

    @classmethod
    def of(cls, model: str | Path | onnx.ModelProto, spec: FeedSpec | None = None, *,
           feeds: Mapping[str, np.ndarray] | None = None) -> Workload:
        """The workload of a model file (its graph read without weights) or proto."""
        if isinstance(model, onnx.ModelProto):
            return cls(model, spec, feeds=feeds)
        from opstudio.core.model.model_io import load_model

        path = Path(model)
        if not path.is_file():
            raise OpstudioError(f"{path}: no such file")
        return cls(load_model(path, load_external_data=False), spec, path, feeds=feeds)

    @property
    def layout(self) -> KvLayout:
        """The model's KV-cache layout, read once."""
        if self._layout is None:
            self._layout = kv_layout(self.model)
        return self._layout

    @property
    def has_kv_cache(self) -> bool:
        return bool(self.layout.past)

    def main(self) -> dict[str, np.ndarray]:
        """The feed the spec asks for: its dims, shapes, inputs file, seed, phase and past."""
        if self._given is not None:
            return self._given
        s = self.spec
        return self._made(s.dims, s.phase, s.past, s.shapes, s.inputs_path)

    def at(self, phase: str) -> dict[str, np.ndarray]:
        """The spec's feed (dims, shapes, inputs file) at ``phase`` instead of the spec's own:
        a prefill of the whole prompt, or the decode step at the spec's past."""
        s = self.spec
        return self._made(s.dims, phase, s.past if phase == "decode" else None, s.shapes,
                          s.inputs_path)

    def prefill(self, prompt: int) -> dict[str, np.ndarray]:
        """A request's prefill of ``prompt`` synthetic tokens (the spec's other dims and shapes
        apply)."""
        seq = dict.fromkeys(self._request_layout().seq, prompt)
        return self._made({**self._fixed_dims(), **seq}, PREFILL, None, self._fixed_shapes())

    def decode(self, past: int) -> dict[str, np.ndarray]:
        """The decode step of one synthetic token after ``past`` (the spec's other dims and
        shapes apply)."""
        self._request_layout()
        return self._made(self._fixed_dims(), "decode", past, self._fixed_shapes())

    def judging(self) -> Judging:
        """What accuracy is judged on (the user's inputs, a text prompt, the timing feed),
        decided once."""
        if self._judging is None:
            self._judging = judging(self.model, self.path, self.spec, self.layout)
        return self._judging

    def step(self) -> str:
        """The step of a KV-cache decoder the main feed runs, in words (``phases.describe_step``)."""
        from opstudio.core.model.phases import describe_step

        return describe_step(self.model, self.main(), self.layout)

    def kv_bytes(self) -> tuple[int, int] | None:
        """(KV-cache bytes per token, past) of the main feed (``memory.kv_bytes``)."""
        from opstudio.core.measure.memory import kv_bytes

        return kv_bytes(self.model, self.main(), self.layout)

    def _request_layout(self) -> KvLayout:
        """The layout, checked to have what a request's feeds need."""
        layout = self.layout
        if not layout.past:
            raise no_kv_cache()
        if not layout.seq:
            raise OpstudioError(
                "--request: the model's token input has no named sequence dim, so the prompt "
                "length cannot be set (the prefill of a request runs the whole prompt at once)")
        return layout

    def _lengths(self) -> set[str]:
        layout = self.layout
        return {*layout.past, *layout.seq, *layout.total}

    def _fixed_dims(self) -> dict[str, int]:
        """The spec's dims a request keeps: all but the lengths, which are the request's."""
        lengths = self._lengths()
        return {k: v for k, v in self.spec.dims.items() if k not in lengths}

    def _fixed_shapes(self) -> dict[str, list[int]]:
        """The spec's shapes a request keeps: of the inputs no length sizes. (Arrays of an
        inputs file are not used: a prompt there has its own length, the request's are P and
        P+G tokens.)"""
        if not self.spec.shapes:
            return {}
        from opstudio.core.model.graph import input_specs

        lengths = self._lengths()
        sized = {s.name for s in input_specs(self.model)
                 if any(isinstance(d, str) and d in lengths for d in s.shape or [])}
        return {k: v for k, v in self.spec.shapes.items() if k not in sized}

    def _made(self, dims: Mapping[str, int], phase: str | None, past: int | None,
              shapes: Mapping[str, list[int]] | None = None,
              npz_path: str | None = None) -> dict[str, np.ndarray]:
        """``make_inputs`` with these arguments, once: a request's decode step at the past the
        spec runs is the main feed itself."""
        from opstudio.core.measure.inputs import make_inputs

        key = (tuple(sorted(dims.items())), phase, past,
               tuple(sorted((k, tuple(v)) for k, v in (shapes or {}).items())), npz_path)
        if key not in self._feeds:
            self._feeds[key] = make_inputs(
                self.model, dims=dims, shapes=shapes, npz_path=npz_path, seed=self.spec.seed,
                phase=phase, past=past, model_path=self.path, layout=self.layout)
        return self._feeds[key]
