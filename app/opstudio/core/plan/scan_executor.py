"""Where the advisor's scan jobs run: child processes on this machine (the default), or the
workers of a Ray cluster (``advise --cluster auto`` or ``--cluster ray://HOST:PORT``).

A scan job builds one variant of the model and judges it on the prompt; the jobs are
independent, so a cluster can run as many side by side as it has cores. Only judging goes to
a cluster: timing stays on this machine, because latency belongs to the machine the model
will run on.

What the workers need:

- the model, read from its path: the path must name the same file on every node (a shared
  filesystem mounted at the same place, e.g. NFS). Before a scan, a probe task on every node
  checks that the model's files are there with the same sizes, and that the node runs the
  same opstudio and onnxruntime as this machine (the plan compares their measurements with
  local ones); otherwise the scan is refused before it starts;
- the prompt, handed over through Ray's object store (put once, read by every worker).

Each worker is a Ray actor holding the model and the original's logits, judging one job at a
time on one core; jobs are handed out as workers free up, and the workers stay for the scan's
next round of jobs (the model is loaded once per worker). Results come back one by one and
the caller writes each into its cache as it arrives, so a killed worker loses only the job it
was running. That job goes to a fresh worker (up to ``RETRIES`` times); a job that kills its
worker every time is reported after the other jobs have finished, like a crash in the local
pool, and a rerun resumes from the cache.

Ray is an optional dependency (``pip install 'opstudio[cluster]'``), imported only here and
only when a cluster is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from opstudio.core.errors import Cancelled, OpstudioError
from opstudio.core.progress import CancelCheck, Progress

# a job whose worker dies is tried this many more times on a restarted worker
RETRIES = 2
# what a worker holds, as a multiple of the model's bytes: the model, a rewritten copy and
# the sessions of both
MEMORY_MULTIPLE = 3
POLL_S = 0.1
PROBE_TIMEOUT_S = 120.0
_connected: str | None = None


def cluster_address(value: str | None) -> str | None:
    """``None`` for the local pool ("", "local"), else ``"auto"`` or a ``ray://HOST:PORT``."""
    text = (value or "").strip()
    if text in ("", "local"):
        return None
    if text == "auto":
        return text
    host, _, port = text.removeprefix("ray://").rpartition(":")
    if text.startswith("ray://") and host and port.isdigit():
        return text
    raise OpstudioError(f"--cluster takes auto (a Ray on this machine) or ray://HOST:PORT "
                        f"(a Ray cluster's client address), not {text!r}")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise OpstudioError("running the scan on a cluster needs Ray: "
                            "pip install 'opstudio[cluster]'") from None
    return ray


