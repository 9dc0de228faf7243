"""The run settings dialog: runs, warm-up, threads, optimization level, dims, input file."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from PySide6.QtWidgets import (
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

from opstudio.core.inputs import default_dim
from opstudio.core.profiler import OPT_LEVELS, ProfileSettings


def settings_to_json(s: ProfileSettings) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(s).items()}


def settings_from_json(data: Any) -> ProfileSettings:
    """Settings saved by an earlier session; unknown or bad keys are dropped, not fatal."""
    if not isinstance(data, dict):
        return ProfileSettings()
    names = {f.name for f in dataclasses.fields(ProfileSettings)}
    try:
        return ProfileSettings(**{k: v for k, v in data.items() if k in names})
    except (TypeError, ValueError):
        return ProfileSettings()


class RunSettingsDialog(QDialog):
    def __init__(self, settings: ProfileSettings, symbolic_dims: Sequence[str] = (),
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Run settings")
        self._base = settings
        form = QFormLayout()
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
        self.dims: dict[str, QSpinBox] = {}
        for name in symbolic_dims:
            box = QSpinBox()
            box.setRange(1, 1_000_000)
            value = settings.dims.get(name) or default_dim(name, settings.dims)[0] or 1
            box.setValue(int(value))
            self.dims[name] = box
            form.addRow(f"dim '{name}'", box)
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
        note = QLabel("Inputs are generated from the model's input types unless an .npz file with "
                      "one array per input name is given.")
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

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model inputs", "", "NumPy archive (*.npz)")
        if path:
            self.inputs_path.setText(path)

    def settings(self) -> ProfileSettings:
        dims = dict(self._base.dims)
        dims.update({k: box.value() for k, box in self.dims.items()})
        return dataclasses.replace(
            self._base, runs=self.runs.value(), warmup=self.warmup.value(),
            threads=self.threads.value(), opt_level=self.opt_level.currentText(), dims=dims,
            inputs_path=self.inputs_path.text().strip() or None)
