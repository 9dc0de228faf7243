"""onnxruntime sessions for a model held in memory or stored in a file.

protobuf cannot serialize a message over 2 GiB, and a serialized copy of a big model is one more
copy of its weights beside onnxruntime's own. So a model in memory goes to onnxruntime as bytes
only while it is small (:data:`IN_MEMORY_LIMIT`); a bigger one, or one whose weights a lazy load
left in their files, is written to a private temp folder with its weights as external data
(``model_io.write_external``, tensor by tensor) and loaded from there. The folder is removed as
soon as the session exists: onnxruntime has read or mapped the weights by then, and a mapped
file stays readable after it is unlinked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import onnx

from opstudio.core.model_io import inline_bytes, is_lazy, write_external
from opstudio.core.tempdir import opstudio_tempdir

# above this (an estimate from the tensors' dims), a model reaches onnxruntime through a file
IN_MEMORY_LIMIT = 64 * 2**20

ModelSource = onnx.ModelProto | str | os.PathLike[str]


def needs_file(model: onnx.ModelProto) -> bool:
    """True when ``model`` must reach onnxruntime through a file rather than as bytes."""
    return is_lazy(model) or inline_bytes(model) > IN_MEMORY_LIMIT


def create_session(model: ModelSource, options: Any = None,
                   providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """An ``onnxruntime.InferenceSession`` for a path or a ``ModelProto`` (see the module)."""
    import onnxruntime as ort

    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(os.fspath(model), options, providers=list(providers))
    if not needs_file(model):
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=list(providers))
    with opstudio_tempdir(prefix="session-") as folder:
        path = folder / "model.onnx"
        write_external(model, path, "model.onnx.data")
        return ort.InferenceSession(str(path), options, providers=list(providers))
