"""The page shown before a model is open: open a file, recent files, one-click demo models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from opstudio.resources import available_demos


class WelcomePage(QWidget):
    openRequested = Signal()  # "Open model…" clicked
    fileChosen = Signal(str)  # a recent file or a demo model

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("welcome")
        title = QLabel("opstudio")
        title.setObjectName("welcomeTitle")
        subtitle = QLabel("Profile an ONNX model operator by operator, pick the operators that "
                          "matter, optimize them, and see what it bought you.")
        subtitle.setWordWrap(True)
        subtitle.setObjectName("welcomeSubtitle")
        open_button = QPushButton("Open model…")
        open_button.setObjectName("primary")
        open_button.clicked.connect(self.openRequested)
        hint = QLabel("or drop an .onnx file anywhere in this window")
        hint.setObjectName("hint")

        demo_box = QFrame()
        demo_box.setObjectName("card")
        dl = QVBoxLayout(demo_box)
        dl.addWidget(_section("Demo models"))
        self.demo_buttons: dict[str, QPushButton] = {}
        demos = available_demos()
        for key, desc, path in demos:
            b = QPushButton(f"{path.name}\n{desc}")
            b.setObjectName("demoButton")
            b.setMinimumHeight(52)
            b.clicked.connect(lambda _=False, p=path: self.fileChosen.emit(str(p)))
            self.demo_buttons[key] = b
            dl.addWidget(b)
        if not demos:
            dl.addWidget(QLabel("No demo models found in this installation."))
        dl.addStretch(1)

        recent_box = QFrame()
        recent_box.setObjectName("card")
        rl = QVBoxLayout(recent_box)
        rl.addWidget(_section("Recent files"))
        self.recent = QListWidget()
        self.recent.setObjectName("recentList")
        self.recent.setMinimumHeight(180)
        self.recent.itemActivated.connect(
            lambda item: self.fileChosen.emit(item.data(Qt.ItemDataRole.UserRole)))
        self.recent.itemClicked.connect(
            lambda item: self.fileChosen.emit(item.data(Qt.ItemDataRole.UserRole)))
        rl.addWidget(self.recent)

        cards = QHBoxLayout()
        cards.setSpacing(16)
        cards.addWidget(demo_box, 1)
        cards.addWidget(recent_box, 1)

        inner = QWidget()
        inner.setMaximumWidth(900)
        il = QVBoxLayout(inner)
        il.setSpacing(12)
        il.addWidget(title)
        il.addWidget(subtitle)
        row = QHBoxLayout()
        row.addWidget(open_button)
        row.addWidget(hint)
        row.addStretch(1)
        il.addLayout(row)
        il.addSpacing(8)
        il.addLayout(cards)
        il.addStretch(1)

        outer = QHBoxLayout(self)
        outer.setContentsMargins(40, 40, 40, 40)
        outer.addStretch(1)
        outer.addWidget(inner, 4)
        outer.addStretch(1)

    def set_recent(self, paths: Sequence[str]) -> None:
        self.recent.clear()
        for p in paths:
            path = Path(p)
            item = QListWidgetItem(f"{path.name}    {path.parent}")
            item.setData(Qt.ItemDataRole.UserRole, str(path))
            item.setToolTip(str(path))
            if not path.exists():
                item.setFlags(Qt.ItemFlag.NoItemFlags)
                item.setText(f"{path.name}    (missing) {path.parent}")
            self.recent.addItem(item)
        if not paths:
            item = QListWidgetItem("Nothing opened yet.")
            item.setFlags(Qt.ItemFlag.NoItemFlags)
            self.recent.addItem(item)


def _section(text: str) -> QLabel:
    label = QLabel(text)
    label.setObjectName("sectionLabel")
    return label
