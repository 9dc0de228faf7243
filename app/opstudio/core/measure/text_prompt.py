"""Real text to judge a language model on: a passage, tokenized with the model's own tokenizer.

Next-token agreement and KL measured on random token ids say nothing about quality: after
nonsense the next token is arbitrary, and a rewrite that keeps a model's English intact may
still change it. So when no ``--inputs`` is given and the model has a token-ids input, a text is
tokenized with the model's tokenizer and fed as a prompt, the way a user saves one for
``--inputs``: ``input_ids`` [1, n], an ``attention_mask`` of ones, ``position_ids`` 0…n−1 and an
empty past (``inputs.build_inputs`` in the prefill phase). The accuracy figures are judged on
that prompt and calibration runs on it; timing keeps its own inputs.

- The text is the built-in passage (``opstudio/_resources/prompt_passage.txt``: ordinary English
  prose of five kinds, a news item, a story, an explanation, a recipe and a letter, about 300
  words, written for opstudio) or a file the user names (``--prompt-text``). No chat template
  is applied; the tokenizer adds its own special tokens (a BOS) as its post-processor says.
- The tokenizer is a Hugging Face ``tokenizer.json`` (read with the ``tokenizers`` package):
  the one named (``--tokenizer``, a file or a folder holding one), else the one beside the
  model (its folder, as onnxruntime-genai and optimum write them, or the folder above, as
  repositories with an ``onnx/`` folder keep them).
- Without a tokenizer the figures are judged on synthetic tokens and say so (``SYNTHETIC``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.measure.accuracy import SYNTHETIC

TOKENIZER_FILE = "tokenizer.json"
BUILTIN_NAME = "the built-in text"
# the built-in passage is about 300 words: a few hundred tokens with any tokenizer
MAX_TOKENS = 1024


@dataclass(frozen=True)
class Judging:
    """What the accuracy of a comparison is judged on: ``feed`` when a text prompt replaces
    the timing inputs (None: the timing inputs themselves), and in words (``judged_on``:
    "the built-in text (312 tokens)", "prompt.npz", ``SYNTHETIC``, or "" for a model that
    reads no tokens)."""

    feed: dict[str, np.ndarray] | None
    judged_on: str

    @property
    def synthetic(self) -> bool:
        return self.judged_on == SYNTHETIC


@dataclass(frozen=True)
class TextPrompt:
    feed: dict[str, np.ndarray]
    tokens: int
    text_name: str  # BUILTIN_NAME or the text file's name
    tokenizer: Path

    def describe(self) -> str:
        """ "the built-in text (312 tokens)" """
        return f"{self.text_name} ({self.tokens} tokens)"


def builtin_text() -> str:
    path = importlib_resources.files("opstudio") / "_resources" / "prompt_passage.txt"
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OpstudioError(f"the built-in prompt passage is missing from this installation "
                            f"({exc.strerror or exc}); give a text with --prompt-text") from None


def read_text(path: str | Path | None) -> tuple[str, str]:
    """The text and what to call it: the built-in passage when ``path`` is None."""
    if path is None:
        return builtin_text(), BUILTIN_NAME
    p = Path(path)
    if not p.is_file():
        raise OpstudioError(f"{p}: no such file (the prompt text)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise OpstudioError(f"{p}: not a UTF-8 text file (the prompt text)") from None
    if not text.strip():
        raise OpstudioError(f"{p}: the prompt text is empty")
    return text, p.name


def find_tokenizer(model_path: str | Path | None) -> Path | None:
    """``tokenizer.json`` beside the model, or in the folder above its own."""
    if model_path is None:
        return None
    folder = Path(model_path).absolute().parent
    for candidate in (folder / TOKENIZER_FILE, folder.parent / TOKENIZER_FILE):
        if candidate.is_file():
            return candidate
    return None


def named_tokenizer(path: str | Path) -> Path:
    """The tokenizer a user named: a ``tokenizer.json``, or a folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise OpstudioError(f"{p}: no such file (the tokenizer: a Hugging Face tokenizer.json)")
    return p


