"""Run a function in a child process, so that a model that crashes or hangs onnxruntime cannot
take the caller (the GUI, the CLI) down with it.

``call_isolated(func, *args, timeout=..., progress=..., cancelled=...)`` runs the module-level
``func(*args, **kwargs)`` in a fresh process and returns its result. The parent polls every 50 ms:

- ``cancelled()`` true → the child is terminated (killed if it does not stop within 0.5 s) and
  ``Cancelled`` is raised, all within a second;
- past ``timeout`` seconds → the child is killed and ``OpstudioError("… did not finish within N s")``;
- the child raises → the parent raises ``OpstudioError`` with the child's message (an
  ``OpstudioError`` subclass keeps its class, a ``ContractBroken`` stays one); the child's traceback is kept on the exception as
  ``child_traceback`` for ``--debug``;
- the child dies (segfault, ``os._exit``, killed for lack of memory) → ``OpstudioError`` saying so
  in words, with the exit code or signal.

If ``func`` takes a ``progress`` parameter, it receives a callable that forwards
``progress(fraction, message)`` to the parent's ``progress`` (throttled to ~20 messages a second).

Start method: ``forkserver`` where the platform has it (Linux, macOS). The server is started once,
with numpy/onnx/onnxruntime pre-imported, and each child is forked from it: ~15 ms per call
against ~500 ms for ``spawn`` (measured here), and no thread of the caller (Qt, onnxruntime's
pools) is ever inherited by a fork. Windows uses ``spawn``. ``OPSTUDIO_START_METHOD`` overrides.

Called from inside an isolated child, ``call_isolated`` runs ``func`` in place: the outer call
already isolates it. Arguments and results cross the process boundary by pickling: pass models as file paths, not
protos, when they are big.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from opstudio.core.errors import Cancelled, ContractBroken, OpstudioError
from opstudio.core.progress import CancelCheck, Progress

T = TypeVar("T")

POLL_S = 0.05
_PRELOAD = ["numpy", "onnx", "onnxruntime", "opstudio.core.isolation"]
_context: Any = None
_context_lock = threading.Lock()  # the app starts isolated calls from several worker threads


# how often an isolated child checks that its caller is still alive, and its exit code if not
PARENT_POLL_S = 0.5
EXIT_ORPHANED = 75


def start_method() -> str:
    forced = os.environ.get("OPSTUDIO_START_METHOD")
    if forced:
        return forced
    if sys.platform != "win32" and "forkserver" in mp.get_all_start_methods():
        return "forkserver"
    return "spawn"


def _get_context() -> Any:
    global _context
    with _context_lock:
        if _context is None:
            method = start_method()
            ctx = mp.get_context(method)
            if method == "forkserver":
                ctx.set_forkserver_preload(_PRELOAD)
            _context = ctx
        return _context


def call_isolated(func: Callable[..., T], *args: Any, timeout: float | None = 600.0,
                  progress: Progress | None = None, cancelled: CancelCheck | None = None,
                  label: str = "onnxruntime", task: str = "running the model",
                  **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` in a child process; see the module docstring.

    ``label`` and ``task`` only word the error messages ("onnxruntime crashed … while running
    the model"); ``timeout`` is the whole call's wall-clock limit in seconds (None = no limit).
    """
    if cancelled is not None and cancelled():
        raise Cancelled()
    wants_progress = _accepts(func, "progress")
    if mp.current_process().daemon:
        # Already inside an isolated child (which may not start children of its own): the
        # outer call provides the isolation, timeout and cancel.
        if wants_progress:
            kwargs = {**kwargs, "progress": progress or (lambda f, m: None)}
        return func(*args, **kwargs)
    ctx = _get_context()
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main,
                       args=(sender, func, args, kwargs, wants_progress, os.getpid()),
                       daemon=True, name=f"opstudio-{getattr(func, '__name__', 'task')}")
    proc.start()
    sender.close()  # the parent keeps only the reading end, so EOF means the child is gone
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            if cancelled is not None and cancelled():
                _stop(proc)
                raise Cancelled()
            if deadline is not None and time.monotonic() > deadline:
                _stop(proc)
                raise OpstudioError(
                    f"{label} did not finish within {timeout:g} s and was stopped "
                    "(raise the limit with --timeout)")
            if receiver.poll(POLL_S):
                try:
                    kind, payload = receiver.recv()
                except (EOFError, OSError):
                    break
                if kind == "progress":
                    if progress is not None:
                        progress(*payload)
                elif kind == "result":
                    proc.join(5)
                    return payload
                elif kind == "error":
                    proc.join(5)
                    raise _rebuild(payload)
            elif not proc.is_alive() and not receiver.poll(0):
                break
        proc.join(2)
        raise OpstudioError(death_message(proc.exitcode, label, task))
    finally:
        if proc.is_alive():
            _stop(proc)
        receiver.close()
        with contextlib.suppress(ValueError):
            proc.close()


