"""An optimized model written as a folder its runtime loads, when it came from one.

onnxruntime-genai loads a folder: ``genai_config.json`` names the model file and records the
attention geometry, the tokenizer files sit beside it. An HF/optimum export is also a folder:
``config.json``, ``generation_config.json`` and the tokenizer beside ``model.onnx``. Writing
only the ``.onnx`` leaves the user to copy the rest by hand, and after head pruning the copied
config would be wrong. So a model that sits in such a folder is exported as one:

- the model (and its external data) under its own file name;
- the config with what the plan changed: the model's file name (genai), the query head count
  after head pruning (genai from the GroupQueryAttention nodes themselves; HF from the pruning
  steps, with ``head_dim`` written out so a loader that derives it from the hidden size still
  gets it right), the intermediate size after MLP pruning where the config records it. A config
  holds one number for all layers: when the plan left layers differing, it is kept and a note
  says so. Everything else (search options, token ids) is left as it was;
- the tokenizer, chat template and generation files copied.

The folder is staged beside the target and moved in place at the end: a new folder by one
rename, an existing one (empty, or replaced with ``overwrite``) file by file, each atomically.
Files of an existing folder the export does not write are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.model.model_io import save_model

GENAI_CONFIG = "genai_config.json"
HF_CONFIG = "config.json"
# what a runtime reads besides the model and its config
COMPANIONS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
    "chat_template.json", "generation_config.json", "preprocessor_config.json",
    "processor_config.json",
)


@dataclass
class FolderExport:
    folder: Path
    model: Path
    kind: str  # "genai" or "hf": the runtime the source folder was made for
    # every runtime the folder loads in, ``kind`` first: an HF folder whose attention is
    # GroupQueryAttention also loads in onnxruntime-genai; a folder with both configs in both
    runtimes: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # file names, in the folder
    changed: dict[str, Any] = field(default_factory=dict)  # config key -> new value
    notes: list[str] = field(default_factory=list)


def runtime_kind(model_path: str | Path) -> str | None:
    """"genai" for a model in an onnxruntime-genai folder, "hf" for one beside an HF/optimum
    ``config.json``, None for a model on its own."""
    folder = Path(model_path).absolute().parent
    if (folder / GENAI_CONFIG).is_file():
        return "genai"
    if (folder / HF_CONFIG).is_file():
        return "hf"
    return None


def wants_folder(output: str | Path) -> bool:
    """``-o DIR/`` or ``-o`` an existing folder: the output is a folder, not a file name."""
    text = os.fspath(output)
    return text.endswith(("/", os.sep)) or Path(text).is_dir()


def check_target(source: Path, target: Path, *, overwrite: bool = False) -> str:
    """The source's runtime kind, once ``target`` is known to be a folder the export may
    write: checked before the work, so a long optimization never ends in a refusal."""
    kind = runtime_kind(source)
    if kind is None:
        raise OpstudioError(f"{source}: has no {GENAI_CONFIG} or {HF_CONFIG} beside it, so it "
                            "is not part of a runtime folder; write it as a file instead")
    if target.exists() and not target.is_dir():
        raise OpstudioError(f"{target}: is a file, not a folder")
    if target.absolute().resolve() == source.absolute().parent.resolve():
        raise OpstudioError(f"{target}: is the original model's folder; choose another one")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OpstudioError(f"{target}: is a folder that is not empty "
                            "(use --overwrite to replace the files the export writes)")
    parent = target.absolute().parent
    if not parent.is_dir():
        raise OpstudioError(f"{target}: folder {parent} does not exist")
    return kind


def write_folder(model: onnx.ModelProto, source: str | Path, folder: str | Path, *,
                 steps: Sequence[Any] = (), overwrite: bool = False) -> FolderExport:
    """Write ``model`` (optimized from ``source``) into ``folder`` as its runtime loads it;
    ``steps`` are the optimizer's step reports (``optimize.StepReport``)."""
    src, target = Path(source), Path(folder)
    kind = check_target(src, target, overwrite=overwrite)
    parent = target.absolute().parent
    out = FolderExport(folder=target, model=target / src.name, kind=kind, runtimes=[kind])
    # a folder may serve both runtimes: each config it has is updated and written
    configs: dict[str, dict[str, Any]] = {}
    if (src.parent / GENAI_CONFIG).is_file():
        configs[GENAI_CONFIG] = _read_json(src.parent / GENAI_CONFIG)
        _update_genai(configs[GENAI_CONFIG], model, src.name, out)
    if (src.parent / HF_CONFIG).is_file():
        hf = configs[HF_CONFIG] = _read_json(src.parent / HF_CONFIG)
        _update_hf(hf, steps, out)
        _note_mlp(hf, steps, out)
        genai = None if GENAI_CONFIG in configs else _genai_for_hf(hf, src.parent, model,
                                                                    src.name)
        if genai is not None:
            configs[GENAI_CONFIG] = genai
            out.notes.append(f"{GENAI_CONFIG} written too: the attention is GroupQueryAttention "
                             "now, so onnxruntime-genai loads the folder, past and present in "
                             "one buffer (past_present_share_buffer)")
    out.runtimes = [kind, *(k for k, name in (("genai", GENAI_CONFIG), ("hf", HF_CONFIG))
                            if k != kind and name in configs)]

    with tempfile.TemporaryDirectory(prefix=".opstudio-export-", dir=parent) as tmp:
        staged = Path(tmp) / "out"
        staged.mkdir()
        save_model(model, staged / src.name)
        for name, config in configs.items():
            (staged / name).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        for name in COMPANIONS:
            if (src.parent / name).is_file():
                shutil.copy2(src.parent / name, staged / name)
        out.written = sorted(p.name for p in staged.iterdir())
        if not target.exists():
            os.rename(staged, target)
        else:
            for p in staged.iterdir():
                os.replace(p, target / p.name)
    return out


