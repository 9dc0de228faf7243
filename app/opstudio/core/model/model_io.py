"""Reading and writing ONNX files safely.

``load_model`` turns every way a file can be wrong into one ``ModelLoadError`` line that names the
file and the cause. External data is confined to the model's folder: a location that is absolute
or climbs out of it (``../../etc/passwd``, a symlink) is refused before anything is read.
``save_model`` writes atomically (temp file + rename) and never replaces an existing file unless
asked to.

Weights stay on disk until something needs them (``load_model(path, lazy=True)``): a tensor in an
external-data file keeps its reference, and the model's folder is recorded in the tensor's
``basepath`` entry (onnx's own key for it), so that :func:`tensor_array` can map the data from
the file when a pass or a check asks for one weight. Opening an 8-billion-parameter export then
reads a few megabytes of graph, not gigabytes of weights. :func:`load_weights` reads them all
into the model (what a rewrite of every weight needs today); :func:`write_external` copies them
from their files into a new one; :func:`is_lazy` says whether a model still points at files.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from onnx import external_data_helper, helper, numpy_helper

from opstudio.core.errors import ModelLoadError, OpstudioError
from opstudio.core.fileio import write_bytes_atomic

# protobuf cannot hold more than 2 GiB in one message; bigger models must keep weights outside.
PROTOBUF_LIMIT = 2**31 - 1
# A lazy load of a bigger file reads the graph without the weights stored in it (``_skim``).
LAZY_INLINE_ABOVE = 64 * 2**20
# ... and leaves in the file only weights at least this big (small ones, shape constants among
# them, are read with the graph: shape inference needs their values)
_SKIM_MIN_BYTES = 64 * 2**10
# Above this we write weights to a side file so the .onnx itself stays parseable.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path: str | os.PathLike[str], *, load_external_data: bool = True,
               name_nodes: bool = True, lazy: bool = False) -> onnx.ModelProto:
    """Load ``path`` as an ONNX model, or raise ``ModelLoadError`` with a one-line reason.

    With ``name_nodes`` every node gets a unique, non-empty name (``<OpType>_<index>`` for unnamed
    ones): profiles, recipes and the GUI all refer to nodes by name. With ``lazy`` the external
    data stays in its files, anchored to the model's folder so that :func:`tensor_array` reads
    a weight when asked (``load_external_data`` is then ignored).
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a directory, not an .onnx file")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ModelLoadError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if size == 0:
        raise ModelLoadError(f"{p}: the file is empty")
    if size > PROTOBUF_LIMIT:
        raise ModelLoadError(
            f"{p}: {size / 2**30:.1f} GiB is over protobuf's 2 GiB limit; "
            "save the model with its weights as external data")
    try:
        data, inline = (_skim(p) if lazy and size > LAZY_INLINE_ABOVE
                        else (p.read_bytes(), []))
    except OSError as exc:
        raise ModelLoadError(f"{p}: cannot read ({exc.strerror or exc})") from None

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"{p}: not a valid ONNX file (truncated or corrupt protobuf: {_short(exc)})") from exc
    except RecursionError:
        raise ModelLoadError(f"{p}: not a valid ONNX file (nested too deeply)") from None
    try:
        bad_text = _bad_text(model)
    except UnicodeDecodeError:
        bad_text = True
    if bad_text:
        raise ModelLoadError(f"{p}: not a valid ONNX file (a name or text field is not "
                             "valid UTF-8)")
    del data
    _check_is_model(p, model)
    _check_versions(p, model)
    _point_at_inline_data(model, p.name, inline)
    _check_external_data(p, model)
    if lazy:
        _anchor_external_data(model, p.parent.resolve())
    elif load_external_data and _has_external_data(model):
        try:
            external_data_helper.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise ModelLoadError(f"{p}: cannot read external data ({_short(exc)})") from exc
    _check_tensors(p, model)
    if name_nodes:
        ensure_node_names(model)
    return model


