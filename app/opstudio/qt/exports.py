"""What leaves the app: the optimized model, the report, and the models shown in Netron.

The file writing itself is the document's; this asks where, and opens the Netron windows
(the optimized model goes through a private temporary folder removed at exit)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from PySide6.QtWidgets import QFileDialog, QMessageBox, QStatusBar, QWidget

from opstudio.core.errors import OpstudioError
from opstudio.core.model.model_io import save_model
from opstudio.core.plan.deploy import runtime_kind
from opstudio.core.session.document import Document
from opstudio.qt.netron_view import NetronWindow


class Exports:
    def __init__(self, doc: Document, parent: QWidget, status: Callable[[], QStatusBar],
                 show_error: Callable[[str], None]) -> None:
        self.doc, self.parent, self.status, self.show_error = doc, parent, status, show_error
        self.netron_windows: list[NetronWindow] = []
        self._tmpdir = Path(tempfile.mkdtemp(prefix="opstudio-gui-"))

    def save_optimized_dialog(self) -> None:
        path = self.doc.model_path
        if self.doc.optimized is None or path is None:
            return
        if runtime_kind(path) is not None:
            self._save_folder_dialog(path)
            return
        suggested = str(path.with_name(path.stem + ".optimized.onnx"))
        target, _ = QFileDialog.getSaveFileName(self.parent, "Save optimized model", suggested,
                                                "ONNX model (*.onnx)")
        if target:
            # the dialog already asked before replacing an existing file
            self._write(lambda: self.doc.save_optimized(target, overwrite=True), "Saved", target)

    def _save_folder_dialog(self, path: Path) -> None:
        """A model from a runtime folder is saved as one: the user picks the folder."""
        runtime = "onnxruntime-genai" if runtime_kind(path) == "genai" else "HF/optimum"
        chosen = QFileDialog.getExistingDirectory(
            self.parent, f"Save the optimized model as a {runtime} folder", str(path.parent.parent))
        if not chosen:
            return
        target = Path(chosen)
        overwrite = False
        if target.is_dir() and any(target.iterdir()):
            answer = QMessageBox.question(
                self.parent, "Replace files?",
                f"{target} is not empty. Replace the files the export writes (the model, its "
                "config, the tokenizer and generation files)? Its other files stay.")
            if answer != QMessageBox.StandardButton.Yes:
                return
            overwrite = True
        self._write(lambda: self.doc.save_optimized_folder(target, overwrite=overwrite).folder,
                    f"Saved the {runtime} folder", chosen)

    def export_report_dialog(self) -> None:
        path = self.doc.model_path
        if self.doc.comparison is None or path is None:
            return
        suggested = str(path.with_name(path.stem + ".report.html"))
        target, _ = QFileDialog.getSaveFileName(
            self.parent, "Export report", suggested,
            "HTML report (*.html);;JSON (*.json);;CSV (*.csv)")
        if target:
            self._write(lambda: self.doc.export_report(target), "Wrote", target)

    def export_olive_dialog(self) -> None:
        """The plan as an Olive workflow (``core.olive``); the steps Olive cannot run are
        named in the status line and in the file."""
        path, model = self.doc.model_path, self.doc.model
        if path is None or model is None or not self.doc.plan.steps:
            return
        suggested = str(path.with_name(path.stem + ".olive.json"))
        target, _ = QFileDialog.getSaveFileName(self.parent, "Export plan as Olive workflow",
                                                suggested, "Olive workflow (*.json)")
        if target:
            self._write(lambda: self.doc.export_olive(target), "Wrote", target)

    def _write(self, write: Callable[[], Path], verb: str, target: str) -> None:
        try:
            write()
            self.status().showMessage(f"{verb} {target}", 6000)
        except OpstudioError as exc:
            self.show_error(str(exc))

    # --- netron -------------------------------------------------------------------------------
    def open_netron(self, path: str | Path, title: str = "") -> NetronWindow:
        w = NetronWindow(path, title)
        w.closed.connect(lambda win: self.netron_windows.remove(win)
                         if win in self.netron_windows else None)
        self.netron_windows.append(w)
        w.show()
        return w

    def open_netron_original(self) -> None:
        if self.doc.model_path is not None:
            self.open_netron(self.doc.model_path)

    def open_netron_optimized(self) -> None:
        path = self.doc.model_path
        if self.doc.optimized is None or path is None:
            return
        target = self._tmpdir / (path.stem + ".optimized.onnx")
        save_model(self.doc.optimized.model, target, overwrite=True)
        self.open_netron(target, f"{path.stem} (optimized)")

    def close(self) -> None:
        for w in list(self.netron_windows):
            w.close()
        shutil.rmtree(self._tmpdir, ignore_errors=True)
