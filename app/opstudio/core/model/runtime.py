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
from collections.abc import Mapping, Sequence
from typing import Any

import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.model.model_io import inline_bytes, is_lazy, write_external
from opstudio.core.tempdir import opstudio_tempdir

# above this (an estimate from the tensors' dims), a model reaches onnxruntime through a file
IN_MEMORY_LIMIT = 64 * 2**20

ModelSource = onnx.ModelProto | str | os.PathLike[str]

OPT_LEVELS = ("disable", "basic", "extended", "all")


def session_options(*, threads: int = 0, inter_threads: int | None = None,
                    opt_level: str | None = None, log_severity: int | None = 3,
                    spinning: bool = True, prepacking: bool = True,
                    profile_prefix: str | None = None,
                    optimized_model_path: str | None = None,
                    config: Mapping[str, str] | None = None) -> Any:
    """The one place an ``onnxruntime.SessionOptions`` is built.

    ``threads`` > 0 sets the intra-op threads (0 keeps onnxruntime's default); ``opt_level`` is
    one of :data:`OPT_LEVELS` and ``log_severity`` a level (None keeps onnxruntime's default); ``spinning=False`` stops idle
    threads from spinning after a run; ``prepacking=False`` keeps weights mapped from a file
    there instead of copying them prepacked; ``profile_prefix`` turns profiling on;
    ``optimized_model_path`` saves the graph onnxruntime runs; ``config`` adds session config
    entries.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    if inter_threads is not None:
        options.inter_op_num_threads = inter_threads
    if opt_level is not None:
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if opt_level not in levels:
            raise OpstudioError(f"unknown optimization level {opt_level!r}; "
                                f"expected one of {', '.join(levels)}")
        options.graph_optimization_level = levels[opt_level]
    if log_severity is not None:
        options.log_severity_level = log_severity
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimized_model_path is not None:
        options.optimized_model_filepath = optimized_model_path
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return options


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