def death_message(exitcode: int | None, label: str = "onnxruntime",
                  task: str = "running the model") -> str:
    """Words for a child that ended without a result."""
    if exitcode is None:
        return f"{label} stopped responding while {task}"
    if exitcode < 0:
        signum = -exitcode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = "unknown signal"
        if signum == getattr(signal, "SIGKILL", -1):
            return (f"{label} was killed (signal {signum} {name}) while {task}; "
                    "most likely the system ran out of memory")
        return f"{label} crashed (signal {signum} {name}) while {task}"
    return f"{label} exited unexpectedly (exit code {exitcode}) while {task}"


def _stop(proc: Any) -> None:
    with contextlib.suppress(Exception):
        proc.terminate()
        proc.join(0.5)
        if proc.is_alive():
            proc.kill()
            proc.join(0.5)


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class _ChildProgress:
    """Forwards progress to the parent, at most every 50 ms (and always the final 100 %)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._last = 0.0

    def __call__(self, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self._last < POLL_S:
            return
        self._last = now
        with contextlib.suppress(Exception):
            self._conn.send(("progress", (float(fraction), str(message))))


def _watch_parent(parent_pid: int) -> None:
    """Exit when the caller is gone. A caller killed outright (SIGKILL, a crash) cannot stop
    its children, and with the forkserver start method the child's parent process is the fork
    server, not the caller, so PR_SET_PDEATHSIG would not help: poll the caller's pid."""
    while True:
        time.sleep(PARENT_POLL_S)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(EXIT_ORPHANED)
        except PermissionError:
            pass  # the pid exists (reused by another user's process is not worth guarding)


def _child_main(conn: Any, func: Callable[..., Any], args: tuple, kwargs: dict,
                wants_progress: bool, parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                         name="opstudio-parent-watch").start()
    try:
        if wants_progress:
            kwargs = {**kwargs, "progress": _ChildProgress(conn)}
        result = func(*args, **kwargs)
        try:
            conn.send(("result", result))
        except Exception as exc:  # an unpicklable result is the function's bug, say so
            conn.send(("error", _describe(exc)))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("error", _describe(exc)))
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _describe(exc: BaseException) -> dict[str, Any]:
    cls = type(exc)
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if isinstance(exc, MemoryError):
        message = "out of memory"
    elif isinstance(exc, OpstudioError):
        message = lines[0] if lines else cls.__name__
    else:
        message = lines[0] if lines else cls.__name__
        if not lines or cls.__name__ in ("KeyError", "IndexError", "AssertionError"):
            message = f"{cls.__name__}: {message}" if lines else message
    return {
        "module": cls.__module__,
        "name": cls.__qualname__,
        "opstudio": isinstance(exc, OpstudioError),
        "defect_of": exc.technique if isinstance(exc, ContractBroken) else None,
        "message": message,
        "traceback": "".join(traceback.format_exception(cls, exc, exc.__traceback__)),
    }


def _rebuild(info: dict[str, Any]) -> OpstudioError | ContractBroken:
    err: OpstudioError | ContractBroken | None = None
    if info.get("defect_of") is not None:
        err = ContractBroken(info["message"], info["defect_of"])
    elif info.get("opstudio"):
        with contextlib.suppress(Exception):
            cls = getattr(importlib.import_module(info["module"]), info["name"])
            if isinstance(cls, type) and issubclass(cls, OpstudioError):
                err = cls(info["message"])
    if err is None:
        err = OpstudioError(info["message"])
    err.child_traceback = info.get("traceback", "")  # type: ignore[union-attr]
    return err