def ensure_node_names(model: onnx.ModelProto) -> int:
    """Give every top-level node a unique non-empty name; returns how many were renamed."""
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(model.graph.node):
        name = node.name
        if not name or name in seen:
            base = name or f"{node.op_type}_{index}"
            candidate, k = base, 2
            while candidate in seen:
                candidate = f"{base}__{k}"
                k += 1
            node.name = candidate
            renamed += 1
        seen.add(node.name)
    return renamed


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], *,
               overwrite: bool = False) -> Path:
    """Write ``model`` to ``path`` atomically; refuse to replace an existing file unless asked.

    Models too big for one protobuf get their weights in ``<name>.data`` beside the file.
    """
    p = Path(path)
    if is_lazy(model) or inline_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        if p.exists() and not overwrite:
            raise OpstudioError(f"{p}: already exists (choose another name or allow overwriting)")
        _save_with_external_data(model, p)
        return p
    write_bytes_atomic(p, model.SerializeToString(), overwrite=overwrite)
    return p


def _save_with_external_data(model: onnx.ModelProto, p: Path) -> None:
    data_name = p.name + ".data"
    with tempfile.TemporaryDirectory(prefix=".opstudio-save-", dir=p.parent) as tmpdir:
        staged = Path(tmpdir) / p.name
        write_external(model, staged, data_name)
        os.replace(Path(tmpdir) / data_name, p.parent / data_name)
        os.replace(staged, p)


_EXTERNAL_MIN_BYTES = 1024
_ALIGN = 4096  # page-aligned offsets let onnxruntime map big weights instead of copying them


def write_external(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    """Write ``model`` to ``path`` with its top-level initializers in ``data_name`` beside it.

    Tensors are streamed one at a time into the data file and the model file holds only their
    references, so no second copy of the weights is ever built (onnx's own external-data saver
    rewrites the model in place, which would need a copy to keep ``model`` intact). Weights a
    lazy model left in their files are copied from there in chunks.
    """
    skeleton = without_initializers(model)
    initializers = model.graph.initializer
    offset = 0
    with open(path.parent / data_name, "wb") as data:
        for tensor in initializers:
            source = _external_source(tensor)
            if source is None and external_data_helper.uses_external_data(tensor):
                raise OpstudioError(f"tensor '{tensor.name}' still lives in another file; "
                                    "load the model with its external data first")
            out = skeleton.graph.initializer.add()
            if source is None and tensor.ByteSize() < _EXTERNAL_MIN_BYTES:
                out.CopyFrom(tensor)
                continue
            out.name = tensor.name
            out.data_type = tensor.data_type
            out.dims.extend(tensor.dims)
            out.doc_string = tensor.doc_string
            payload = b""
            if source is None:
                payload = (tensor.raw_data if tensor.HasField("raw_data")
                           else onnx.numpy_helper.to_array(tensor).tobytes())
            size = len(payload) if source is None else source[2]
            if size >= 2**20 and offset % _ALIGN:
                pad = _ALIGN - offset % _ALIGN
                data.write(b"\0" * pad)
                offset += pad
            if source is None:
                data.write(payload)
            else:
                _copy_range(source, data)
            del payload
            out.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)),
                               ("length", str(size))):
                entry = out.external_data.add()
                entry.key, entry.value = key, value
            offset += size
    load_weights(skeleton)  # a lazy weight in a subgraph or a Constant goes inline
    write_bytes_atomic(path, skeleton.SerializeToString(), overwrite=True)


# ------------------------------------------------------------------- weights left in their files

def _skim(p: Path) -> tuple[bytes, list[tuple[int, int] | None]]:
    """The bytes of the model at ``p`` without the ``raw_data`` of its big top-level
    initializers, and where each initializer's data lies in the file (offset, length), or None
    where it was kept.

    A walk over protobuf's wire format (a key varint, then a varint, fixed 8 or 4 bytes, or a
    length and that many bytes): only the model, its graph and the graph's initializers are
    entered; everything else is copied as it is. The file is mapped, so the weights are never
    read. Groups (wire types 3 and 4, unused by ONNX) end the skim: the file is then read whole.
    """
    import mmap

    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        buf = memoryview(mapped)
        try:
            spans: list[tuple[int, int] | None] = []
            model = bytearray()
            for field, wire, start, body, end in _fields(buf, 0, len(buf)):
                if field == 7 and wire == 2:  # ModelProto.graph
                    graph = bytearray()
                    for f2, w2, s2, b2, e2 in _fields(buf, body, end):
                        if f2 == 5 and w2 == 2:  # GraphProto.initializer
                            tensor = bytearray()
                            span = None
                            for f3, w3, s3, b3, e3 in _fields(buf, b2, e2):
                                if f3 == 9 and w3 == 2 and e3 - b3 >= _SKIM_MIN_BYTES:
                                    span = (b3, e3 - b3)  # TensorProto.raw_data
                                else:
                                    tensor += buf[s3:e3]
                            spans.append(span)
                            graph += _wire_key(5) + _varint(len(tensor)) + tensor
                        else:
                            graph += buf[s2:e2]
                    model += _wire_key(7) + _varint(len(graph)) + graph
                else:
                    model += buf[start:end]
            return bytes(model), spans
        except _NotSkimmable:
            return bytes(buf), []
        finally:
            buf.release()


