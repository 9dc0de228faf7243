"""How much memory a model needs to run: the answer every profile and comparison prints.

Three figures, each for what it is:
- the weights' bytes (from the initializers' dims and types; whether they are mapped from
  external-data files, which the kernel pages in and out and shares between sessions, or held
  inline in the model);
- a session's *anonymous* memory: the growth of ``RssAnon`` (``/proc/self/status``) of the
  process that measured, over creating the model's first session. Pages of mapped weight files
  are not anonymous and do not count; copies onnxruntime makes (pre-packed MatMul weights,
  folded constants) do. ``RssAnon`` has no high-water mark, so the process's peak is the
  largest of samples taken every 10 ms while the sessions are created (``AnonPeak``) and after
  every round of runs (what runs allocate; no sampling thread competes with timed runs);
- for a decoder with a KV cache, the cache's bytes per token (of every layer's keys and values
  as fed) and at the past that was run.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper


def anon_bytes() -> int | None:
    """This process's anonymous resident memory (``RssAnon``), None where /proc does not say."""
    return _proc_kib("/proc/self/status", "RssAnon:")


def available_bytes() -> int | None:
    """Memory the system can give without swapping (``MemAvailable``), None where /proc does
    not say."""
    return _proc_kib("/proc/meminfo", "MemAvailable:")


def _proc_kib(path: str, key: str) -> int | None:
    """The ``key`` line of a /proc file that counts in kB, in bytes."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class AnonPeak:
    """The largest ``anon_bytes`` seen while the ``with`` block runs, sampled every
    ``interval`` s on a thread: creating a session holds transient copies of weights (read,
    then pre-packed) that a sample taken after it would miss. Not for timed runs: the sampling
    thread would compete with them."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak = interval, anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def _take(self) -> None:
        now = anon_bytes()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()


def weight_bytes(model: onnx.ModelProto) -> tuple[int, bool]:
    """The bytes of ``model``'s initializers, and whether most of them lie in external files."""
    from opstudio.core.model.tensors import tensor_nbytes

    total = external = 0
    for tensor in model.graph.initializer:
        n = tensor_nbytes(tensor)
        total += n
        if external_data_helper.uses_external_data(tensor):
            external += n
    return total, total > 0 and 2 * external >= total


def kv_bytes(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]
             ) -> tuple[int, int] | None:
    """(KV-cache bytes per token, the past fed in tokens) of a decoder with a KV cache, from
    the cache inputs as fed ([batch, kv heads, past, head size] per layer, keys and values),
    None for another model."""
    from opstudio.core.model.phases import kv_layout

    per_token, past = 0, 0
    for spec in kv_layout(model).kv_inputs:
        a = inputs.get(spec.name)
        if a is None or a.ndim < 4:
            continue
        shape = list(a.shape)
        past = max(past, int(shape[-2]))
        per_token += math.prod(shape[:-2] + shape[-1:]) * a.dtype.itemsize
    return (per_token, past) if per_token else None


@dataclass
class Memory:
    weights_bytes: int = 0
    weights_mapped: bool = False  # in external-data files, mapped rather than copied
    session_bytes: int | None = None  # anonymous memory creating one session took
    peak_bytes: int | None = None  # the measuring process's largest RssAnon sampled
    sessions: int = 0  # sessions of this model open at once
    models: int = 1  # models measured together in that process (compare: 2)
    kv_token_bytes: int | None = None
    past: int | None = None

    @property
    def kv_past_bytes(self) -> int | None:
        if self.kv_token_bytes is None or self.past is None:
            return None
        return self.kv_token_bytes * self.past

    def line(self) -> str:
        """``memory: weights 5.6 GiB (mapped from file), session 0.8 GiB anonymous, ...``"""
        parts = [f"weights {fmt_bytes(self.weights_bytes)} "
                 f"({'mapped from file' if self.weights_mapped else 'in the model'})"]
        if self.session_bytes is not None:
            parts.append(f"session {fmt_bytes(self.session_bytes)} anonymous"
                         + (f" (×{self.sessions} open)" if self.sessions > 1 else ""))
        if self.peak_bytes is not None:
            parts.append(f"process peak {fmt_bytes(self.peak_bytes)} anonymous"
                         + (f" with all {self.models} models" if self.models > 1 else ""))
        if self.kv_token_bytes is not None:
            kv = f"KV cache {fmt_bytes(self.kv_token_bytes)}/token"
            if self.past:
                kv += f", {fmt_bytes(self.kv_past_bytes or 0)} at past {self.past}"
            parts.append(kv)
        return "memory: " + ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weights_bytes": self.weights_bytes,
                               "weights_mapped": self.weights_mapped,
                               "session_anon_bytes": self.session_bytes,
                               "process_peak_anon_bytes": self.peak_bytes,
                               "sessions": self.sessions, "models": self.models}
        if self.kv_token_bytes is not None:
            out.update(kv_bytes_per_token=self.kv_token_bytes, past=self.past,
                       kv_bytes_at_past=self.kv_past_bytes)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Memory:
        return cls(weights_bytes=int(data.get("weights_bytes", 0)),
                   weights_mapped=bool(data.get("weights_mapped", False)),
                   session_bytes=data.get("session_anon_bytes"),
                   peak_bytes=data.get("process_peak_anon_bytes"),
                   sessions=int(data.get("sessions", 0)), models=int(data.get("models", 1)),
                   kv_token_bytes=data.get("kv_bytes_per_token"), past=data.get("past"))


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
