"""Colours and sizes the plots share, so that each plot module imports this one and no plot
module imports another for its look."""

from __future__ import annotations

from PySide6.QtGui import QColor

TEXT = QColor("#2a3240")  # titles, labels and axis text
TITLE_SIZE = "11pt"