class _NotSkimmable(Exception):
    pass


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start, start of the value, end) of each field in buf[pos:end]."""
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, body_end = _read_varint(buf, pos)
            body = pos
        elif wire == 1:
            body, body_end = pos, pos + 8
        elif wire == 2:
            length, body = _read_varint(buf, pos)
            body_end = body + length
        elif wire == 5:
            body, body_end = pos, pos + 4
        else:
            raise _NotSkimmable()
        if body_end > end:
            raise _NotSkimmable()  # truncated: the normal parse says so in words
        yield key >> 3, wire, start, body, body_end
        pos = body_end


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _NotSkimmable()
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _wire_key(field: int) -> bytes:
    return _varint(field << 3 | 2)


def _point_at_inline_data(model: onnx.ModelProto, file_name: str,
                          spans: list[tuple[int, int] | None]) -> None:
    """Make the initializers ``_skim`` left without their data refer to it inside the model
    file itself, as external data would."""
    if not spans:
        return
    for tensor, span in zip(model.graph.initializer, spans):
        if span is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", file_name), ("offset", str(span[0])),
                           ("length", str(span[1]))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value


_BASEPATH = "basepath"


def _anchor_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Record ``folder`` in every external tensor, replacing whatever the file claimed (a
    ``basepath`` in a file would point anywhere: locations were checked against the folder)."""
    for tensor in iter_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        kept = [(e.key, e.value) for e in tensor.external_data if e.key != _BASEPATH]
        del tensor.external_data[:]
        for key, value in [*kept, (_BASEPATH, str(folder))]:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value


def _external_source(tensor: onnx.TensorProto) -> tuple[Path, int, int] | None:
    """(file, offset, length) of a tensor a lazy load left in its file, else None."""
    if not external_data_helper.uses_external_data(tensor):
        return None
    info = {e.key: e.value for e in tensor.external_data}
    if _BASEPATH not in info:
        return None
    target = Path(info[_BASEPATH]) / info.get("location", "")
    offset = int(info.get("offset") or 0)
    length = info.get("length")
    size = int(length) if length else target.stat().st_size - offset
    return target, offset, size


def file_tensor(name: str, data_type: int, dims: Sequence[int], path: Path, offset: int,
                length: int) -> onnx.TensorProto:
    """A tensor whose data lies at ``offset`` in the file ``path``, read on demand as a lazy
    load's weights are (a rewrite that writes its new weights to a file of its own)."""
    out = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims))
    out.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", path.name), ("offset", str(offset)),
                       ("length", str(length)), (_BASEPATH, str(path.parent.resolve()))):
        entry = out.external_data.add()
        entry.key, entry.value = key, value
    return out


def is_lazy(model: onnx.ModelProto) -> bool:
    """True while some weight of ``model`` is still read from its file on demand."""
    return any(is_lazy_tensor(t) for t in iter_all_tensors(model))


def lazy_folders(model: onnx.ModelProto) -> dict[str, str]:
    """The folder each of the graph's weights still in its file is read from, by name: its
    ``location`` is relative to that folder, which readers other than this module's (onnx_ir's
    ``ExternalTensor.base_dir``) must be told."""
    out: dict[str, str] = {}
    for tensor in model.graph.initializer:
        source = _external_source(tensor)
        if source is not None:
            out[tensor.name] = next(e.value for e in tensor.external_data if e.key == _BASEPATH)
    return out


