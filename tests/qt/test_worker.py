"""The worker: signals in order, errors in words, cancel within a second, UI thread slots."""

from __future__ import annotations

import threading
import time

import pytest
from PySide6.QtCore import QThread

from opstudio.core.errors import Cancelled, ContractBroken, OpstudioError
from opstudio.qt.worker import Worker


def count_to(n: int, *, progress=None, cancelled=None) -> int:
    for i in range(n):
        if cancelled():
            raise Cancelled()
        progress((i + 1) / n, f"step {i + 1}")
    return n * 10


def test_result_progress_and_order(app, qtbot):
    w = Worker(count_to, 4)
    seen = []
    threads = set()
    results = []
    w.signals.result.connect(results.append)
    w.signals.progress.connect(lambda f, m: (seen.append((f, m)), threads.add(QThread.currentThread())))
    with qtbot.waitSignals([w.signals.started, w.signals.result, w.signals.finished],
                           order="strict", timeout=5000):
        w.start()
    assert results == [40]
    assert seen == [(0.25, "step 1"), (0.5, "step 2"), (0.75, "step 3"), (1.0, "step 4")]
    assert threads == {app.thread()}  # slots run in the UI thread
    assert w.is_done()


@pytest.mark.parametrize(("exc", "expected"), [
    (OpstudioError("model.onnx: the file is empty\nmore"), "model.onnx: the file is empty"),
    (ZeroDivisionError("division by zero"), "boom: unexpected ZeroDivisionError: division by zero"),
])
def test_errors_become_one_line(app, qtbot, exc, expected, capsys):
    def boom(*, progress=None, cancelled=None):
        raise exc

    w = Worker(boom, name="boom")
    results, errors = [], []
    w.signals.result.connect(results.append)
    w.signals.error.connect(errors.append)
    with qtbot.waitSignals([w.signals.error, w.signals.finished], order="strict", timeout=5000):
        w.start()
    assert errors == [expected]
    assert results == []


def test_cancel_stops_within_a_second(app, qtbot):
    started = threading.Event()

    def forever(*, progress=None, cancelled=None):
        started.set()
        while True:
            if cancelled():
                raise Cancelled()
            time.sleep(0.01)

    w = Worker(forever)
    w.start()
    assert started.wait(5)
    t = time.perf_counter()
    with qtbot.waitSignals([w.signals.cancelled, w.signals.finished], order="strict",
                           timeout=1000):
        w.cancel()
    assert time.perf_counter() - t < 1.0
    assert w.is_cancelled() and w.is_done()


def test_result_after_cancel_counts_as_cancelled(app, qtbot):
    # a function that ignores the flag and returns: its late result must not be shown
    gate = threading.Event()

    def slow(*, progress=None, cancelled=None):
        gate.wait(5)
        return 1

    w = Worker(slow)
    results = []
    w.signals.result.connect(results.append)
    w.start()
    w.cancel()
    with qtbot.waitSignal(w.signals.cancelled, timeout=5000):
        gate.set()
    assert results == []


def test_garbage_is_collected_in_the_ui_thread_never_in_a_worker(app, qtbot):
    """A Qt object in a reference cycle destroyed by the collector in a worker thread has
    deadlocked the app: automatic collection is off, and a UI-thread timer collects."""
    import gc
    import weakref

    from PySide6.QtWidgets import QMenu

    assert not gc.isenabled()
    collected_in = []

    class Cycle:
        pass

    def make_garbage():
        holder = Cycle()
        holder.menu = QMenu()
        holder.self = holder
        weakref.finalize(holder, lambda: collected_in.append(threading.get_ident()))

    make_garbage()

    def churn(*, progress=None, cancelled=None):
        # enough allocations to have triggered an automatic collection many times over
        junk = [[i] for i in range(200_000)]
        return len(junk)

    w = Worker(churn)
    with qtbot.waitSignal(w.signals.finished, timeout=10000):
        w.start()
    gc.collect()  # what the UI-thread timer does when the counts call for it
    assert collected_in and set(collected_in) == {threading.main_thread().ident}


def _failure_of(qtbot, w):
    """Start ``w``, which fails, and return its one failure once finished has followed."""
    failures = []
    w.signals.failed.connect(failures.append)
    with qtbot.waitSignals([w.signals.failed, w.signals.error, w.signals.finished],
                           order="strict", timeout=5000):
        w.start()
    (failure,) = failures
    return failure


def test_failure_carries_the_traceback_with_its_cause(app, qtbot):
    def wrapped(*, progress=None, cancelled=None):
        try:
            raise ValueError("onnxruntime: Node (mm) Op (MatMul) [ShapeInferenceError]")
        except ValueError as exc:
            raise OpstudioError("cannot load the model") from exc

    failure = _failure_of(qtbot, Worker(wrapped, name="load"))
    assert failure.message == "cannot load the model"
    assert "ShapeInferenceError" in failure.details and "Traceback" in failure.details


def test_a_deleted_signals_object_does_not_raise_out_of_run(app):
    from shiboken6 import delete

    w = Worker(count_to, 3)
    delete(w.signals)  # what happens to it when the app quits while work runs
    w.run()  # in this thread: must return quietly
    assert w.is_done()


def test_the_window_shows_details_of_a_failure(app, qtbot):
    from opstudio.qt.main_window import MainWindow

    window = MainWindow()
    qtbot.addWidget(window)

    def boom(*, progress=None, cancelled=None):
        raise OpstudioError("profiling failed: onnxruntime crashed")

    worker = window.runs.start(Worker(boom, name="profile"), lambda value: None, "Profiling")
    qtbot.waitUntil(worker.is_done, timeout=5000)
    qtbot.waitUntil(lambda: not window.banner.isHidden(), timeout=5000)
    assert window.banner.text.text() == "profiling failed: onnxruntime crashed"
    assert "OpstudioError" in window.banner.details
    assert not window.banner.details_button.isHidden()


def test_a_broken_pass_contract_is_an_internal_error_with_its_traceback(app, qtbot, capsys):
    def defective(*, progress=None, cancelled=None):
        raise ContractBroken("lowrank: created node 'x' (Identity) records no original node",
                             "lowrank")

    failure = _failure_of(qtbot, Worker(defective, name="optimize"))
    assert failure.message.startswith("optimize: internal error: this is a defect of "
                                      "opstudio's lowrank pass: please report it (lowrank: ")
    assert "Traceback" in failure.details and "ContractBroken" in failure.details
