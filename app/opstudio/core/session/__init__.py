"""The app's state without Qt: the open document, the edit plan with undo, its events, and
opening a model for display. The top layer of the core.

The names below are the layer's public API; its modules stay importable for tests and for
monkeypatching."""

from __future__ import annotations

from opstudio.core.session.document import (
    AnyAdvice,
    Document,
    comparison_summary,
    not_compared_summary,
    profile_summary,
)
from opstudio.core.session.edits import Plan
from opstudio.core.session.opening import Opened, open_for_display

__all__ = [
    "AnyAdvice",
    "Document",
    "Opened",
    "Plan",
    "comparison_summary",
    "not_compared_summary",
    "open_for_display",
    "profile_summary",
]