def is_lazy_tensor(tensor: onnx.TensorProto) -> bool:
    """True while ``tensor``'s data is still read from its file on demand."""
    return _external_source(tensor) is not None


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The value of ``tensor``; a weight left in its file is mapped from there, read-only."""
    source = _external_source(tensor)
    if source is None:
        return numpy_helper.to_array(tensor)
    path, offset, size = source
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(int(d) for d in tensor.dims)
    count = math.prod(shape)
    if (tensor.data_type in _PACKED or dtype.itemsize * count != size):
        # sub-byte types (and anything unusual) go through onnx's reader, on a copy
        loaded = onnx.TensorProto()
        loaded.CopyFrom(tensor)
        loaded.raw_data = _read_range(source)
        loaded.data_location = onnx.TensorProto.DEFAULT
        del loaded.external_data[:]
        return numpy_helper.to_array(loaded)
    if count == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


_PACKED = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.BOOL,
           onnx.TensorProto.STRING, *(getattr(onnx.TensorProto, n) for n in (
               "FLOAT4E2M1", "INT2", "UINT2") if hasattr(onnx.TensorProto, n))}


def load_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Read every weight a lazy load left in its file into ``model`` (in place); returns it."""
    for tensor in iter_all_tensors(model):
        source = _external_source(tensor)
        if source is None:
            continue
        tensor.raw_data = _read_range(source)
        tensor.data_location = onnx.TensorProto.DEFAULT  # as onnx's loader leaves it
        del tensor.external_data[:]
    return model


def inline_bytes(model: onnx.ModelProto) -> int:
    """About how many bytes ``model`` serializes to: raw tensor data from its dims and type,
    the rest measured. Cheap: protobuf's ``ByteSize`` of the model would encode every weight."""
    graph = model.graph
    total = sum(part.ByteSize() for field in (graph.node, graph.input, graph.output,
                                               graph.value_info, graph.sparse_initializer,
                                               model.functions) for part in field)
    for tensor in graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            continue
        if not tensor.HasField("raw_data"):  # typed fields (varints): measured, usually small
            total += tensor.ByteSize()
            continue
        count = math.prod(tensor.dims) if tensor.dims else 1
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            itemsize = 8
        total += count * itemsize + 64
    return total


def _read_range(source: tuple[Path, int, int]) -> bytes:
    path, offset, size = source
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OpstudioError(f"{path}: ends before the weights it should hold (file truncated?)")
    return data


_COPY_CHUNK = 64 * 2**20


def _copy_range(source: tuple[Path, int, int], out) -> None:
    path, offset, size = source
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while left > 0:
            chunk = f.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise OpstudioError(f"{path}: ends before the weights it should hold "
                                    "(file truncated?)")
            out.write(chunk)
            left -= len(chunk)


def stored_bytes(path: str | os.PathLike[str], model: onnx.ModelProto | None = None) -> int:
    """The size on disk of the .onnx file plus the external-data files it references
    (``model``: its graph, when the caller has read it)."""
    p = Path(path)
    total = p.stat().st_size
    if model is None:
        try:
            model = load_model(p, load_external_data=False, name_nodes=False)
        except OpstudioError:
            return total
    seen: set[str] = set()
    for t in iter_all_tensors(model):
        for entry in t.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                side = p.parent / entry.value
                if side.is_file():
                    total += side.stat().st_size
    return total


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    pa, pb = Path(a), Path(b)
    try:
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except OSError:
        return pa.resolve() == pb.resolve()


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose top-level graph has no initializers (their data is not copied)."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    return out


def model_size(model: onnx.ModelProto) -> int:
    """The bytes ``model`` takes as a file: exact for a small model; for a big one its
    structure (with ``Constant`` tensors) encoded plus its initializers' data counted, so no
    weight is encoded again just to be measured."""
    overhead = 12  # tag, lengths, type and dims of one TensorProto, give or take
    about = without_initializers(model).ByteSize() + sum(
        _data_bytes(t) + len(t.name) + overhead for t in model.graph.initializer)
    return model.ByteSize() if about < 2**26 and not is_lazy(model) else about


def _data_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    source = _external_source(tensor)
    if source is not None:  # left in its file: counted, the file written will hold it
        return source[2]
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    count = 1
    for d in tensor.dims:
        count *= d
    try:
        size = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        size = 1
    return count * size


