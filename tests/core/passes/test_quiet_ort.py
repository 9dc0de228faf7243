"""quiet_onnxruntime_logs silences onnxruntime's quantization tools on the calling thread and
leaves the process's logging and stdout as they were for everyone else."""

import logging
import os
import subprocess
import sys
import threading

import pytest

from opstudio.core.passes._quiet_ort import quiet_onnxruntime_logs

ORT_FILE = os.path.join(os.sep, "site-packages", "onnxruntime", "quantization", "fake.py")


def log_as_onnxruntime(level: str, text: str) -> None:
    """``logging.<level>(text)`` called from a file inside onnxruntime's package, as its
    quantizer does (the record's pathname is the caller's file)."""
    exec(compile(f"import logging\nlogging.{level}({text!r})\n", ORT_FILE, "exec"), {})


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def root_collector():
    root = logging.getLogger()
    handler, level = Collect(), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


def test_onnxruntime_records_are_dropped_and_others_kept(root_collector):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with quiet_onnxruntime_logs():
        assert root.level == level and root.handlers == handlers
        log_as_onnxruntime("warning", "ort advice")
        log_as_onnxruntime("info", "ort progress")
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").info("ort named")
        log_as_onnxruntime("error", "ort error")
        logging.getLogger("opstudio.test").warning("ours")
        logging.warning("plain root warning")
    log_as_onnxruntime("warning", "ort after")
    assert root_collector.messages == ["ort error", "ours", "plain root warning", "ort after"]
    assert root.level == level and root.handlers == handlers
    assert root.filters == [] and logging.getLogger("onnxruntime").level == logging.NOTSET


def test_an_unconfigured_root_stays_unconfigured(capsys):
    root = logging.getLogger()
    saved = list(root.handlers)
    for h in saved:
        root.removeHandler(h)
    try:
        with quiet_onnxruntime_logs():
            log_as_onnxruntime("warning", "ort advice")  # would call basicConfig()
            logging.warning("someone else's warning")
        assert root.handlers == []
    finally:
        for h in saved:
            root.addHandler(h)
    err = capsys.readouterr().err
    assert "someone else's warning" in err and "ort advice" not in err


def test_prints_of_the_quiet_thread_are_dropped_and_other_threads_print(capsys):
    inside, release = threading.Event(), threading.Event()
    original = sys.stdout

    def quantizer() -> None:
        with quiet_onnxruntime_logs():
            print("calibrating …")
            inside.set()
            release.wait(10)
            print("done calibrating")

    worker = threading.Thread(target=quantizer)
    worker.start()
    assert inside.wait(10)
    print("the app's own line")
    release.set()
    worker.join(10)
    assert sys.stdout is original
    out = capsys.readouterr().out
    assert "the app's own line" in out and "calibrating" not in out


def test_blocks_nest_and_overlap_across_threads(root_collector):
    started, release = threading.Event(), threading.Event()

    def other() -> None:
        with quiet_onnxruntime_logs():
            started.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert started.wait(10)
    with quiet_onnxruntime_logs():
        with quiet_onnxruntime_logs():
            log_as_onnxruntime("warning", "inner")
        log_as_onnxruntime("warning", "outer")
    log_as_onnxruntime("warning", "other thread still quiet")  # onnxruntime's logs stay off
    release.set()
    t.join(10)
    log_as_onnxruntime("warning", "all done")
    assert root_collector.messages == ["all done"]


def test_importing_the_nbits_quantizer_inside_a_block_leaves_the_root_logger_alone():
    code = ("import logging\n"
            "from opstudio.core.passes._quiet_ort import quiet_onnxruntime_logs\n"
            "with quiet_onnxruntime_logs():\n"
            "    import onnxruntime.quantization.matmul_nbits_quantizer\n"
            "root = logging.getLogger()\n"
            "print(len(root.handlers), root.level)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.split() == ["0", str(logging.WARNING)]
