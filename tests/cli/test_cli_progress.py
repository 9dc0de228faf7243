"""The progress line of the long commands: redrawn in place on a terminal, sparse in a log."""

from __future__ import annotations

import io

from opstudio.cli import progress
from opstudio.cli.progress import ProgressLine, progress_line


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_terminal_gets_one_line_redrawn_and_cleared():
    out = io.StringIO()
    line = ProgressLine(out, tty=True)
    line(0.0, "step 1 (int4-weight): starting")
    line(0.5, "int4-weight: quantizing tensor 2 of 4 (mm)")
    line(1.5, "done")  # held to 100 %
    line.clear()
    text = out.getvalue()
    assert "\n" not in text
    frames = text.split("\r")[1:]
    assert frames[0].startswith("[....................]   0%  step 1 (int4-weight): starting")
    assert frames[1].startswith("[##########..........]  50%  int4-weight: quantizing tensor 2 "
                                "of 4 (mm)")
    # a shorter message wipes what the longer one left
    assert frames[2].rstrip() == "[####################] 100%  done"
    assert len(frames[2]) == len(frames[1].rstrip())
    assert frames[3].strip() == "" and frames[4] == ""


def test_a_log_gets_a_line_now_and_then_and_nothing_for_a_quick_command(monkeypatch):
    monkeypatch.setattr(progress, "QUIET_SECONDS", 2.0)  # the other tests keep logs quiet
    out, clock = io.StringIO(), Clock()
    line = ProgressLine(out, tty=False, clock=clock)
    for k in range(10):  # the first seconds: silent
        clock.now = k * 0.1
        line(k / 1000, f"tensor {k}")
    assert out.getvalue() == ""
    seen = []
    for k in range(1, 201):  # 200 tensors over 100 s
        clock.now = 2.0 + k * 0.5
        line(k / 200, f"quantizing tensor {k} of 200")
    seen = out.getvalue().splitlines()
    assert seen[0] == "[  0%] quantizing tensor 1 of 200"
    assert seen[1] == "[ 10%] quantizing tensor 21 of 200"
    assert 10 <= len(seen) <= 11 and seen[-1].startswith("[100%]")
    # slow work still shows it is alive: a line every 30 s
    clock.now += 31
    line(1.0, "checking the result")
    assert out.getvalue().splitlines()[-1] == "[100%] checking the result"
    line.clear()  # nothing to clear in a log
    assert out.getvalue().endswith("checking the result\n")


def test_quiet_commands_get_no_callback():
    with progress_line(False) as say:
        assert say is None
