"""Greedy text from a language model and its optimized version, side by side.

Numbers (next-token agreement, KL) decide; a person believes the text. So a prompt is tokenized
with the model's own ``tokenizer.json`` (``text_prompt.find_tokenizer``: beside the model, as
onnxruntime-genai and optimum folders keep it, or named), optionally wrapped in the tokenizer's
chat template, and each model continues it greedily on onnxruntime: a prefill of the prompt,
then one token at a time with the ``present.*`` outputs fed back as the past (the same feeds as
``inputs.decode_after_prompt``; a model without a KV cache reruns the whole sequence). The
models take turns token by token, so their timings share the machine's state: time to first
token is the prefill, tokens/s the decode steps after it. Generation stops at ``max_tokens``
or an end-of-sequence token (from ``genai_config.json``, ``generation_config.json``,
``config.json`` or the tokenizer config).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.measure.text_prompt import find_tokenizer, named_tokenizer
from opstudio.core.progress import CancelCheck, Progress, clamped, stopper

CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass
class Generation:
    """One model's continuation of the prompt."""

    label: str
    tokens: list[int] = field(default_factory=list)  # generated ids, the prompt not included
    text: str = ""
    first_token_s: float = 0.0  # the prefill: prompt in, first new token out
    decode_s: float = 0.0  # every step after it
    decode_steps: int = 0
    stopped_at_eos: bool = False

    @property
    def tokens_per_s(self) -> float | None:
        steps = self.decode_steps
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "text": self.text, "tokens": self.tokens,
                "time_to_first_token_s": self.first_token_s,
                "tokens_per_s": self.tokens_per_s, "stopped_at_eos": self.stopped_at_eos}


@dataclass
class SideBySide:
    prompt: str  # as fed, after any chat template
    prompt_tokens: int
    tokenizer: Path
    runs: list[Generation]
    diverges_at: int | None = None  # index of the first generated token that differs

    def marked(self, run: Generation, mark: str = "⟦") -> str:
        """The run's text with ``mark`` before the first token that differs."""
        return marked_text(self.tokenizer, run.tokens, self.diverges_at, mark)

    def parted(self) -> tuple[str, ...]:
        """Each run's token where the texts part, quoted ("(ended)" for a text that ended)."""
        at = self.diverges_at
        if at is None:
            return ()
        tok = load_tokenizer(self.tokenizer)
        return tuple(repr(str(tok.decode([r.tokens[at]]))) if at < len(r.tokens) else "(ended)"
                     for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "prompt_tokens": self.prompt_tokens,
                "tokenizer": str(self.tokenizer), "diverges_at": self.diverges_at,
                "runs": [r.to_json() for r in self.runs]}


def tokenizer_for(model_path: str | Path, named: str | Path | None = None) -> Path:
    """The tokenizer named, else the one beside the model; a clear error without one."""
    if named is not None:
        return named_tokenizer(named)
    found = find_tokenizer(model_path)
    if found is None:
        raise OpstudioError(f"{model_path}: no tokenizer.json beside the model; name one with "
                            "--tokenizer FILE (a Hugging Face tokenizer.json)")
    return found


def load_tokenizer(path: str | Path) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OpstudioError("reading a tokenizer needs the 'tokenizers' package: "
                            "pip install tokenizers") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise OpstudioError(f"{path}: not a tokenizer file that can be read ({first})") from None


def _tokenizer_config(tokenizer: Path) -> dict[str, Any]:
    path = tokenizer.parent / "tokenizer_config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("content", "")
    return value if isinstance(value, str) else ""


def chat_template(tokenizer: Path) -> str | None:
    """The tokenizer's chat template: in its config, or ``chat_template.jinja`` beside it."""
    template = _tokenizer_config(tokenizer).get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(template, str) and template.strip():
        return template
    path = tokenizer.parent / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return None


