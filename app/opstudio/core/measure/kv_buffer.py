"""One buffer for a decode step's past and present KV cache, as onnxruntime-genai runs a
``GroupQueryAttention`` model.

A decoder exported with ``GroupQueryAttention`` can read its past and write its present key and
value in the same buffer, sized for the longest sequence: the kernel then writes the step's new
token in place. onnxruntime-genai runs such models that way (``past_present_share_buffer`` in
``genai_config.json``). Fed separate arrays instead, the kernel zero-fills a new present buffer
and copies the past into it, once per query head of a KV group, on every step; measured on a
30-layer decoder at a past of 512 that is most of the attention's time. So a model is timed
as its runtime runs it: ``RunSettings.kv_buffer`` ``auto`` shares the buffer when the model's
``genai_config.json`` says the runtime does, ``shared`` whenever the model can (every present
output written by a ``GroupQueryAttention`` whose past is a model input), ``copy`` never.

The shared buffer is the feed's past with room for the step's tokens (zeros after it): every
timed run writes the same token at the same place, so the runs stay alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.measure.settings import KV_BUFFERS

__all__ = ["KV_BUFFERS", "SharedFed", "note", "resolve", "runtime_shares", "shared_pairs"]
_GQA = "GroupQueryAttention"


def shared_pairs(model: onnx.ModelProto) -> dict[str, str]:
    """Present output → the past input it can share a buffer with: the key and value of every
    ``GroupQueryAttention`` whose past is a model input and whose present is a model output.
    Empty unless every present-like output (``present*``) is one of them."""
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    pairs: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != _GQA or node.domain != "com.microsoft":
            continue
        for past_at, present_at in ((3, 1), (4, 2)):
            if len(node.input) > past_at and len(node.output) > present_at:
                past, present = node.input[past_at], node.output[present_at]
                if past in inputs and present in outputs:
                    pairs[present] = past
    others = [o for o in outputs if o.startswith("present") and o not in pairs]
    return {} if others else pairs


def runtime_shares(model_path: str | Path | None) -> bool:
    """Whether the runtime beside the model shares the buffers: ``genai_config.json``'s
    ``search.past_present_share_buffer``."""
    if model_path is None:
        return False
    config = Path(model_path).parent / "genai_config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    search = data.get("search") if isinstance(data, dict) else None
    return bool(isinstance(search, dict) and search.get("past_present_share_buffer"))


def resolve(mode: str, model: onnx.ModelProto, model_path: str | Path | None
            ) -> dict[str, str]:
    """The pairs to share under ``mode`` (empty: separate arrays). ``shared`` shares what the
    model can: comparing an export with its fused version, the original then runs as it must
    (its presents are Concats) and the fused one as onnxruntime-genai would run it."""
    if mode == "copy":
        return {}
    pairs = shared_pairs(model)
    if mode == "shared":
        return pairs
    return pairs if runtime_shares(model_path) else {}


class SharedFed:
    """A session run on ``feeds`` with each shared past input and its present output bound to
    one buffer with room for the step's tokens (``rounds.Fed``'s interface)."""

    def __init__(self, sess: Any, feeds: Mapping[str, np.ndarray], pairs: Mapping[str, str],
                 failed: Callable[[BaseException, Mapping[str, np.ndarray]], Exception]) -> None:
        import onnxruntime as ort

        self.sess, self.feeds, self.failed = sess, feeds, failed
        self.binding = sess.io_binding()
        room = _step_tokens(feeds)
        buffers: dict[str, Any] = {}
        self.output_names: list[str] = []  # in the order the binding returns them
        for present, past in pairs.items():
            value = feeds[past]
            if past not in buffers:
                pad = [(0, 0)] * value.ndim
                pad[2] = (0, room)
                buffers[past] = ort.OrtValue.ortvalue_from_numpy(np.pad(value, pad))
            self.binding.bind_ortvalue_output(present, buffers[past])
            self.output_names.append(present)
        for name, value in feeds.items():
            if name in buffers:
                self.binding.bind_ortvalue_input(name, buffers[name])
            else:
                self.binding.bind_cpu_input(name, value)
        for out in sess.get_outputs():
            if out.name not in pairs:
                self.binding.bind_output(out.name)
                self.output_names.append(out.name)
        self._buffers = buffers  # the OrtValues must outlive the binding

    def run(self, _outputs: Any, _feeds: Any) -> None:
        try:
            self.sess.run_with_iobinding(self.binding)
        except Exception as exc:
            raise self.failed(exc, self.feeds) from None


def _step_tokens(feeds: Mapping[str, np.ndarray]) -> int:
    """Tokens the step adds to the cache: the attention mask's length past the cache's, else
    the input ids' length, else one."""
    mask, ids = feeds.get("attention_mask"), feeds.get("input_ids")
    past = next((v for k, v in feeds.items() if k.startswith("past") and v.ndim == 4), None)
    if mask is not None and past is not None and mask.ndim == 2:
        return max(1, int(mask.shape[1]) - int(past.shape[2]))
    if ids is not None and ids.ndim == 2:
        return max(1, int(ids.shape[1]))
    return 1


def note(pairs: Mapping[str, str], mode: str, model: onnx.ModelProto) -> str | None:
    """What a reader of the figures must know about how the cache was fed (None: nothing new,
    separate arrays as every exporter's runtime but onnxruntime-genai feeds them)."""
    if pairs:
        why = ("as onnxruntime-genai runs this model (genai_config.json: "
               "past_present_share_buffer)" if mode == "auto" else "as asked (--kv-buffer shared)")
        return (f"KV cache: past and present share one buffer ({len(pairs)} bound), {why}: "
                "each step writes its token in place, with no copy of the past")
    if mode == "shared" and any(o.name.startswith("present") for o in model.graph.output):
        return ("KV cache: fed as separate arrays although --kv-buffer shared was asked: only "
                "a present written by GroupQueryAttention from a past input can share its "
                "buffer (fuse the attention to get one)")
    return None
