"""The child side of a measurement: onnxruntime sessions opened for it and the timed rounds
they take turns in (``run_rounds``), shared by ``profiler`` and ``request``.

Each round runs every session once, in an order that swaps the models within each kind of run
so that every session follows each neighbour equally often; with several models compared, each
model's plain runs and its profiled runs each rotate over up to ``PLAIN_SESSIONS`` sessions
(``Rotation``), and a model too big for a second copy of its weights gets one session for the
profiled and the plain runs (``SHARED_SESSION_BYTES``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.measure import kv_buffer
from opstudio.core.measure.memory import anon_bytes
from opstudio.core.measure.settings import RunSettings
from opstudio.core.measure.timing import drift_pct
from opstudio.core.measure.trace import TRACE_EVENT_CAP
from opstudio.core.model.runtime import session_options
from opstudio.core.model.tensor_groups import describe_tensors
from opstudio.core.model.tensors import TensorInfo

# --until-stable without --time-budget: stop trying after this long
UNTIL_STABLE_BUDGET_S = 30.0

# Plain sessions of each model when several models are compared: two sessions of one model
# differ steadily by a few percent (measured here up to 15 % on a loaded machine: where their
# weights and buffers land), so the verdict's interval must hold that, which one session per
# model cannot show. Round i runs one session of each model, A's and B's chosen so that every
# pair of sessions meets equally often (a Latin square); ``timing.session_interval`` reads
# the spread. More sessions would narrow the interval's t quantile, at a model's memory each.
PLAIN_SESSIONS = 4
# what the extra sessions may take of the machine's memory, together
_SESSIONS_MEMORY_SHARE = 0.25


def plain_sessions(paths: Sequence[str]) -> int:
    """Plain sessions per model: ``PLAIN_SESSIONS`` for a comparison, fewer when that many
    copies of the models would not fit ``_SESSIONS_MEMORY_SHARE`` of the memory, one for a
    single model."""
    if len(paths) < 2:
        return 1
    size = sum(_file_bytes(p) for p in paths)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1
    fits = int(_SESSIONS_MEMORY_SHARE * memory // max(size, 1))
    return max(1, min(PLAIN_SESSIONS, fits))


def sessions_that_fit(session_bytes: Sequence[int | None]) -> int:
    """How many sessions of every model fit ``_SESSIONS_MEMORY_SHARE`` of the memory, each as
    big as that model's first one was measured (unmeasured: no limit from it)."""
    held = sum(b for b in session_bytes if b)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1
    return PLAIN_SESSIONS if held <= 0 else int(_SESSIONS_MEMORY_SHARE * memory // held)


def rotated_sessions(wanted: int, fit: int, plain: bool = True) -> tuple[int, int]:
    """(plain, profiled) sessions per model when ``wanted`` of each kind are asked for and
    ``fit`` sessions beyond the first profiled one fit (``sessions_that_fit``); no plain ones
    unless ``plain``. A session's memory placement moves a run by a few percent, the total's
    and every operator's alike, so the profiled runs rotate too; the plain runs (the
    verdict's) come first."""
    plains = max(1, min(wanted, fit)) if plain else 0
    return plains, max(1, min(wanted, fit + 1 - plains))


# Above this many bytes of weights in any model measured, every model gets one session,
# shared by the profiled and the plain runs (profiling first, then, with the profiler ended,
# plain), instead of one profiled session beside one or more plain ones: each session of a big
# model holds its own pre-packed copy of the weights.
SHARED_SESSION_BYTES = 2**30


def shared_session(paths: Sequence[str]) -> bool:
    """True when the models' sessions must be shared (``SHARED_SESSION_BYTES``)."""
    return any(_file_bytes(p) > SHARED_SESSION_BYTES for p in paths)


def _file_bytes(path: str) -> int:
    """A model file and the external-data files beside it (a model's weights in memory)."""
    p = Path(path)
    total = p.stat().st_size
    for side in p.parent.glob(p.name + "*"):
        if side != p and side.is_file():
            total += side.stat().st_size
    return total


class Rotation:
    """Several sessions of model ``model`` (of ``models``), one of which runs in each round
    (``turn``): model 0's session ``i mod k``, model m's ``(i + m·⌊i/k⌋) mod k``, so that over
    k² rounds every session of one model meets every session of the other. ``used`` holds the
    session of each run, ``ran`` how many runs each session made, warm-up included (where a
    session's timed runs start in its trace)."""

    def __init__(self, sessions: list[Any], model: int) -> None:
        self.sessions, self.model, self.current = sessions, model, 0
        self.used: list[int] = []
        self.ran = [0] * len(sessions)

    def turn(self, i: int) -> None:
        k = len(self.sessions)
        self.current = (i + self.model * (i // k)) % k

    def warm(self, j: int) -> None:
        """One untimed run of session ``j``."""
        self.ran[j] += 1
        self.sessions[j].run(None, {})

    def run(self, outputs: Any, feeds: Any) -> None:
        self.used.append(self.current)
        self.ran[self.current] += 1
        self.sessions[self.current].run(outputs, feeds)


class Fed:
    """A session that runs on its own inputs whatever it is handed: sessions of models with
    different inputs take turns in one ``interleaved_times``."""

    def __init__(self, sess: Any, feeds: Mapping[str, np.ndarray]) -> None:
        self.sess, self.feeds = sess, feeds

    def run(self, _outputs: Any, _feeds: Any) -> None:
        _run(self.sess, self.feeds)


def fed(sess: Any, feeds: Mapping[str, np.ndarray], shared: Mapping[str, str]) -> Any:
    """``sess`` on its ``feeds``, with the ``shared`` present outputs written into their past
    inputs' buffers (``kv_buffer``) when there are any."""
    if shared:
        return kv_buffer.SharedFed(sess, feeds, shared, run_failed)
    return Fed(sess, feeds)


@dataclass
class Side:
    model: onnx.ModelProto  # without weights
    path: str
    work: Path
    dump: bool
    # one session or more (``rotated_sessions``), each writing its own trace; the first saves
    # the graph it runs
    profiled: list[Any]
    plain: list[Any]  # one session or more (``PLAIN_SESSIONS``), none when shared
    feeds: dict[str, np.ndarray]
    session_bytes: int | None = None  # RssAnon that creating the first session took
    # present output -> past input written in one buffer (``kv_buffer``); empty: separate
    shared_kv: dict[str, str] = field(default_factory=dict)


def open_side(ort: Any, model_path: str, settings: RunSettings, work: Path,
               inputs: Mapping[str, np.ndarray]) -> Side:
    from opstudio.core.model.model_io import ensure_node_names, load_model, save_model

    work.mkdir(parents=True, exist_ok=True)
    source = model_path  # its folder tells how its runtime feeds the cache
    # Every node needs a unique name for its kernel to be found again; name them as
    # opstudio does everywhere (load_model) and run that copy if anything changed.
    model = load_model(model_path, load_external_data=False, name_nodes=False)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.ClearField("initializer")
    if ensure_node_names(probe):
        full = load_model(model_path, lazy=True)  # saving copies the weights file to file
        named = work / "named.onnx"
        save_model(full, named, overwrite=True)
        model_path = str(named)
        model = load_model(named, load_external_data=False)

    def profiling_options(dump: bool) -> Any:
        if not dump:
            return profile_session_options(ort, settings, profile_prefix=str(work / "ort_profile"))
        return profile_session_options(
            ort, settings, profile_prefix=str(work / "ort_profile"),
            optimized_model_path=str(work / "optimized.onnx"),
            config={"session.optimized_model_external_initializers_file_name":
                    "optimized.onnx.data",
                    "session.optimized_model_external_initializers_min_size_in_bytes": "1024"})

    dump = settings.opt_level != "disable"
    before = anon_bytes()
    try:
        sess = load_session(ort, model_path, profiling_options(dump), settings.provider)
    except OpstudioError:
        if not dump:
            raise
        # Some providers compile nodes that cannot be saved; attribute by kernel names then.
        dump = False
        sess = load_session(ort, model_path, profiling_options(False), settings.provider)
    after = anon_bytes()
    grown = None if before is None or after is None else max(0, after - before)
    feeds = check_feeds(sess, inputs)
    shared = kv_buffer.resolve(settings.kv_buffer, model, source)
    # the other sessions are opened once every model's first one is measured
    return Side(model, model_path, work, dump, [sess], [], feeds, grown, shared)


def open_more(ort: Any, side: Side, settings: RunSettings, profiled: int, plain: int) -> None:
    """Open ``side``'s other sessions: up to ``profiled`` profiled ones in all and ``plain``
    plain ones. Each profiled session writes its own trace, under its own prefix: onnxruntime
    names the file by the second its profiler started, which sessions opened together share."""
    for j in range(len(side.profiled), profiled):
        so = profile_session_options(ort, settings,
                                     profile_prefix=str(side.work / f"ort_profile{j}"))
        side.profiled.append(load_session(ort, side.path, so, settings.provider))
    side.plain += [load_session(ort, side.path, profile_session_options(ort, settings),
                                settings.provider) for _ in range(plain)]


def run_rounds(sessions: Mapping[str, Any], settings: RunSettings, models: int, nodes: int,
               report: Callable[[float, str], None], seed: int = 0
               ) -> tuple[dict[str, list[float]], dict[str, Any] | None]:
    """Timed rounds of ``sessions`` (ms per run per key) and how stable the total got.

    One ``interleaved_times`` round at a time, in an order chosen here: reversing a whole
    round of four (plain A, plain B, profiled A, profiled B) would run profiled B twice in a
    row at every other boundary, with warm caches, and read it 5-10 % faster than A (measured
    on a model against its copy). So the models swap places within each kind (plain A,
    plain B, profiled A, profiled B / plain B, plain A, profiled B, profiled A): every session
    follows each neighbour equally often. One model alone: plain and profiled swap. Which of
    the two orders comes first in each pair of rounds is drawn at random (seeded): a strict
    alternation lets a process waking up every few ms hit the same place of every round
    (measured: an identical copy read 3.8× faster). ``seed`` is the feed's."""
    from opstudio.core.measure.timing import interleaved_times

    budget = settings.time_budget_s
    target = settings.until_stable
    if target is not None and budget is None:
        budget = UNTIL_STABLE_BUDGET_S
    wanted = settings.runs
    # onnxruntime stops tracing at a million events (about three per kernel): more rounds
    # than that holds would be timed but not profiled
    limit = max(wanted, TRACE_EVENT_CAP // max(3 * nodes, 1) - settings.warmup)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    rotations = [s for s in sessions.values() if isinstance(s, Rotation)]
    for rotation in rotations:  # the first session warms up in the first round
        for j in range(1, len(rotation.sessions)):
            # one run allocates what a session keeps; the first round warms the process
            for _ in range(min(settings.warmup, 1)):
                rotation.warm(j)
    spent = 0.0
    done = 0
    pct = math.inf
    next_check = wanted
    while True:
        left = wanted - done if target is None else limit - done
        if left <= 0:
            break
        for rotation in rotations:
            rotation.turn(done)
        chunk = interleaved_times(_round_order(sessions, models, done, seed), {},
                                  rounds=1,
                                  warmup=settings.warmup if done == 0 else 0)
        # the budget is for timed runs; the warm-up is not part of it
        spent += sum(float(np.sum(v)) for v in chunk.values()) / 1e3
        for k, v in chunk.items():
            times[k].extend(float(x) for x in v)
        done = len(next(iter(times.values())))
        if target is not None and budget is not None:
            report(0.12 + 0.75 * min(1.0, spent / budget), f"run {done}, ±{pct:.1f} %")
        else:
            report(0.12 + 0.75 * min(1.0, done / wanted), f"run {done}/{wanted}")
        if budget is not None and spent >= budget:
            break
        if target is not None and done >= next_check:
            pct = _unsettled_pct(times, models, _used(sessions, times))
            if pct <= target:
                break
            next_check = done + max(2, done // 10)
    if target is None:
        return times, None
    pct = _unsettled_pct(times, models, _used(sessions, times))
    return times, {"target_pct": target, "pct": round(pct, 3), "reached": pct <= target,
                   "rounds": done}


def unsettled_note(stable: Mapping[str, Any]) -> str:
    """What --until-stable says when the figures would not settle."""
    return (f"could not settle: figures uncertain to ±{stable['pct']:.0f} % after "
            f"{stable['rounds']} runs (target ±{stable['target_pct']:g} %); the machine is too "
            "busy for that, profile again when it is quieter or raise --time-budget")


def _round_order(sessions: Mapping[str, Any], models: int, i: int,
                 seed: int = 0) -> dict[str, Any]:
    keys = list(sessions)
    swap_first = bool(np.random.default_rng([seed, i // 2]).integers(2))
    if (i % 2 == 0) != swap_first:
        return dict(sessions)
    if models == 1:
        return {k: sessions[k] for k in reversed(keys)}
    kinds = list(dict.fromkeys(k.rstrip("0123456789") for k in keys))
    return {k: sessions[k] for kind in kinds
            for k in reversed([k for k in keys if k.rstrip("0123456789") == kind])}


def _used(sessions: Mapping[str, Any], times: Mapping[str, list[float]]
          ) -> dict[str, list[int]]:
    """The session each timed run of a rotating key ran on."""
    return {k: s.used[-len(times[k]):] for k, s in sessions.items()
            if isinstance(s, Rotation) and times[k]}


def _unsettled_pct(times: Mapping[str, list[float]], models: int,
                   used: Mapping[str, Sequence[int]] | None = None) -> float:
    """How far (in % of the median) the 95 % interval of the total reaches: of each model's
    plain and profiled run time (quiet runs), or with several models, of the paired ratio of
    each to the first."""
    from opstudio.core.measure.timing import median_interval, paired_ratio, spread

    worst = 0.0
    for kind in ("plain", "profiled"):
        if f"{kind}0" not in times:
            continue
        if models == 1:
            quiet = spread(times[f"{kind}0"]).quiet_ms
            med = float(np.median(quiet))
            lo, hi = median_interval(quiet)
            # a median can be known closely while the runs still move with the load
            worst = max(worst, drift_pct(quiet) or 0.0)
        else:
            for i in range(1, models):
                on = None
                if used and f"{kind}0" in used and f"{kind}{i}" in used:
                    on = (used[f"{kind}0"], used[f"{kind}{i}"])
                r = paired_ratio(times[f"{kind}0"], times[f"{kind}{i}"], on)
                med, lo, hi = r.median, r.low, r.high
                worst = max(worst, 100.0 * max(hi - med, med - lo) / med if med > 0 else math.inf)
            continue
        worst = max(worst, 100.0 * max(hi - med, med - lo) / med if med > 0 else math.inf)
    return worst


def profile_session_options(ort: Any, settings: RunSettings, **more: Any) -> Any:
    # sessions take turns: one whose threads spin after its run steals the cores from the next.
    # Failures come back as exceptions and are reported once, in words; keep the log quiet.
    return session_options(threads=settings.threads, opt_level=settings.opt_level,
                           spinning=False, log_severity=4, **more)


def load_session(ort: Any, path: str, so: Any, provider: str) -> Any:
    try:
        return ort.InferenceSession(path, so, providers=[provider])
    except Exception as exc:
        raise OpstudioError(f"onnxruntime cannot load the model: {_ort_message(exc)}") from None


def check_feeds(sess: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from opstudio.core.model.phases import fit_cache_feed

    args = sess.get_inputs()
    missing = [i.name for i in args if i.name not in inputs]
    if missing:
        raise OpstudioError(f"no value for model input '{missing[0]}'")
    return {i.name: fit_cache_feed(i, inputs[i.name]) for i in args}


def _run(sess: Any, feeds: Mapping[str, np.ndarray]) -> None:
    try:
        sess.run(None, feeds)
    except Exception as exc:
        raise run_failed(exc, feeds) from None


def run_failed(exc: BaseException, feeds: Mapping[str, np.ndarray]) -> OpstudioError:
    """onnxruntime's failure to run on ``feeds``, in words, with the inputs it had."""
    shapes = ", ".join(describe_tensors([TensorInfo(k, v.dtype.name, list(v.shape))
                                         for k, v in feeds.items()]))
    return OpstudioError(
        f"onnxruntime failed to run the model: {_ort_message(exc)} (inputs: {shapes}; "
        "set them with --dim/--shape/--inputs)")


def _ort_message(exc: BaseException) -> str:
    text = str(exc).strip()
    # "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions ..." -> the last part
    if text.startswith("[ONNXRuntimeError]"):
        parts = text.split(" : ", 3)
        text = parts[-1] if len(parts) == 4 else text
    lines = text.splitlines()
    return (lines[0] if lines else type(exc).__name__)[:400]

