"""Per-operator latency of a model on onnxruntime, reported against the original nodes.

``profile_model(model, run, workload)`` runs the model in a child process (``isolation.call_isolated``): a model that
crashes or hangs onnxruntime cannot take the caller down, a hung run is stopped after
``timeout_s`` and cancel stops it within a second.

In the child, one session with ``enable_profiling`` and one without (the plain run time a user
would see) each do ``warmup`` runs, then take turns for ``runs`` timed rounds, alternating which
goes first (``timing.interleaved_times``): a machine that gets busy halfway slows both alike
instead of whichever ran second. Fewer rounds if ``time_budget_s`` runs out (never fewer than
one); with ``until_stable`` more, until the 95 % interval of the total's median is within that
many percent (or the budget is spent). The profiled session's trace gives, per run, the
``model_run`` event and one event per kernel (``cat == "Node"``, ``<kernel>_kernel_time``, ``dur``
in µs). The session also saves the graph it runs, which ``attribution`` uses to map every kernel
back to the original nodes (if a provider cannot save it, kernels are matched by name). The
profiling overhead is the paired ratio of profiled to plain wall time (onnxruntime spends several
µs per kernel event, so models made of many tiny kernels read slower when profiled; the per-node
split is still the profiler's). ``profile_models`` measures several models in one child, their
rounds interleaved too: what ``compare`` uses, so that before and after see the same machine.
There each model's plain runs are spread over ``PLAIN_SESSIONS`` sessions, every session of one
meeting every session of the other, so that the verdict's interval holds what two sessions of
one model differ by (``timing.session_interval``). Its profiled runs are spread the same way over
as many profiled sessions as fit beside them (``rounds.rotated_sessions``), the same rounds in
all, each session writing its own trace: a session's memory placement moves an operator's time
as it moves the total, and every operator's interval must hold that too. A big model's one
shared session (``SHARED_SESSION_BYTES``) and a single model keep one profiled session.

A busy machine only ever slows runs down: runs far above the median (``timing.spread``) are
*disturbed*; statistics come from the quiet runs, and ``noise`` says how many were left out.

The inputs are the main feed of a ``workload.Workload``, resolved once per model and shared
with the request and the accuracy of the same command. The child's sessions and round scheduler
are ``rounds``; the trace read into per-node statistics is ``trace``; the result types
``profile``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.measure import kv_buffer
from opstudio.core.measure.memory import AnonPeak, Memory, anon_bytes, weight_bytes
from opstudio.core.measure.profile import STAT_KEYS, NodeStats, Profile, stats_ms
from opstudio.core.measure.rounds import (
    PLAIN_SESSIONS,
    SHARED_SESSION_BYTES,
    Fed,
    Rotation,
    Side,
    check_feeds,
    fed,
    load_session,
    open_more,
    open_side,
    plain_sessions,
    profile_session_options,
    rotated_sessions,
    run_rounds,
    sessions_that_fit,
    shared_session,
    unsettled_note,
)
from opstudio.core.measure.settings import OPT_LEVELS, FeedSpec, ProfileSettings, RunSettings
from opstudio.core.measure.trace import (
    TRACE_EVENT_CAP,
    build_profile,
    profile_of_runs,
    read_trace,
    rotated_runs,
    split_runs,
    uncertain_note,
)
from opstudio.core.measure.workload import Workload, workload_for
from opstudio.core.model.tensors import TensorInfo
from opstudio.core.progress import CancelCheck, Progress

# what callers of the profiler import from it, wherever it is defined
__all__ = [
    "OPT_LEVELS", "PLAIN_SESSIONS", "SHARED_SESSION_BYTES", "STAT_KEYS", "TRACE_EVENT_CAP",
    "Fed", "FeedSpec", "NodeStats", "Profile", "ProfileSettings", "RunSettings", "Workload",
    "build_profile", "check_feeds", "load_session", "profile_model", "profile_models",
    "profile_session_options", "read_trace", "run_rounds", "split_runs", "stats_ms",
    "uncertain_note", "unsettled_note",
]


# ---------------------------------------------------------------------------------------------
# Parent side


def profile_model(model: str | Path | onnx.ModelProto, run: RunSettings | None = None,
                  workload: Workload | None = None, progress: Progress | None = None,
                  cancelled: CancelCheck | None = None) -> Profile:
    """Profile ``model`` (a path or a proto) on onnxruntime; see the module docstring."""
    [profile] = profile_models([model], run, workload, progress, cancelled)
    return profile


def profile_models(models: Sequence[str | Path | onnx.ModelProto],
                   run: RunSettings | None = None, workload: Workload | None = None,
                   progress: Progress | None = None,
                   cancelled: CancelCheck | None = None) -> list[Profile]:
    """Profile ``models`` in one child process, their runs interleaved round by round, on the
    main feed of ``workload`` (by default the feed spec ``run`` carries, resolved on the first
    model): run ``i`` of every model was timed moments apart, so ``timing.paired_ratio`` of
    their series compares them on one machine."""
    from opstudio.core.isolation import call_isolated
    from opstudio.core.model.model_io import load_model, save_model
    from opstudio.core.tempdir import opstudio_tempdir

    run = run or ProfileSettings()
    run.validate()
    with opstudio_tempdir(prefix="profile-") as tmp:
        paths, labels = [], []
        weights: list[tuple[int, bool]] = []
        for i, model in enumerate(models):
            if isinstance(model, onnx.ModelProto):
                path = tmp / f"model{i}.onnx"
                save_model(model, path, overwrite=True)
                labels.append(model.graph.name or "model")
                weights.append(weight_bytes(model))
            else:
                path = Path(model)
                labels.append(str(model))
                if not path.is_file():
                    raise OpstudioError(f"{path}: no such file")
                header = workload.model if workload is not None and i == 0 and \
                    workload.path == str(path) else load_model(path, load_external_data=False,
                                                               name_nodes=False)
                weights.append(weight_bytes(header))
            paths.append(str(path))
        if progress:
            progress(0.0, "preparing inputs")
        workload = workload_for(models, run, workload)
        inputs = workload.main()
        profiles = call_isolated(_measure_in_child, paths, run.to_json(), inputs,
                                 str(tmp), shared=shared_session(paths),
                                 seed=workload.spec.seed,
                                 timeout=run.timeout_s, progress=progress,
                                 cancelled=cancelled)
    settings = ProfileSettings.of(run, workload.spec)
    step = workload.step()
    fed = [TensorInfo(name, str(a.dtype), list(a.shape)) for name, a in inputs.items()]
    kv = workload.kv_bytes()
    for profile, label, (size, mapped) in zip(profiles, labels, weights):
        profile.model = label
        profile.settings = settings
        profile.step = step
        profile.inputs = list(fed)
        memory = profile.memory or Memory()
        memory.weights_bytes, memory.weights_mapped = size, mapped
        if kv is not None:
            memory.kv_token_bytes, memory.past = kv
        profile.memory = memory
    return profiles


# ---------------------------------------------------------------------------------------------
# Child side


def _measure_in_child(model_paths: list[str], settings_json: dict[str, Any],
                      inputs: dict[str, np.ndarray], workdir: str,
                      progress: Progress | None = None, shared: bool | None = None,
                      seed: int = 0) -> list[Profile]:
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    settings = RunSettings.from_json(settings_json)
    report = progress or (lambda f, m: None)
    report(0.01, "loading the model" if len(model_paths) == 1 else "loading the models")
    if shared is None:
        shared = shared_session(model_paths)
    peak = [anon_bytes()]

    def sampled(fraction: float, message: str) -> None:
        # RssAnon has no high-water mark: sample it after every round
        peak.append(anon_bytes())
        report(fraction, message)

    with AnonPeak() as opening:
        sides = _open_sides(ort, model_paths, settings, Path(workdir), inputs, shared)
    peak.append(opening.peak)
    sessions: dict[str, Any] = {}
    for i, side in enumerate(sides):
        if side.plain:
            sessions[f"plain{i}"] = _rotating(side.plain, side.feeds, side.shared_kv, i)
    for i, side in enumerate(sides):
        sessions[f"profiled{i}"] = _rotating(side.profiled, side.feeds, side.shared_kv, i)
    report(0.1, "warming up")
    nodes = sum(len(s.model.graph.node) for s in sides)
    times, stable = run_rounds(sessions, settings, len(sides), nodes, sampled, seed)
    traces = [[sess.end_profiling() for sess in side.profiled] for side in sides]
    if shared and settings.measure_plain:
        # the profiler is off once its trace is written: the same sessions time the plain runs
        plain_sessions_ = {f"plain{i}": fed(side.profiled[0], side.feeds, side.shared_kv)
                           for i, side in enumerate(sides)}
        report(0.5, "timing without the profiler")
        plain_times, plain_stable = run_rounds(plain_sessions_, settings, len(sides), nodes,
                                               sampled, seed)
        times.update(plain_times)
        if plain_stable is not None and (stable is None or plain_stable["pct"] > stable["pct"]):
            stable = plain_stable
    peak_bytes = max((p for p in peak if p is not None), default=None)

    profiles = []
    for i, side in enumerate(sides):
        report(0.9, "attributing kernels to nodes")
        open_at_once, profiled_open = len(side.profiled) + len(side.plain), len(side.profiled)
        side.profiled, side.plain = [], []
        profile = _profile_of(side, traces[i], times, sessions, i, settings)
        if stable is not None:
            stable = dict(stable)
            # the operators' own figures must have settled too, not only the total
            moved = profile.noise.get("uncertain_pct")
            if moved is not None and len(model_paths) == 1 and moved > stable["pct"]:
                stable["pct"] = moved
                stable["reached"] = moved <= stable["target_pct"]
            profile.noise["stable"] = stable
            if not stable["reached"]:  # said once, in the words of --until-stable
                profile.notes = [unsettled_note(stable), *(
                    n for n in profile.notes if not n.startswith("figures uncertain"))]
        profile.onnxruntime = ort.__version__
        profile.memory = Memory(session_bytes=side.session_bytes, peak_bytes=peak_bytes,
                                sessions=open_at_once, models=len(sides))
        told = kv_buffer.note(side.shared_kv, settings.kv_buffer, side.model)
        if told:
            profile.notes.append(told)
        if shared and profile.plain_series_ms:
            profile.notes.append(
                "a big model: one session per model, timed with the profiler and then without "
                "it, so the profiler's overhead is from runs minutes apart")
        elif len(sides) > 1 and profiled_open == 1:
            profile.notes.append(
                "one profiled session per model (no more fit in memory beside the plain ones): "
                "what two sessions of one model differ by is not in the operators' intervals")
        profiles.append(profile)
    report(1.0, "done")
    return profiles


def _open_sides(ort: Any, paths: Sequence[str], settings: RunSettings, workdir: Path,
                inputs: dict[str, np.ndarray], shared: bool) -> list[Side]:
    """Every model's sessions: its first profiled one, then, unless ``shared``, the plain ones
    and, with several models, more profiled ones (``rotated_sessions``)."""
    sides = [open_side(ort, path, settings, workdir / f"m{i}", inputs)
             for i, path in enumerate(paths)]
    wanted = 0 if shared else plain_sessions(paths)
    if wanted:
        # a session can hold several times its file (fp16 weights cast to fp32, prepacked
        # copies): the other sessions are counted by what the first ones took
        fit = sessions_that_fit([s.session_bytes for s in sides])
        plain, profiled = rotated_sessions(wanted, fit, settings.measure_plain)
        for side in sides:
            open_more(ort, side, settings, profiled, plain)
    return sides


def _rotating(sessions: list[Any], feeds: dict[str, np.ndarray], shared_kv: dict[str, str],
              model: int) -> Any:
    if len(sessions) > 1:
        return Rotation([fed(s, feeds, shared_kv) for s in sessions], model)
    return fed(sessions[0], feeds, shared_kv)


def _profile_of(side: Side, trace_paths: list[str], times: dict[str, list[float]],
                sessions: dict[str, Any], i: int, settings: RunSettings) -> Profile:
    """Model ``i``'s profile from its sessions' traces (deleted once read) and the timed
    rounds, each run of it on the session it ran on."""
    try:
        traces = [read_trace(path) for path in trace_paths]
    except (OSError, ValueError) as exc:
        raise OpstudioError(f"cannot read onnxruntime's profile ({exc})") from None
    finally:
        for path in trace_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
    optimized = None
    opt_path = side.work / "optimized.onnx"
    if side.dump and opt_path.is_file():
        with contextlib.suppress(Exception):
            optimized = onnx.load_model(str(opt_path), load_external_data=False)
    profiled = [t * 1e3 for t in times[f"profiled{i}"]]
    plain = [t * 1e3 for t in times.get(f"plain{i}", [])]
    rotation = sessions[f"profiled{i}"]
    if isinstance(rotation, Rotation):
        used = rotation.used[-len(profiled):] if profiled else []
        runs, notes = rotated_runs(traces, used, rotation.ran)
        profile = profile_of_runs(side.model, runs, optimized, profiled, plain, notes)
        profile.profiled_sessions = used[:len(runs)]
    else:
        profile = build_profile(side.model, traces[0], settings.warmup, len(profiled),
                                optimized, profiled, plain)
    rotation = sessions.get(f"plain{i}")
    if isinstance(rotation, Rotation) and plain:
        profile.plain_sessions = rotation.used[-len(plain):]
    return profile