def _copy_fields(src: Message, dst: Message, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if _is_repeated(field):
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def iter_all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes, in subgraphs too."""
    yield from _graph_tensors(model.graph)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def _check_is_model(p: Path, model: onnx.ModelProto) -> None:
    # protobuf parses many unrelated messages (or random bytes) "successfully"; a real model
    # always carries an IR version and a graph.
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise ModelLoadError(f"{p}: a protobuf file, but not an ONNX model (no IR version or graph)")
    if len(model.graph.node) == 0 and len(model.graph.output) == 0:
        raise ModelLoadError(f"{p}: the ONNX graph is empty (no nodes, no outputs)")


def _check_versions(p: Path, model: onnx.ModelProto) -> None:
    if model.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(
            f"{p}: IR version {model.ir_version} is newer than this onnx supports "
            f"({onnx.IR_VERSION}); upgrade onnx or re-export the model")
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise ModelLoadError(
                f"{p}: opset {opset.version} is newer than this onnx supports ({newest}); "
                "upgrade onnx or re-export the model with an older opset")
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import) and model.ir_version >= 3:
        uses_default = any(n.domain in ("", "ai.onnx") for n in model.graph.node)
        if uses_default:
            raise ModelLoadError(f"{p}: the model uses standard ops but imports no ONNX opset")


def _bad_text(message) -> bool:
    """True if a text field is not valid UTF-8. protobuf hands such a field back as ``bytes``
    (or raises on first access), which would break whatever reads the name later."""
    if isinstance(message, onnx.TensorProto):
        # never list a tensor's fields: that would copy its data
        texts = [message.name, message.doc_string,
                 *(x for e in message.external_data for x in (e.key, e.value))]
        return any(not isinstance(t, str) for t in texts)
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            items = value if _is_repeated(field) else [value]
            if any(_bad_text(item) for item in items):
                return True
        elif field.type == FieldDescriptor.TYPE_STRING:
            texts = list(value) if _is_repeated(field) else [value]
            if any(not isinstance(t, str) for t in texts):
                return True
    return False


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 6 has .is_repeated; older ones only .label (which newer stubs no longer list)
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return bool(getattr(field, "label", None) == FieldDescriptor.LABEL_REPEATED)


def _check_tensors(p: Path, model: onnx.ModelProto) -> None:
    # A tensor whose data does not fill its declared shape ([2147483647] holding 8 bytes) would
    # otherwise surface much later: shape inference crawls for minutes over such a claim.
    for tensor in iter_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            continue  # not loaded: its size was checked against the side file above
        try:
            onnx.checker.check_tensor(tensor)
        except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
            what = f"tensor '{tensor.name}'" if tensor.name else "a constant tensor"
            raise ModelLoadError(f"{p}: {what} is malformed ({_short(exc)})") from exc


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(external_data_helper.uses_external_data(t) for t in iter_all_tensors(model))


def _check_external_data(p: Path, model: onnx.ModelProto) -> None:
    base = p.parent.resolve()
    for tensor in iter_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise ModelLoadError(f"{p}: tensor '{tensor.name}' is external but names no file")
        if os.path.isabs(location) or location.startswith(("\\", "/")) or ":" in location[:3]:
            raise ModelLoadError(
                f"{p}: tensor '{tensor.name}' points to '{location}', an absolute path outside "
                "the model's folder; refused")
        target = (base / location).resolve()
        if target != base and base not in target.parents:
            raise ModelLoadError(
                f"{p}: tensor '{tensor.name}' points to '{location}', outside the model's "
                "folder; refused")
        if not target.is_file():
            raise ModelLoadError(
                f"{p}: external data file '{location}' for tensor '{tensor.name}' is missing")
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError:
            raise ModelLoadError(
                f"{p}: tensor '{tensor.name}' has a malformed external-data offset/length") from None
        fsize = target.stat().st_size
        if offset < 0 or offset > fsize or (length is not None and (length < 0 or offset + length > fsize)):
            raise ModelLoadError(
                f"{p}: external data for tensor '{tensor.name}' lies beyond the end of "
                f"'{location}' (file truncated?)")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
