"""Errors a user is meant to read.

Every failure that comes from the user's input (a file, a recipe, a flag) is raised as an
``OpstudioError`` whose message is one line that names the thing and the cause. The CLI prints it
as ``error: …`` and the GUI shows it in a dialog; neither shows a traceback for these.
"""

from __future__ import annotations


class OpstudioError(Exception):
    """A failure explained in words; ``str(err)`` is the whole message."""


class ModelLoadError(OpstudioError):
    """A model file could not be read as a usable ONNX model."""


class GraphError(OpstudioError):
    """The graph is malformed (a cycle, a dangling input…)."""


class Cancelled(OpstudioError):
    """Work was stopped because the user asked for it."""

    def __init__(self, message: str = "cancelled by the user") -> None:
        super().__init__(message)
