"""The error banner above the central view: one line in words, the traceback under "Details"."""

from __future__ import annotations

from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QMessageBox, QPushButton, QWidget


class ErrorBanner(QFrame):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("banner")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(10, 4, 4, 4)
        self.text = QLabel()
        self.text.setWordWrap(True)
        self.details_button = QPushButton("Details…")
        self.details_button.setFlat(True)
        self.details_button.clicked.connect(self._on_details)
        close = QPushButton("×")
        close.setFlat(True)
        close.setFixedWidth(26)
        close.clicked.connect(self.hide)
        layout.addWidget(self.text, 1)
        layout.addWidget(self.details_button)
        layout.addWidget(close)
        self.details = ""
        self.hide()

    def show_message(self, message: str, details: str = "") -> None:
        self.text.setText(message)
        self.details = details
        self.details_button.setVisible(bool(details))
        self.show()

    def _on_details(self) -> None:
        box = QMessageBox(QMessageBox.Icon.Warning, "What went wrong", self.text.text(),
                          QMessageBox.StandardButton.Close, self)
        box.setDetailedText(self.details)
        box.open()