class RayScan:
    """Scan jobs on the workers of a Ray cluster (``run``), once ``open_cluster`` has
    connected to it and checked that its workers can read the model."""

    def __init__(self, address: str, model_path: str) -> None:
        self.address = address
        self.model_path = os.path.abspath(model_path)
        self.sizes = {f: os.path.getsize(f) for f in model_files(self.model_path)}
        self.need = MEMORY_MULTIPLE * sum(self.sizes.values())
        # the workers of the last run, kept for the next one with the same factory and
        # arguments (a scan judges in two rounds: loading the model once per worker is enough);
        # stopped with this object, or when a run fails
        self._pool: _Pool | None = None
        self._pool_key: tuple[Any, ...] = ()
        self._args: list[Any] = []
        self._stop = weakref.finalize(self, _Pool.close, None)

    def connect(self) -> None:
        """Joins the cluster; ``auto`` starts a Ray on this machine unless one runs already.
        A Ray the calling program connected to itself is used as it is."""
        global _connected
        ray = _ray()
        if ray.is_initialized():
            if _connected is None or _connected == self.address:
                return
            ray.shutdown()
        options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if self.address == "auto":
            options["include_dashboard"] = False
        try:
            ray.init(address=None if self.address == "auto" else self.address, **options)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, grpc's errors…
            hint = "" if self.address == "auto" else (
                "; check that its client port is reachable from here (and, when the cluster "
                "asks for a token, that RAY_AUTH_MODE=token and its token are set here)")
            raise OpstudioError(f"cannot reach the Ray cluster at {self.address}: "
                                f"{_first_line(exc)}{hint}") from None
        _connected = self.address

    def slots(self) -> int:
        """Workers the cluster can hold at once: per node, its cores, or fewer when its
        memory cannot hold that many copies of the model."""
        total = 0
        for node in _workers_nodes(_ray()):
            res = node.get("Resources", {})
            cpus = int(res.get("CPU", 0))
            mem = res.get("memory")
            total += cpus if not self.need or mem is None else min(cpus, int(mem // self.need))
        if total < 1:
            raise OpstudioError(f"no node of the Ray cluster at {self.address} has a free core "
                                f"and the {self.need / 2**30:.1f} GiB a worker needs to hold "
                                "the model and a variant")
        return total

    def check_workers(self) -> None:
        """A probe on every node: the model's files at the same path with the same sizes, and
        the same opstudio and onnxruntime as here."""
        ray = _ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
        nodes = _workers_nodes(ray)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(list(self.sizes)) for n in nodes]
        try:
            answers = ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except Exception as exc:
            raise OpstudioError(f"the workers of the Ray cluster at {self.address} cannot run "
                                f"opstudio ({_first_line(exc)}): install opstudio there, the "
                                "same version as here") from None
        here = _probe([])
        for answer in answers:
            if answer["versions"] != here["versions"]:
                theirs = ", ".join(f"{k} {v}" for k, v in answer["versions"].items())
                ours = ", ".join(f"{k} {v}" for k, v in here["versions"].items())
                raise OpstudioError(f"the workers on {answer['host']} run {theirs}, this "
                                    f"machine {ours}: install the same versions there (the "
                                    "plan compares their measurements with this machine's)")
            for name, size in self.sizes.items():
                if answer["sizes"].get(name) != size:
                    seen = answer["sizes"].get(name)
                    why = "no such file" if seen is None else f"{seen} bytes, here {size}"
                    raise OpstudioError(
                        f"workers on the cluster cannot read {self.model_path} "
                        f"({answer['host']}: {name}: {why}); put it on a path they share, "
                        "e.g. an NFS mount at the same place on every node, and give that path")

    def run(self, factory: Callable[..., Callable[[Any], Any]], args: Sequence[Any],
            items: Sequence[tuple[str, Any]], on_result: Callable[[str, Any], None], *,
            timeout: float | None = None, cancelled: CancelCheck | None = None,
            progress: Progress | None = None, task: str = "judging") -> None:
        """``factory(*args)(payload)`` for each ``(id, payload)`` of ``items`` on the
        cluster's workers (each worker calls ``factory`` once), ``on_result(id, result)`` as
        each finishes. ``args`` go through the object store once for all workers."""
        if not items:
            return
        ray = _ray()
        pool = self._workers(ray, factory, args, min(len(items), self.slots()))
        queue = list(items)
        running: dict[Any, tuple[Any, str, Any]] = {}
        tries: dict[str, int] = {}
        failed: list[str] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while queue or running:
                pool.fill(len(queue))
                while pool.idle and queue:
                    actor = pool.idle.pop()
                    item_id, payload = queue.pop(0)
                    running[actor.run.remote(payload)] = (actor, item_id, payload)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                if cancelled is not None and cancelled():
                    raise Cancelled()
                if deadline is not None and time.monotonic() > deadline:
                    raise OpstudioError(f"the cluster did not finish {task} within {timeout:g} "
                                        "s and was stopped (raise the limit with --timeout)")
                for ref in ready:
                    actor, item_id, payload = running.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        # the worker died (killed, out of memory, a crash in onnxruntime):
                        # its job goes to a fresh one, up to RETRIES times
                        if "creation task" in str(exc):
                            raise OpstudioError(f"a worker on the cluster could not start: "
                                                f"{_cause(exc)}") from None
                        pool.drop(actor)
                        tries[item_id] = tries.get(item_id, 0) + 1
                        if tries[item_id] <= RETRIES:
                            queue.insert(0, (item_id, payload))
                        else:
                            failed.append(item_id)
                        continue
                    on_result(item_id, result)
                    pool.idle.append(actor)
                    if progress is not None:
                        done = len(items) - len(queue) - len(running) - len(failed)
                        progress(done / len(items), f"{task} {item_id} on the cluster "
                                 f"({pool.size} workers)")
        except BaseException:
            self.close()
            raise
        if failed:
            self.close()
            tried = "once" if RETRIES == 0 else f"{RETRIES + 1} times"
            raise OpstudioError(f"workers on the cluster died while {task} {', '.join(failed)} "
                                f"(tried {tried}); the other results are kept: run again to "
                                "resume")

    def close(self) -> None:
        """Stops the workers kept from the last run."""
        self._stop()
        self._pool, self._pool_key = None, ()

    def _workers(self, ray: Any, factory: Callable[..., Any], args: Sequence[Any],
                 size: int) -> _Pool:
        """The last run's workers when they hold the same factory and arguments (the same
        objects), else new ones; ``args`` go through the object store once."""
        key = (factory, *(a if isinstance(a, (str, int, float)) else id(a) for a in args))
        if self._pool is None or key != self._pool_key:
            self.close()
            # inside a list, the references reach the worker as they are (it reads them from
            # the object store itself), not as constructor arguments Ray would resolve
            refs = [ray.put(a) for a in args]
            worker = ray.remote(_Worker).options(num_cpus=1, memory=self.need or None,
                                                 max_restarts=0)
            self._pool = _Pool(lambda: worker.remote(factory, refs), size)
            # the arguments stay referenced with the key, so their ids cannot be reused
            self._pool_key, self._args = key, list(args)
            self._stop = weakref.finalize(self, _Pool.close, self._pool)
        self._pool.size = max(self._pool.size, size)
        self._pool.idle = list(self._pool.live)
        return self._pool


class _Pool:
    """The workers of a ``RayScan``: up to ``size`` of them while there are jobs to hand out
    (a dead one is replaced only when one is wanted), and those free for a job."""

    def __init__(self, start: Callable[[], Any], size: int) -> None:
        self.start, self.size = start, size
        self.live: list[Any] = []
        self.idle: list[Any] = []

    def fill(self, waiting: int) -> None:
        while len(self.live) < self.size and len(self.idle) < waiting:
            actor = self.start()
            self.live.append(actor)
            self.idle.append(actor)

    def drop(self, dead: Any) -> None:
        self.live.remove(dead)

    @staticmethod
    def close(pool: _Pool | None) -> None:
        if pool is None:
            return
        with contextlib.suppress(Exception):  # Ray may be shut down already (at exit)
            ray = _ray()
            for actor in pool.live:
                ray.kill(actor)
        pool.live.clear()
        pool.idle.clear()


def open_cluster(cluster: str | None, model_path: str) -> RayScan | None:
    """``None`` for the local pool; else the cluster, connected, its workers checked."""
    address = cluster_address(cluster)
    if address is None:
        return None
    _ray()
    scan = RayScan(address, model_path)
    scan.connect()
    scan.check_workers()
    return scan


class _Worker:
    """A Ray actor: ``factory(*args)`` built once, called on each job's payload."""

    def __init__(self, factory: Callable[..., Callable[[Any], Any]], refs: list[Any]) -> None:
        self.job = factory(*_ray().get(refs))

    def run(self, payload: Any) -> Any:
        return self.job(payload)


def model_files(model_path: str) -> list[str]:
    """The model file and the external-data files it names, as absolute paths."""
    import onnx
    from onnx import external_data_helper

    from opstudio.core.model.model_io import iter_all_tensors

    folder = os.path.dirname(model_path)
    files = {model_path}
    model = onnx.load(model_path, load_external_data=False)
    for tensor in iter_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            where = {e.key: e.value for e in tensor.external_data}.get("location")
            if where:
                files.add(os.path.join(folder, where))
    return sorted(files)


def _probe(files: Sequence[str]) -> dict[str, Any]:
    """Runs on a node: its name, the sizes of ``files`` there and its software versions."""
    import socket

    import onnxruntime

    from opstudio import __version__

    sizes: dict[str, int | None] = {}
    for name in files:
        try:
            sizes[name] = os.path.getsize(name)
        except OSError:
            sizes[name] = None
    return {"host": socket.gethostname(), "sizes": sizes,
            "versions": {"opstudio": __version__, "onnxruntime": onnxruntime.__version__}}


def _workers_nodes(ray: Any) -> list[dict[str, Any]]:
    """The live nodes with cores (a head node started with no CPUs runs no job)."""
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]


def _cause(exc: BaseException) -> str:
    """The last line of a worker's traceback: the exception that stopped it."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__