def _genai_for_hf(config: dict[str, Any], folder: Path, model: onnx.ModelProto,
                  file_name: str) -> dict[str, Any] | None:
    from opstudio.core.plan.genai_config import genai_config

    generation = folder / "generation_config.json"
    return genai_config(config, _read_json(generation) if generation.is_file() else {},
                        model, file_name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OpstudioError(f"{path}: cannot be read as JSON ({exc})") from None
    if not isinstance(value, dict):
        raise OpstudioError(f"{path}: is not a JSON object")
    return value


def _set(section: dict[str, Any], key: str, value: Any, out: FolderExport, where: str) -> None:
    if section.get(key) != value:
        section[key] = value
        out.changed[f"{where}{key}"] = value


def _update_genai(config: dict[str, Any], model: onnx.ModelProto, file_name: str,
                  out: FolderExport) -> None:
    decoder = config.get("model", {}).get("decoder")
    if not isinstance(decoder, dict):
        raise OpstudioError(f"{GENAI_CONFIG}: has no model.decoder section")
    where = "model.decoder."
    _set(decoder, "filename", file_name, out, where)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    for attr, key in (("num_heads", "num_attention_heads"),
                      ("kv_num_heads", "num_key_value_heads")):
        values = {onnx.helper.get_attribute_value(a) for n in gqa for a in n.attribute
                  if a.name == attr}
        if len(values) == 1:
            _set(decoder, key, int(values.pop()), out, where)
        elif len(values) > 1:
            out.notes.append(f"the layers now have {_span(values)} {key.replace('_', ' ')}; "
                             f"{GENAI_CONFIG} holds one number, left at {decoder.get(key)}")


def _update_hf(config: dict[str, Any], steps: Sequence[Any], out: FolderExport) -> None:
    after = _last_values(steps, "heads_after")
    if not after:
        return
    before = config.get("num_attention_heads")
    layers = config.get("num_hidden_layers")
    values = set(after.values())
    if len(values) == 1 and len(after) == layers and isinstance(before, int):
        hidden = config.get("hidden_size")
        if "head_dim" not in config and isinstance(hidden, int):
            # loaders derive it as hidden_size / num_attention_heads, which no longer holds
            _set(config, "head_dim", hidden // before, out, "")
        _set(config, "num_attention_heads", values.pop(), out, "")
    else:
        out.notes.append(f"head pruning left {len(after)} of {layers} layers with "
                         f"{_span(values)} query heads; {HF_CONFIG} holds one number, "
                         f"num_attention_heads left at {before}")


def _note_mlp(config: dict[str, Any], steps: Sequence[Any], out: FolderExport) -> None:
    after = _last_values(steps, "channels_after", joint_only=True)
    if not after or "intermediate_size" not in config:
        return
    layers = config.get("num_hidden_layers")
    values = set(after.values())
    if len(values) == 1 and len(after) == layers:
        _set(config, "intermediate_size", values.pop(), out, "")
    else:
        out.notes.append(f"MLP pruning left {len(after)} of {layers} layers with "
                         f"{_span(values)} intermediate channels; the config holds one number, "
                         f"intermediate_size left at {config['intermediate_size']}")


def _last_values(steps: Sequence[Any], key: str, joint_only: bool = False) -> dict[str, int]:
    """Node -> the last value a pruning step recorded for it (a later step prunes further)."""
    found: dict[str, int] = {}
    for step in steps:
        for node, details in getattr(step, "details", {}).items():
            if key in details and (not joint_only or "joint" in details):
                found[node] = int(details[key])
    return found


def _span(values: set[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"



def check_loads(export: FolderExport, *, tokens: int = 8) -> str | None:
    """Load the written folder the way its runtime does and generate ``tokens`` greedily;
    what was checked, or None when that runtime is not installed (genai)."""
    config = _read_json(export.folder / (GENAI_CONFIG if export.kind == "genai" else HF_CONFIG))
    section = config.get("model", config) if export.kind == "genai" else config
    bos = section.get("bos_token_id")
    prompt = [bos if isinstance(bos, int) and not isinstance(bos, bool) else 0]
    if len(export.runtimes) > 1:
        each = [check_loads(FolderExport(export.folder, export.model, k), tokens=tokens)
                for k in export.runtimes]
        return "; ".join(e for e in each if e) or None
    if export.kind == "genai":
        try:
            import onnxruntime_genai as og
        except ImportError:
            return None
        try:
            model = og.Model(str(export.folder))
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + tokens, do_sample=False)
            generator = og.Generator(model, params)
            generator.append_tokens(np.array([prompt], dtype=np.int32))
            made = 0
            while made < tokens and not generator.is_done():
                generator.generate_next_token()
                made += 1
        except Exception as exc:  # onnxruntime-genai raises RuntimeError with its own text
            raise OpstudioError(f"wrote {export.folder}, but onnxruntime-genai cannot run it: "
                                f"{_first_line(exc)}") from None
        return f"onnxruntime-genai loads {export.folder} and generated {made} token(s)"
    from opstudio.core.measure.generate import Greedy

    try:
        runner = Greedy(export.model, np.array(prompt))
        for _ in range(tokens):
            runner.step()
    except OpstudioError as exc:
        raise OpstudioError(f"wrote {export.folder}, but its model does not generate: "
                            f"{exc}") from None
    return (f"onnxruntime runs {export.model} as a decoder with its cache fed back and "
            f"generated {tokens} token(s)")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