def tokenize(text: str, tokenizer: str | Path) -> np.ndarray:
    """Token ids [1, n] of ``text`` (int64), special tokens as the tokenizer adds them."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # a dependency; an installation without it still runs on synthetic ids
        raise OpstudioError("reading a tokenizer needs the 'tokenizers' package: "
                            "pip install tokenizers") from None
    try:
        tok = Tokenizer.from_file(str(tokenizer))
    except Exception as exc:  # tokenizers raises its own Exception for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise OpstudioError(f"{tokenizer}: not a tokenizer file that can be read "
                            f"({first})") from None
    ids = tok.encode(text).ids
    if not ids:
        raise OpstudioError(f"{tokenizer}: the text gives no tokens")
    return np.asarray(ids, dtype=np.int64)[None, :]


def text_prompt(model: onnx.ModelProto, model_path: str | Path | None, *,
                tokenizer: str | Path | None = None, text: str | Path | None = None,
                dims: Mapping[str, int] | None = None) -> TextPrompt | None:
    """The prompt of the text (default the built-in passage) for ``model``, or None when the
    model reads no token ids or no tokenizer is named or found beside it."""
    from opstudio.core.measure.inputs import build_inputs, index_bounds
    from opstudio.core.model.phases import is_past_length_name, kv_layout

    layout = kv_layout(model)
    ids_name = layout.ids_input
    if ids_name is None:
        return None
    found = named_tokenizer(tokenizer) if tokenizer is not None else find_tokenizer(model_path)
    if found is None:
        return None
    words, name = read_text(text)
    ids = tokenize(words, found)
    bounds = index_bounds(model)
    rows = bounds.get(ids_name)
    if rows is not None and int(ids.max()) >= rows:
        raise OpstudioError(
            f"{found}: gives token ids up to {int(ids.max())}, but the model's embedding has "
            f"{rows} rows: it is not this model's tokenizer (name another with --tokenizer)")
    # positions beyond a learned position table, or a sequence dim fixed in the model, end it
    limit = min([MAX_TOKENS, *(v for k, v in bounds.items() if "position" in k.lower())])
    ids_spec = next(i for i in model.graph.input if i.name == ids_name)
    seq = ids_spec.type.tensor_type.shape.dim[1]
    if seq.HasField("dim_value") and seq.dim_value > 0:
        if ids.shape[1] < seq.dim_value:
            return None
        limit = min(limit, seq.dim_value)
    ids = ids[:, :limit]
    lengths = {*layout.seq, *layout.past, *layout.total}
    # the prompt is one sequence: keep only the dims that are not lengths or the batch
    fixed = {k: v for k, v in (dims or {}).items()
             if k not in lengths and not is_past_length_name(k) and "batch" not in k.lower()}
    feed = build_inputs(model, fixed, None, {ids_name: ids}, phase="prefill" if
                        layout.has_cache else None, model_path=model_path)
    return TextPrompt(feed=feed, tokens=int(ids.shape[1]), text_name=name, tokenizer=found)


def judging(model: onnx.ModelProto, model_path: str | Path | None, settings: Any) -> Judging:
    """What a comparison's accuracy is judged on under ``settings`` (a ``ProfileSettings``):
    the user's ``--inputs``, else the text prompt when a tokenizer is at hand, else the timing
    inputs, called synthetic tokens for a model that reads token ids."""
    from opstudio.core.model.phases import kv_layout

    if settings.inputs_path:
        return Judging(None, Path(settings.inputs_path).name)
    prompt = text_prompt(model, model_path, tokenizer=settings.tokenizer,
                         text=settings.prompt_text, dims=settings.dims)
    if prompt is not None:
        return Judging(prompt.feed, prompt.describe())
    if settings.tokenizer is None and settings.prompt_text is not None \
            and kv_layout(model).ids_input is not None:
        raise OpstudioError("--prompt-text: no tokenizer.json beside the model to tokenize "
                            "the text with; name one with --tokenizer")
    return Judging(None, SYNTHETIC if kv_layout(model).ids_input is not None else "")


def prompt_file(feed: Mapping[str, np.ndarray]) -> Path:
    """The prompt saved as an ``.npz`` in the user's cache (named by its content, so the same
    prompt is one file and caches keyed on it stay valid): for what reads a prompt file."""
    import io

    from opstudio.core.cache import cache_dir
    from opstudio.core.fileio import write_bytes_atomic

    buf = io.BytesIO()
    save: Any = np.savez  # keyword arrays; numpy's stub types the keywords as its options
    save(buf, **{k: np.asarray(v) for k, v in feed.items()})
    data = buf.getvalue()
    path = cache_dir() / "prompts" / f"{hashlib.sha256(data).hexdigest()[:24]}.npz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data, overwrite=True)
    return path


def with_text_prompt(settings: Any, model_path: str | Path) -> tuple[Any, str]:
    """``settings`` whose ``inputs_path`` is the text prompt when none was given and a
    tokenizer is at hand, and what the figures are judged on: for the next-token planner,
    which reads its prompt from a file."""
    import dataclasses

    from opstudio.core.model.model_io import load_model

    model = load_model(model_path, load_external_data=False)
    judged = judging(model, model_path, settings)
    if judged.feed is None:
        return settings, judged.judged_on
    return (dataclasses.replace(settings, inputs_path=str(prompt_file(judged.feed))),
            judged.judged_on)