def apply_chat(prompt: str, tokenizer: Path) -> str:
    """``prompt`` as the user's turn of a chat, ready for the assistant's answer."""
    template = chat_template(tokenizer)
    if template is None:
        raise OpstudioError(f"{tokenizer}: its tokenizer config has no chat template "
                            "(leave out --chat to use the prompt as it is)")
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise OpstudioError("--chat renders the chat template with jinja2: "
                            "pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise OpstudioError(f"the chat template refused the prompt: {message}")

    config = _tokenizer_config(tokenizer)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")))
    except TemplateError as exc:
        raise OpstudioError(f"{tokenizer}: its chat template cannot be applied ({exc})") from None


def eos_ids(model_path: str | Path, tokenizer: Path) -> set[int]:
    """End-of-sequence ids the model's folder declares."""
    folder = Path(model_path).absolute().parent
    found: set[int] = set()
    for name, keys in (("genai_config.json", ("model", "eos_token_id")),
                       ("generation_config.json", ("eos_token_id",)),
                       ("config.json", ("eos_token_id",))):
        try:
            value: Any = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        values = value if isinstance(value, list) else [value]
        found.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    eos = _token_text(_tokenizer_config(tokenizer).get("eos_token"))
    if eos:
        token = load_tokenizer(tokenizer).token_to_id(eos)
        if token is not None:
            found.add(int(token))
    return found


class Greedy:
    """One model generating greedily: ``step()`` gives the next token id."""

    def __init__(self, model: onnx.ModelProto | str | Path, prompt: np.ndarray, *,
                 model_path: str | Path | None = None, threads: int = 0) -> None:
        from opstudio.core.model.model_io import load_model
        from opstudio.core.model.phases import kv_layout
        from opstudio.core.model.runtime import create_session, session_options

        if isinstance(model, onnx.ModelProto):
            graph_only = model
        else:
            graph_only = load_model(model, load_external_data=False)
        # the folder the KV geometry is read from (genai_config.json): the original's
        self.model = graph_only
        self.model_path = model_path if model_path is not None or \
            isinstance(model, onnx.ModelProto) else model
        self.layout = kv_layout(graph_only)
        if self.layout.ids_input is None:
            raise OpstudioError("generating text needs a model that reads token ids "
                                "(an input such as input_ids [batch, sequence])")
        options = session_options(threads=threads)
        try:
            self.session = create_session(model, options)
        except Exception as exc:  # onnxruntime raises its own types
            raise OpstudioError(f"onnxruntime cannot load the model: "
                                f"{str(exc).strip().splitlines()[0][:200]}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ids = np.asarray(prompt, dtype=np.int64).reshape(1, -1)
        self.feeds: dict[str, np.ndarray] | None = None

    def _prefill_feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        from opstudio.core.measure.inputs import build_inputs

        ids_name = self.layout.ids_input
        assert ids_name is not None
        supplied: dict[str, np.ndarray] = {ids_name: ids}
        mask = next((s.name for s in self.session.get_inputs() if "mask" in s.name.lower()),
                    None)
        if mask is not None:
            supplied[mask] = np.ones_like(ids)
        feeds = build_inputs(self.model, {}, None, supplied,
                             phase="prefill" if self.layout.has_cache else None,
                             model_path=self.model_path)
        for spec in self.session.get_inputs():
            if "position_ids" in spec.name.lower():
                feeds[spec.name] = np.arange(ids.shape[1], dtype=np.int64).reshape(1, -1)
        return feeds

    def _decode_feeds(self, token: int, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from opstudio.core.measure.inputs import present_outputs

        assert self.feeds is not None
        total = int(self.ids.shape[1])
        feeds: dict[str, np.ndarray] = {}
        for name, old in self.feeds.items():
            low = name.lower()
            if name == self.layout.ids_input:
                feeds[name] = np.array([[token]], dtype=old.dtype)
            elif "mask" in low and old.ndim == 2:
                feeds[name] = np.ones((1, total), dtype=old.dtype)
            elif "position_ids" in low:
                feeds[name] = np.array([[total - 1]], dtype=old.dtype)
            else:
                feeds[name] = old
        for name, value in present_outputs(self.layout, outputs).items():
            feeds[name] = value.astype(self.feeds[name].dtype, copy=False)
        return feeds

    def step(self) -> tuple[int, float]:
        """The next token and the seconds the model took to give it."""
        from opstudio.core.measure.inputs import logits_output

        if self.feeds is None or not self.layout.has_cache:
            self.feeds = self._prefill_feeds(self.ids)
        start = time.perf_counter()
        values = self.session.run(self.output_names, self.feeds)
        outputs = dict(zip(self.output_names, values))
        token = int(logits_output(outputs)[0, -1].argmax())
        seconds = time.perf_counter() - start
        self.ids = np.concatenate([self.ids, [[token]]], axis=1)
        if self.layout.has_cache:
            self.feeds = self._decode_feeds(token, outputs)
        return token, seconds


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ (one ending first counts)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def marked_text(tokenizer: Path, tokens: Sequence[int], at: int | None, mark: str) -> str:
    tok = load_tokenizer(tokenizer)
    if at is None or at > len(tokens):
        return str(tok.decode(list(tokens)))
    head = str(tok.decode(list(tokens[:at])))
    whole = str(tok.decode(list(tokens)))
    # decoding the head alone can differ from the whole at the seam (a split character)
    if whole.startswith(head):
        return head + mark + whole[len(head):]
    return head + mark + str(tok.decode(list(tokens[at:])))


def side_by_side(models: Sequence[onnx.ModelProto | str | Path], prompt: str, *,
                 model_path: str | Path, labels: Sequence[str] | None = None,
                 tokenizer: str | Path | None = None, chat: bool = False,
                 max_tokens: int = 64, progress: Progress | None = None,
                 cancelled: CancelCheck | None = None) -> SideBySide:
    """Greedy text from each of ``models`` (one or two; paths or models) for ``prompt``,
    the tokenizer and stop tokens found beside ``model_path`` (the first model's file)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise OpstudioError(f"--max-tokens must be a whole number, 1 or more, not {max_tokens!r}")
    if not prompt.strip():
        raise OpstudioError("the prompt is empty")
    say, stop = clamped(progress), stopper(cancelled)
    tok_path = tokenizer_for(model_path, tokenizer)
    tok = load_tokenizer(tok_path)
    text = apply_chat(prompt, tok_path) if chat else prompt
    # a chat template writes its own special tokens
    ids = np.asarray(tok.encode(text, add_special_tokens=not chat).ids, dtype=np.int64)
    if ids.size == 0:
        raise OpstudioError(f"{tok_path}: the prompt gives no tokens")
    stops = eos_ids(model_path, tok_path)
    names = list(labels or (["before", "after"] if len(models) == 2 else ["model"]))
    say(0.0, "loading the models")
    runners = []
    for model in models:
        stop()
        runners.append(Greedy(model, ids, model_path=model_path))
    _check_vocabulary(runners, ids, tok_path)
    runs = [Generation(label) for label in names]
    active = list(range(len(runners)))
    for i in range(max_tokens):
        for k in list(active):
            stop()
            token, seconds = runners[k].step()
            run = runs[k]
            if i == 0:
                run.first_token_s = seconds
            else:
                run.decode_s += seconds
                run.decode_steps += 1
            if token in stops:
                run.stopped_at_eos = True
                active.remove(k)
                continue
            run.tokens.append(token)
        say((i + 1) / max_tokens, f"token {i + 1} of {max_tokens}")
        if not active:
            break
    for run in runs:
        run.text = str(tok.decode(run.tokens))
    return SideBySide(prompt=text, prompt_tokens=int(ids.size), tokenizer=tok_path, runs=runs,
                      diverges_at=(first_divergence(runs[0].tokens, runs[1].tokens)
                                   if len(runs) == 2 else None))


def side_by_side_isolated(models: Sequence[onnx.ModelProto | str | Path], prompt: str, *,
                          model_path: str | Path, progress: Progress | None = None,
                          cancelled: CancelCheck | None = None, **kwargs: Any) -> SideBySide:
    """``side_by_side`` in a child process (``isolation``), as every run of a model the user
    brought: a model that crashes onnxruntime cannot take the app down. A model in memory (the
    app's optimized one) goes to the child as a file in a private temporary folder."""
    from opstudio.core.isolation import call_isolated
    from opstudio.core.model.model_io import write_external
    from opstudio.core.tempdir import opstudio_tempdir

    with opstudio_tempdir(prefix="generate-") as folder:
        paths: list[str | Path] = []
        for i, model in enumerate(models):
            if isinstance(model, onnx.ModelProto):
                path = folder / f"model_{i}.onnx"
                write_external(model, path, path.name + ".data")
                paths.append(path)
            else:
                paths.append(model)
        return call_isolated(side_by_side, paths, prompt, model_path=model_path,
                             progress=progress, cancelled=cancelled, timeout=None,
                             task="generating text", **kwargs)


def _check_vocabulary(runners: Sequence[Greedy], ids: np.ndarray, tokenizer: Path) -> None:
    from opstudio.core.measure.inputs import index_bounds

    for runner in runners:
        ids_name = runner.layout.ids_input
        assert ids_name is not None
        rows = index_bounds(runner.model).get(ids_name)
        if rows is not None and int(ids.max()) >= rows:
            raise OpstudioError(
                f"{tokenizer}: gives token ids up to {int(ids.max())}, but the model's "
                f"embedding has {rows} rows: it is not this model's tokenizer "
                "(name another with --tokenizer)")
