"""Colours and sizes the Qt views share, so that each view imports this one and no view module
imports another for its look."""

from __future__ import annotations

from PySide6.QtGui import QColor

TEXT = QColor("#2a3240")  # titles, labels and axis text
TITLE_SIZE = "11pt"

# a speedup beyond the noise of its measurement: faster green, slower red
FASTER = QColor("#1b7f3b")
SLOWER = QColor("#b3261e")
# a difference within the noise ("≈ 1×"), and the cells of such a row: no verdict colour
NOISE = QColor("#8a929d")
