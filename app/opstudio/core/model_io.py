"""Reading and writing ONNX files safely.

``load_model`` turns every way a file can be wrong into one ``ModelLoadError`` line that names the
file and the cause. External data is confined to the model's folder: a location that is absolute
or climbs out of it (``../../etc/passwd``, a symlink) is refused before anything is read.
``save_model`` writes atomically (temp file + rename) and never replaces an existing file unless
asked to.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from onnx import external_data_helper

from opstudio.core.errors import ModelLoadError, OpstudioError
from opstudio.core.fileio import write_bytes_atomic

# protobuf cannot hold more than 2 GiB in one message; bigger models must keep weights outside.
PROTOBUF_LIMIT = 2**31 - 1
# Above this we write weights to a side file so the .onnx itself stays parseable.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path: str | os.PathLike[str], *, load_external_data: bool = True,
               name_nodes: bool = True) -> onnx.ModelProto:
    """Load ``path`` as an ONNX model, or raise ``ModelLoadError`` with a one-line reason.

    With ``name_nodes`` every node gets a unique, non-empty name (``<OpType>_<index>`` for unnamed
    ones): profiles, recipes and the GUI all refer to nodes by name.
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
        data = p.read_bytes()
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
    _check_is_model(p, model)
    _check_versions(p, model)
    _check_external_data(p, model)
    if load_external_data and _has_external_data(model):
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
    if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
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
    rewrites the model in place, which would need a copy to keep ``model`` intact).
    """
    skeleton = without_initializers(model)
    initializers = model.graph.initializer
    offset = 0
    with open(path.parent / data_name, "wb") as data:
        for tensor in initializers:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise OpstudioError(f"tensor '{tensor.name}' still lives in another file; "
                                    "load the model with its external data first")
            out = skeleton.graph.initializer.add()
            if tensor.ByteSize() < _EXTERNAL_MIN_BYTES:
                out.CopyFrom(tensor)
                continue
            out.name = tensor.name
            out.data_type = tensor.data_type
            out.dims.extend(tensor.dims)
            out.doc_string = tensor.doc_string
            payload = (tensor.raw_data if tensor.HasField("raw_data")
                       else onnx.numpy_helper.to_array(tensor).tobytes())
            if len(payload) >= 2**20 and offset % _ALIGN:
                pad = _ALIGN - offset % _ALIGN
                data.write(b"\0" * pad)
                offset += pad
            data.write(payload)
            out.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)),
                               ("length", str(len(payload)))):
                entry = out.external_data.add()
                entry.key, entry.value = key, value
            offset += len(payload)
    write_bytes_atomic(path, skeleton.SerializeToString(), overwrite=True)


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
    return model.ByteSize() if about < 2**26 else about


def _data_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data") or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return len(tensor.raw_data)
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
