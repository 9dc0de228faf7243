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


class ContractBroken(Exception):
    """A pass broke the pass contract (``opstudio.core.passes.base``): a defect of the pass,
    not of the model or the user's input, so it is no ``OpstudioError``: the CLI and the app
    show it as an internal error with its traceback."""

    def __init__(self, message: str, technique: str = "") -> None:
        super().__init__(message)
        self.technique = technique

    def report_line(self) -> str:
        """One line asking for a report, with what the check found."""
        lines = str(self).strip().splitlines()
        return (f"this is a defect of opstudio's {self.technique or 'optimization'} pass: "
                f"please report it ({lines[0] if lines else 'the pass contract was broken'})")


class Cancelled(OpstudioError):
    """Work was stopped because the user asked for it."""

    def __init__(self, message: str = "cancelled by the user") -> None:
        super().__init__(message)
