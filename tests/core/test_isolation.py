"""Running work in a child process: results, progress, errors, crashes, timeout, cancel."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from opstudio.core.errors import Cancelled, ContractBroken, GraphError, OpstudioError
from opstudio.core.isolation import call_isolated, death_message

# Functions the child runs must be importable by module name.


def add(a, b, *, scale=1):
    return (a + b) * scale


def report_steps(n, progress=None):
    for i in range(n):
        progress((i + 1) / n, f"step {i + 1}")
        time.sleep(0.06)
    return "done"


def sleep_forever():
    time.sleep(600)


def exit_hard(code):
    os._exit(code)


def segfault():
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(5)


def killed():
    os.kill(os.getpid(), signal.SIGKILL)


def raise_value_error():
    raise ValueError("the tensor is bad\nsecond line of detail")


def raise_graph_error():
    raise GraphError("graph has a cycle through node 'n3'")


def test_result_and_kwargs_cross_the_boundary():
    assert call_isolated(add, 2, 3, scale=10, timeout=60) == 50


def test_progress_is_forwarded():
    seen = []
    assert call_isolated(report_steps, 4, progress=lambda f, m: seen.append((f, m)),
                         timeout=60) == "done"
    assert seen and seen[-1] == (1.0, "step 4")
    assert all(0 < f <= 1 for f, _ in seen)


def test_timeout_kills_a_hung_child():
    t0 = time.monotonic()
    with pytest.raises(OpstudioError, match=r"onnxruntime did not finish within 1 s"):
        call_isolated(sleep_forever, timeout=1)
    assert time.monotonic() - t0 < 3


def test_cancel_stops_the_child_within_a_second():
    t0 = time.monotonic()
    asked: list[float] = []

    def cancelled() -> bool:
        if time.monotonic() - t0 > 0.5:
            asked.append(time.monotonic())
            return True
        return False

    with pytest.raises(Cancelled):
        call_isolated(sleep_forever, timeout=60, cancelled=cancelled)
    assert time.monotonic() - asked[0] < 1.0


def test_exit_code_is_reported_in_words():
    with pytest.raises(OpstudioError, match=r"exited unexpectedly \(exit code 3\) while running"):
        call_isolated(exit_hard, 3, timeout=60)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_segfault_is_reported_in_words():
    with pytest.raises(OpstudioError,
                       match=r"onnxruntime crashed \(signal 11 SIGSEGV\) while running the model"):
        call_isolated(segfault, timeout=60)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigkill_reads_as_out_of_memory():
    with pytest.raises(OpstudioError, match=r"killed \(signal 9 SIGKILL\).*out of memory"):
        call_isolated(killed, timeout=60, task="evaluating accuracy")


def test_child_exceptions_are_reraised_with_their_message():
    with pytest.raises(OpstudioError) as info:
        call_isolated(raise_value_error, timeout=60)
    assert type(info.value) is OpstudioError
    assert str(info.value) == "the tensor is bad"
    assert "ValueError" in info.value.child_traceback
    with pytest.raises(GraphError, match="graph has a cycle through node 'n3'"):
        call_isolated(raise_graph_error, timeout=60)


def test_cancel_before_start_starts_nothing():
    with pytest.raises(Cancelled):
        call_isolated(add, 1, 2, cancelled=lambda: True)


def test_death_message_without_exit_code():
    assert "stopped responding" in death_message(None)


def nested(a, b):
    return call_isolated(add, a, b, timeout=30)


def test_nested_calls_run_in_the_child():
    assert call_isolated(nested, 4, 5, timeout=60) == 9


ORPHAN_SCRIPT = '''
import os, sys, time
from opstudio.core.isolation import call_isolated

def linger(path):
    with open(path, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(60)

if __name__ == "__main__":
    call_isolated(linger, sys.argv[1], timeout=120)
'''


def test_child_exits_when_its_caller_is_killed(tmp_path):
    """A caller killed outright (no chance to clean up) must not leave onnxruntime running."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "caller.py"
    script.write_text(ORPHAN_SCRIPT)
    pid_file = tmp_path / "child.pid"
    caller = subprocess.Popen([sys.executable, str(script), str(pid_file)])
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        os.kill(caller.pid, signal.SIGKILL)
        caller.wait(5)
        deadline = time.monotonic() + 5
        while _alive(child):
            assert time.monotonic() < deadline, "the child outlived its caller"
            time.sleep(0.1)
    finally:
        if caller.poll() is None:
            caller.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by the fork server) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def break_contract():
    raise ContractBroken("prune: changed the model it was given instead of its working copy",
                         "prune")


def test_a_broken_pass_contract_in_the_child_stays_a_defect():
    with pytest.raises(ContractBroken, match="prune: changed the model it was given") as caught:
        call_isolated(break_contract)
    assert not isinstance(caught.value, OpstudioError)
    assert caught.value.technique == "prune"
    assert "break_contract" in caught.value.child_traceback
