"""One run at a time: the worker, its progress bar in the status bar, Cancel, and errors.

The window asks for runs; this starts them, shows their progress, routes a failure to the
error banner (the traceback under "Details") and tells the window when the state changed so
it can enable its actions again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QEventLoop, Qt
from PySide6.QtWidgets import QApplication, QProgressBar, QStatusBar

from opstudio.qt.worker import Worker, WorkerFailure


class RunController:
    def __init__(self, status: QStatusBar, show_error: Callable[[str, str], None],
                 before_run: Callable[[], None], state_changed: Callable[[], None]) -> None:
        self.status, self.show_error = status, show_error
        self.before_run, self.state_changed = before_run, state_changed
        self.worker: Worker | None = None
        self.progress = QProgressBar()
        self.progress.setFixedWidth(220)
        self.progress.setRange(0, 1000)
        self.progress.hide()
        status.addPermanentWidget(self.progress)

    def is_running(self) -> bool:
        return self.worker is not None and not self.worker.is_done()

    def start(self, worker: Worker, on_result: Callable[[Any], None], what: str,
              start: bool = True) -> Worker:
        self.before_run()
        self.worker = worker
        s = worker.signals
        s.progress.connect(self._on_progress)
        s.result.connect(on_result)
        s.failed.connect(self._on_failed)
        s.cancelled.connect(lambda: self.status.showMessage(f"{what}: cancelled", 6000))
        s.finished.connect(self._on_finished)
        self.progress.setValue(0)
        self.progress.show()
        self.status.showMessage(f"{what}…")
        if start:
            worker.start()
            self.state_changed()
        return worker

    def run_modal(self, worker: Worker, what: str) -> Any | None:
        """Run ``worker`` while a local event loop keeps the window painting and Cancel
        working; its result, or None when it failed (already on screen) or was cancelled."""
        outcome: dict[str, Any] = {}
        worker.signals.result.connect(lambda value: outcome.update(value=value))
        loop = QEventLoop()
        QApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
        try:
            self.start(worker, lambda _: None, what, start=False)
            # connected last, so every other slot of the worker has run when the loop ends
            worker.signals.finished.connect(loop.quit)
            worker.start()
            self.state_changed()
            loop.exec()
        finally:
            QApplication.restoreOverrideCursor()
        return outcome.get("value")

    def cancel(self) -> None:
        if self.worker is not None and self.is_running():
            self.worker.cancel()
            self.status.showMessage("Cancelling…")

    def _on_failed(self, failure: WorkerFailure) -> None:
        self.show_error(failure.message, failure.details)

    def _on_progress(self, fraction: float, message: str) -> None:
        self.progress.setValue(int(fraction * 1000))
        if message:
            self.status.showMessage(message)

    def _on_finished(self) -> None:
        self.progress.hide()
        self.state_changed()
