"""The run settings dialog: runs, warm-up, threads, optimization level, dims, input file, and
for a decoder with a KV cache the phase (prefill or decode), the past length and whether a
comparison also estimates a request (prompt P, generate G: ``core.request``); for a model that
reads token ids, the text its accuracy is judged on and the tokenizer (``core.text_prompt``).

The app's defaults (``app_defaults``) differ from the command line's in one point: a comparison
of a decoder with a KV cache estimates a request, because time to first token and tokens/s are
what its users feel; the prefill alone can hide a decode step made several times faster."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from opstudio.core.measure.inputs import default_dim
from opstudio.core.measure.profiler import OPT_LEVELS, ProfileSettings
from opstudio.core.measure.settings import KV_BUFFERS
from opstudio.core.measure.text_prompt import find_tokenizer
from opstudio.core.model.phases import DEFAULT_DECODE_PAST, PHASES, is_past_length_name
from opstudio.core.model.tensor_groups import describe_tensors
from opstudio.core.model.tensors import TensorInfo


def settings_to_json(s: ProfileSettings) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(s).items()}


def app_defaults() -> ProfileSettings:
    """The settings of a first session: a decoder with a KV cache is compared per request."""
    return ProfileSettings(request=True)


def settings_from_json(data: Any) -> ProfileSettings:
    """Settings saved by an earlier session over the app's defaults; unknown or bad keys are
    dropped, not fatal."""
    if not isinstance(data, dict):
        return app_defaults()
    names = {f.name for f in dataclasses.fields(ProfileSettings)}
    try:
        return dataclasses.replace(app_defaults(),
                                   **{k: v for k, v in data.items() if k in names})
    except (TypeError, ValueError):
        return app_defaults()


class RunSettingsDialog(QDialog):
    def __init__(self, settings: ProfileSettings, symbolic_dims: Sequence[str] = (),
                 parent: QWidget | None = None, *, inputs: Sequence[TensorInfo] = (),
                 model_path: str | Path | None = None, reads_tokens: bool = False) -> None:
        super().__init__(parent)
        self.setWindowTitle("Run settings")
        self._base = settings
        form = QFormLayout()
        # the model's inputs as it declares them, a KV cache folded into one line
        self.inputs_list = QLabel("\n".join(describe_tensors(inputs)), self)
        self.inputs_list.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.inputs_list.setToolTip("the inputs the model declares; named dims are set below")
        if inputs:
            form.addRow("Model inputs", self.inputs_list)
        else:
            self.inputs_list.hide()
        self.runs = QSpinBox()
        self.runs.setRange(1, 10000)
        self.runs.setValue(settings.runs)
        self.runs.setToolTip("timed runs; statistics are over these")
        self.warmup = QSpinBox()
        self.warmup.setRange(0, 1000)
        self.warmup.setValue(settings.warmup)
        self.threads = QSpinBox()
        self.threads.setRange(0, 512)
        self.threads.setSpecialValueText("all cores")
        self.threads.setValue(settings.threads)
        self.opt_level = QComboBox()
        self.opt_level.addItems(list(reversed(OPT_LEVELS)))
        if settings.opt_level in OPT_LEVELS:
            self.opt_level.setCurrentText(settings.opt_level)
        self.opt_level.setToolTip("onnxruntime graph optimization level; 'disable' keeps nodes "
                                  "1:1 with the model")
        form.addRow("Timed runs", self.runs)
        form.addRow("Warm-up runs", self.warmup)
        form.addRow("Threads", self.threads)
        form.addRow("Graph optimizations", self.opt_level)
        self.phase = QComboBox()
        self.phase.addItems(["auto", *PHASES])
        self.phase.setToolTip("prefill: the prompt with an empty past; decode: one new token "
                              "after the past; auto: as the dims say")
        if settings.phase in PHASES:
            self.phase.setCurrentText(settings.phase)
        self.past = QSpinBox()
        self.past.setRange(0, 1_000_000)
        self.past.setValue(DEFAULT_DECODE_PAST if settings.past is None else settings.past)
        self.past.setToolTip("tokens already in the KV cache before the new one")
        self._past_dims = [n for n in symbolic_dims if is_past_length_name(n)]
        self.request = QCheckBox("Estimate a request")
        self.request.setChecked(bool(settings.request))
        self.request.setToolTip("Optimize & compare also times a request: the prefill of the "
                                "prompt (time to first token), then one decode step per "
                                "generated token (tokens/s), before and after")
        self.request_prompt = QSpinBox()
        self.request_prompt.setRange(1, 1_000_000)
        self.request_prompt.setValue(settings.request_prompt)
        self.request_prompt.setToolTip("prompt tokens (P)")
        self.request_generate = QSpinBox()
        self.request_generate.setRange(1, 1_000_000)
        self.request_generate.setValue(settings.request_generate)
        self.request_generate.setToolTip("tokens generated (G)")
        # kept here: without a KV cache the row has no parent, and would take its boxes along
        self.request_row = request_row = QWidget()
        rh = QHBoxLayout(request_row)
        rh.setContentsMargins(0, 0, 0, 0)
        for w in (self.request, QLabel("(prompt"), self.request_prompt, QLabel(", generate"),
                  self.request_generate, QLabel(")")):
            rh.addWidget(w)
        rh.addStretch(1)
        self.request.toggled.connect(self.request_prompt.setEnabled)
        self.request.toggled.connect(self.request_generate.setEnabled)
        for box in (self.request_prompt, self.request_generate):
            box.setEnabled(self.request.isChecked())
        self.kv_buffer = QComboBox()
        self.kv_buffer.addItems(list(KV_BUFFERS))
        self.kv_buffer.setCurrentText(settings.kv_buffer)
        self.kv_buffer.setToolTip(
            "how a fused (GroupQueryAttention) decoder's KV cache is fed: shared = past and "
            "present in one buffer written in place, as onnxruntime-genai runs it; copy = "
            "separate arrays; auto = as the genai_config.json beside the model says")
        if self._past_dims:  # only a model with a KV cache has phases
            form.addRow("Phase", self.phase)
            form.addRow("Past length", self.past)
            form.addRow("KV cache buffer", self.kv_buffer)
            form.addRow("Per request", request_row)
        # Dims left at their first value are not pinned: the phase and the model decide them.
        self.dims: dict[str, QSpinBox] = {}
        self._shown: dict[str, int] = {}
        for name in symbolic_dims:
            box = QSpinBox()
            past = is_past_length_name(name)
            box.setRange(0, 1_000_000)
            if not past:
                box.setSpecialValueText("auto")  # 0: derived (a KV head size) or refused
            value = settings.dims.get(name)
            if value is None:
                value = default_dim(name, settings.dims)[0] or 0
            box.setValue(int(value))
            self.dims[name] = box
            self._shown[name] = int(value)
            form.addRow(f"dim '{name}'", box)
        self.phase.currentTextChanged.connect(self._phase_changed)
        self.past.valueChanged.connect(self._show_derived)
        for name, box in self.dims.items():
            if _new_tokens(name):
                box.valueChanged.connect(self._show_derived)
        self._phase_changed(self.phase.currentText())
        inputs_row = QWidget()
        h = QHBoxLayout(inputs_row)
        h.setContentsMargins(0, 0, 0, 0)
        self.inputs_path = QLineEdit(settings.inputs_path or "")
        self.inputs_path.setPlaceholderText("synthetic inputs")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        h.addWidget(self.inputs_path, 1)
        h.addWidget(browse)
        form.addRow("Inputs (.npz)", inputs_row)
        self.prompt_text = QLineEdit(settings.prompt_text or "")
        self.prompt_text.setPlaceholderText("the built-in English passage")
        self.prompt_text.setToolTip("the text next-token agreement and KL are judged on (and "
                                    "calibration runs on) when no .npz is given")
        self.tokenizer = QLineEdit(settings.tokenizer or "")
        found = find_tokenizer(model_path)
        self.tokenizer.setPlaceholderText(
            f"{found.name} beside the model" if found is not None else
            "none beside the model: accuracy on synthetic tokens")
        self.tokenizer.setToolTip("a Hugging Face tokenizer.json to tokenize the text with")
        if reads_tokens:  # only a model that reads token ids is judged on text
            form.addRow("Prompt text", self._file_row(self.prompt_text, "Prompt text",
                                                      "Text (*.txt);;All files (*)"))
            form.addRow("Tokenizer", self._file_row(self.tokenizer, "Tokenizer",
                                                    "Tokenizer (tokenizer.json *.json)"))
        note = QLabel("Inputs are generated from the model's input types unless an .npz file with "
                      "one array per input name is given. A language model's accuracy is "
                      "judged on a real text when its tokenizer is known.")
        note.setWordWrap(True)
        note.setObjectName("hint")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok
                                   | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(note)
        lay.addWidget(buttons)

    def _file_row(self, line: QLineEdit, title: str, filters: str) -> QWidget:
        row = QWidget()
        h = QHBoxLayout(row)
        h.setContentsMargins(0, 0, 0, 0)
        browse = QPushButton("Browse…")

        def choose() -> None:
            path, _ = QFileDialog.getOpenFileName(self, title, "", filters)
            if path:
                line.setText(path)

        browse.clicked.connect(choose)
        h.addWidget(line, 1)
        h.addWidget(browse)
        return row

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model inputs", "", "NumPy archive (*.npz)")
        if path:
            self.inputs_path.setText(path)

    def _phase_changed(self, phase: str) -> None:
        self.past.setEnabled(phase == "decode")
        for name, box in self.dims.items():
            # the phase sets the past, the new tokens and their total
            box.setEnabled(phase == "auto" or not (
                is_past_length_name(name) or "total" in name.lower() or "+" in name))
            if (box.isEnabled() and _new_tokens(name) and name not in self._base.dims
                    and box.value() == self._shown[name]):
                # a new-token dim the user has not set shows what the phase runs: one token
                # for a decode step (still a value they may change), the prompt otherwise
                self._shown[name] = 1 if phase == "decode" else (default_dim(name, {})[0] or 0)
                box.setValue(self._shown[name])
        self._show_derived()

    def _show_derived(self, *_: Any) -> None:
        """The greyed dims show what the phase gives them: the past, and past + new tokens."""
        phase = self.phase.currentText()
        if phase == "auto":
            return
        past = self.past.value() if phase == "decode" else 0
        new = next((b.value() for n, b in self.dims.items() if _new_tokens(n)), 1)
        for name, box in self.dims.items():
            if box.isEnabled():
                continue
            box.setValue(past if is_past_length_name(name) else past + new)

    def settings(self) -> ProfileSettings:
        dims = dict(self._base.dims)
        for name, box in self.dims.items():
            if not box.isEnabled():
                dims.pop(name, None)
            elif box.value() != self._shown[name] or name in self._base.dims:
                if box.value() or is_past_length_name(name):
                    dims[name] = box.value()
                else:
                    dims.pop(name, None)
        phase = self.phase.currentText() if self._past_dims else "auto"
        return dataclasses.replace(
            self._base, runs=self.runs.value(), warmup=self.warmup.value(),
            threads=self.threads.value(), opt_level=self.opt_level.currentText(), dims=dims,
            kv_buffer=self.kv_buffer.currentText(),
            inputs_path=self.inputs_path.text().strip() or None,
            prompt_text=self.prompt_text.text().strip() or None,
            tokenizer=self.tokenizer.text().strip() or None,
            phase=None if phase == "auto" else phase,
            past=self.past.value() if phase == "decode" else None,
            # a model without a KV cache keeps the choice for the next one that has
            request=self.request.isChecked() if self._past_dims else self._base.request,
            request_prompt=self.request_prompt.value(),
            request_generate=self.request_generate.value())


def _new_tokens(name: str) -> bool:
    """A dim that counts the step's new tokens (sequence_length), not its past or total."""
    low = name.lower()
    return "seq" in low and not is_past_length_name(name) and "total" not in low and "+" not in name
