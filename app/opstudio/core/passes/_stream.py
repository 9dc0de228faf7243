"""Rewriting a lazily opened model's weights one tensor at a time, into a scratch file.

A model opened with ``load_model(lazy=True)`` keeps its weights in their files; a pass that
``reads_lazy`` rewrites it without reading them all in. Each chosen weight is read from its
memory map band by band (rows of about ``CHUNK_BYTES``), the rewritten bands are appended to a
``ScratchFile``, and the new initializers point at that file the way a lazy model's weights
point at theirs; ``save_model`` then copies them into the output's external-data file. Memory
holds one band (and whatever per-tensor statistics the technique keeps), never the model.

``rewrite_each`` runs a technique's per-tensor step over its chosen items with progress
("<technique>: <verb> tensor k of N") and cancel between tensors; on cancel or failure the
scratch file goes, so nothing partial is left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import onnx
from onnx import helper

from opstudio.core.model.graph_utils import node_reads
from opstudio.core.model.model_io import file_tensor, is_lazy, tensor_array
from opstudio.core.tempdir import opstudio_temp_root

# float bytes of one band quantized at once
CHUNK_BYTES = 128 * 2**20


class ScratchFile:
    """An append-only file the quantized tensors are written to, and tensors that refer to it.

    Its folder lives in opstudio's temp folder until the process ends: the model that refers
    to it is returned to the caller, who saves it (copying the data out) later.
    """

    def __init__(self, workdir: str | None = None) -> None:
        root = Path(workdir) if workdir else opstudio_temp_root()
        self.folder = Path(tempfile.mkdtemp(prefix=f"weights-{os.getpid()}-", dir=root))
        atexit.register(shutil.rmtree, self.folder, True)
        self.name = "quantized.data"
        self._file: BinaryIO = open(self.folder / self.name, "wb")  # noqa: SIM115
        self._offset = 0

    def write(self, data: np.ndarray) -> None:
        payload = np.ascontiguousarray(data)
        self._file.write(payload.data)
        self._offset += payload.nbytes

    def begin(self) -> int:
        return self._offset

    def tensor(self, name: str, data_type: int, dims: Sequence[int],
               start: int) -> onnx.TensorProto:
        """A tensor whose data is what was written from ``start`` up to now."""
        self._file.flush()
        return file_tensor(name, data_type, dims, self.folder / self.name, start,
                           self._offset - start)

    def put(self, name: str, array: np.ndarray, data_type: int | None = None
            ) -> onnx.TensorProto:
        """``array`` written whole, as tensor ``name`` (its own dtype unless ``data_type``)."""
        start = self.begin()
        self.write(array)
        if data_type is None:
            data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        return self.tensor(name, data_type, array.shape, start)

    def close(self) -> None:
        self._file.close()


def band_size(row_bytes: int, even: bool = False) -> int:
    """Rows (or columns) per band: about ``CHUNK_BYTES`` of floats; an even count where two
    int4 values share a byte across rows, so every band but the last packs whole bytes."""
    size = max(1, CHUNK_BYTES // max(1, row_bytes))
    return size + size % 2 if even else size



def row_bands(value: np.ndarray, even: bool = False) -> Iterator[np.ndarray]:
    """``value`` (a memory map) as contiguous in-memory bands of rows along its first axis."""
    rows = value.shape[0] if value.ndim else 1
    row_bytes = value.nbytes // max(1, rows)
    step = band_size(row_bytes, even)
    flat = value.reshape(1) if value.ndim == 0 else value
    for r0 in range(0, rows, step):
        yield np.ascontiguousarray(flat[r0:r0 + step])


def as_stored(tensor: onnx.TensorProto, data_type: int) -> np.ndarray:
    """The data of ``tensor`` read as ``data_type`` (a converter may have changed the type in
    the graph while the data in the file is still the old one), mapped where it can be."""
    probe = onnx.TensorProto()
    probe.CopyFrom(tensor)
    probe.data_type = data_type
    return tensor_array(probe)


T = TypeVar("T")


def rewrite_each(items: Sequence[T], label: Callable[[T], str], verb: str, technique: str,
                 workdir: str | None, step: Callable[[T, ScratchFile], None],
                 report: Callable[[float, str], None], check_cancelled: Callable[[], None],
                 lo: float = 0.1, hi: float = 0.95) -> None:
    """``step(item, scratch)`` for each item in order; before each, cancel is checked and
    ``"<technique>: <verb> tensor k of N (<label>)"`` reported between ``lo`` and ``hi``.
    A cancel or failure removes the scratch file."""
    total = len(items)
    with _scratch(workdir) as scratch:
        for k, item in enumerate(items):
            check_cancelled()
            report(lo + (hi - lo) * k / max(1, total),
                   f"{technique}: {verb} tensor {k + 1} of {total} ({label(item)})")
            step(item, scratch)


@contextlib.contextmanager
def _scratch(workdir: str | None) -> Iterator[ScratchFile]:
    scratch = ScratchFile(workdir)
    try:
        yield scratch
    except BaseException:  # cancelled or failed: nothing will read the file
        scratch.close()
        shutil.rmtree(scratch.folder, ignore_errors=True)
        raise
    scratch.close()


@contextlib.contextmanager
def scratch_for(model: onnx.ModelProto, workdir: str | None) -> Iterator[ScratchFile | None]:
    """A scratch file for the weights a rewrite of a lazily opened ``model`` creates (``spill``
    moves them there), or None for a model held in memory; removed on cancel or failure."""
    if not is_lazy(model):
        yield None
        return
    with _scratch(workdir) as scratch:
        yield scratch


_SPILL_MIN_BYTES = 1024  # smaller tensors stay in the model, as the saver leaves them


def spill(model: onnx.ModelProto, since: int, scratch: ScratchFile) -> None:
    """The initializers of ``model`` from position ``since`` on (what a step just added)
    written to ``scratch`` and pointed at there, so the model does not hold their data."""
    for tensor in model.graph.initializer[since:]:
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < _SPILL_MIN_BYTES:
            continue
        start = scratch.begin()
        scratch.write(np.frombuffer(tensor.raw_data, np.uint8))
        tensor.CopyFrom(scratch.tensor(tensor.name, tensor.data_type, tensor.dims, start))


def drop_unread(model: onnx.ModelProto) -> None:
    """Remove initializers nothing reads any more, without copying the ones kept."""
    read = {name for node in model.graph.node for name in node_reads(node)}
    read |= {o.name for o in model.graph.output}
    gone = [i for i, t in enumerate(model.graph.initializer) if t.name not in read]
    names = {model.graph.initializer[i].name for i in gone}
    for i in reversed(gone):
        del model.graph.initializer[i]
    kept = [i for i in model.graph.input if i.name not in names]
    if len(kept) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(kept)

