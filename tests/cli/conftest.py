"""What every CLI test shares."""

from __future__ import annotations

import math

import pytest


@pytest.fixture(autouse=True)
def no_progress_lines_in_captured_stderr(monkeypatch):
    """A command that runs past the progress line's quiet seconds on a busy machine would log
    progress lines into the stderr a test reads for its messages; when that happens depends on
    the machine, so the tests keep them out (``test_cli_progress`` tests the
    line itself, with its own clock)."""
    from opstudio.cli import progress

    monkeypatch.setattr(progress, "QUIET_SECONDS", math.inf)
