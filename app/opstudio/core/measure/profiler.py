"""Per-operator latency of a model on onnxruntime, reported against the original nodes.

``profile_model`` runs the model in a child process (``isolation.call_isolated``): a model that
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
one model differ by (``timing.session_interval``).

A busy machine only ever slows runs down: runs far above the median (``timing.spread``) are
*disturbed*; statistics come from the quiet runs, and ``noise`` says how many were left out.

Control flow: an ``If``/``Loop``/``Scan`` event already contains the time of the kernels of its
subgraphs, which are also listed on their own. Those inner events are charged to the control-flow
node for ``calls`` and ``kernels`` only; their time is counted once, in the node's own event.

Statistics per node are over the quiet timed runs of the node's summed kernel time per run: mean,
p50, p90, min, std (rows sorted by p50: one outlier run does not move a median); ``calls`` is how many times the node ran per run: the most executions of any of
its kernels (1 for a plain or fused node, n for a kernel in a Loop body run n times);
``share`` is the mean over the mean ``model_run``. Time of kernels no
node could be found for is ``unattributed_ms`` (listed in ``unattributed``); the rest of the run
the trace does not see (the executor between kernels) is ``untraced_ms``.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import io
import json
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.measure.memory import AnonPeak, Memory, anon_bytes, kv_bytes, weight_bytes
from opstudio.core.measure.timing import UNCERTAIN_PCT, drift_pct, quiet_runs
from opstudio.core.model.runtime import session_options
from opstudio.core.model.tensor_groups import describe_tensors
from opstudio.core.model.tensors import TensorInfo
from opstudio.core.progress import CancelCheck, Progress

OPT_LEVELS = ("disable", "basic", "extended", "all")
CONTROL_FLOW = {"If", "Loop", "Scan", "BeamSearch", "GreedySearch", "Sampling",
                "WhisperBeamSearch"}
STAT_KEYS = ("mean", "p50", "p90", "min", "std")


@dataclass
class ProfileSettings:
    runs: int = 20
    warmup: int = 3
    threads: int = 0  # intra-op threads; 0 = onnxruntime's default
    opt_level: str = "all"
    provider: str = "CPUExecutionProvider"
    time_budget_s: float | None = None  # stop timed runs once this much time was spent
    timeout_s: float = 600.0
    measure_plain: bool = True
    dims: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    inputs_path: str | None = None
    seed: int = 0
    phase: str | None = None  # "prefill" or "decode" for a KV-cache decoder (core.phases)
    past: int | None = None  # past length of a decode step
    # keep running until the total's 95 % interval is within this many percent of its median
    until_stable: float | None = None
    # also estimate a request of a KV-cache decoder: prefill of a prompt, then decode steps
    # (core.request; compare does when the model has a KV cache)
    request: bool = False
    request_prompt: int = 128
    request_generate: int = 128
    # the text a language model's accuracy is judged and calibrated on when no inputs_path is
    # given (core.text_prompt): a text file (None: the built-in passage) and a tokenizer.json
    # (None: the one beside the model, if any)
    prompt_text: str | None = None
    tokenizer: str | None = None

    def validate(self, check_provider: bool = True) -> None:
        if not isinstance(self.runs, int) or self.runs < 1:
            raise OpstudioError(f"runs must be at least 1, not {self.runs}")
        from opstudio.core.model.phases import check_phase

        check_phase(self.phase, self.past)
        if self.request:
            from opstudio.core.model.phases import check_request

            check_request(self.request_prompt, self.request_generate)
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise OpstudioError(f"warm-up runs cannot be negative ({self.warmup})")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise OpstudioError(f"threads must be 0 (onnxruntime's default) or more, not {self.threads}")
        if self.opt_level not in OPT_LEVELS:
            raise OpstudioError(
                f"optimization level {self.opt_level!r} is not one of {', '.join(OPT_LEVELS)}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise OpstudioError(f"time budget must be positive, not {self.time_budget_s}")
        if not self.timeout_s > 0:
            raise OpstudioError(f"timeout must be positive, not {self.timeout_s}")
        if self.until_stable is not None and not 0 < self.until_stable < 100:
            raise OpstudioError(
                f"--until-stable takes a percentage between 0 and 100, not {self.until_stable}")
        if check_provider:
            import onnxruntime as ort

            available = ort.get_available_providers()
            if self.provider not in available:
                raise OpstudioError(
                    f"execution provider {self.provider!r} is not available here "
                    f"(available: {', '.join(available)})")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProfileSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class NodeStats:
    name: str  # original node name
    op_type: str
    mean_ms: float
    p50_ms: float
    p90_ms: float
    min_ms: float
    std_ms: float
    calls: float  # times per run the node's most-run kernel executed
    share: float  # of the mean model run
    kernels: list[str] = field(default_factory=list)
    group: list[str] = field(default_factory=list)  # all original nodes covered (name first)
    # ms in every timed run, disturbed ones included, in run order: what pairs with another
    # model's runs of the same rounds (not written to JSON)
    series_ms: list[float] = field(default_factory=list, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("series_ms")
        for k in ("mean_ms", "p50_ms", "p90_ms", "min_ms", "std_ms"):
            out[k] = round(out[k], 6)
        out["share"] = round(out["share"], 6)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NodeStats:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Profile:
    model: str
    settings: ProfileSettings
    total_ms: dict[str, float]
    plain_ms: dict[str, float] | None
    overhead: dict[str, Any]
    nodes: list[NodeStats]
    op_types: list[dict[str, Any]]
    unattributed_ms: float = 0.0
    unattributed: list[dict[str, Any]] = field(default_factory=list)
    untraced_ms: float = 0.0
    runs: int = 0  # timed runs actually done
    kernel_events: list[dict[str, Any]] = field(default_factory=list)  # one run, for a timeline
    attribution: str = ""  # how kernels were mapped: "optimized graph" or "names"
    onnxruntime: str = ""
    notes: list[str] = field(default_factory=list)  # what a reader of the numbers must know
    # disturbed runs, intervals of the totals' medians, whether --until-stable was reached
    noise: dict[str, Any] = field(default_factory=dict)
    # ms of every timed run in order (profiled model_run; plain): paired with another model's
    total_series_ms: list[float] = field(default_factory=list, repr=False, compare=False)
    plain_series_ms: list[float] = field(default_factory=list, repr=False, compare=False)
    # the inputs as fed: name, dtype and the shape every run had
    inputs: list[TensorInfo] = field(default_factory=list)
    # the step of a decoder with a KV cache that was run ("prefill of 128 tokens"; "" for
    # another model): every figure is that step's
    step: str = ""
    # which of the model's plain sessions each plain run ran on (``PLAIN_SESSIONS``)
    plain_sessions: list[int] = field(default_factory=list, repr=False, compare=False)
    # what running the model takes of memory (``core.memory``)
    memory: Memory | None = None

    def node(self, name: str) -> NodeStats | None:
        """The row of original node ``name`` (also when it is a member of a fused group)."""
        for n in self.nodes:
            if n.name == name:
                return n
        for n in self.nodes:
            if name in n.group:
                return n
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": self.settings.to_json(),
            "total_ms": _rounded(self.total_ms),
            "plain_ms": _rounded(self.plain_ms) if self.plain_ms else None,
            "overhead": dict(self.overhead),
            "nodes": [n.to_json() for n in self.nodes],
            "op_types": [{"op_type": r["op_type"], "mean_ms": round(r["mean_ms"], 6),
                          "count": r["count"]} for r in self.op_types],
            "unattributed_ms": round(self.unattributed_ms, 6),
            "unattributed": self.unattributed,
            "untraced_ms": round(self.untraced_ms, 6),
            "runs": self.runs,
            "attribution": self.attribution,
            "onnxruntime": self.onnxruntime,
            "kernel_events": self.kernel_events,
            "notes": list(self.notes),
            "noise": dict(self.noise),
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": t.shape}
                       for t in self.inputs],
            **({"step": self.step} if self.step else {}),
            **({"memory": self.memory.to_json()} if self.memory is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Profile:
        return cls(
            model=data.get("model", ""),
            settings=ProfileSettings.from_json(data.get("settings", {})),
            total_ms=dict(data.get("total_ms", {})),
            plain_ms=dict(data["plain_ms"]) if data.get("plain_ms") else None,
            overhead=dict(data.get("overhead", {})),
            nodes=[NodeStats.from_json(n) for n in data.get("nodes", [])],
            op_types=[dict(r) for r in data.get("op_types", [])],
            unattributed_ms=float(data.get("unattributed_ms", 0.0)),
            unattributed=list(data.get("unattributed", [])),
            untraced_ms=float(data.get("untraced_ms", 0.0)),
            runs=int(data.get("runs", 0)),
            kernel_events=list(data.get("kernel_events", [])),
            attribution=data.get("attribution", ""),
            onnxruntime=data.get("onnxruntime", ""),
            notes=[str(n) for n in data.get("notes", [])],
            noise=dict(data.get("noise", {})),
            inputs=[TensorInfo(str(t["name"]), t.get("dtype"), t.get("shape"))
                    for t in data.get("inputs", [])],
            step=str(data.get("step", "")),
            memory=Memory.from_json(data["memory"]) if data.get("memory") else None,
        )

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["name", "op_type", "mean_ms", "p50_ms", "p90_ms", "min_ms", "std_ms",
                    "calls", "share", "kernels", "group"])
        for n in self.nodes:
            w.writerow([n.name, n.op_type, f"{n.mean_ms:.6f}", f"{n.p50_ms:.6f}",
                        f"{n.p90_ms:.6f}", f"{n.min_ms:.6f}", f"{n.std_ms:.6f}", f"{n.calls:g}",
                        f"{n.share:.6f}", ";".join(n.kernels), ";".join(n.group)])
        if self.unattributed_ms:
            w.writerow(["(unattributed)", "", f"{self.unattributed_ms:.6f}", "", "", "", "", "",
                        f"{self.unattributed_ms / self.total_ms['mean']:.6f}"
                        if self.total_ms.get("mean") else "", "", ""])
        return buf.getvalue()

    def to_chrome_trace(self) -> dict[str, Any]:
        """One run as a Chrome/Perfetto trace (``chrome://tracing``, ui.perfetto.dev)."""
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": self.model or "model"}},
        ]
        run_end = max((e["start_us"] + e["dur_us"] for e in self.kernel_events), default=0.0)
        events.append({"name": "model_run", "cat": "run", "ph": "X", "pid": 1, "tid": 0,
                       "ts": 0, "dur": run_end, "args": {}})
        for e in self.kernel_events:
            events.append({
                "name": e.get("node") or e["name"], "cat": e.get("op", ""), "ph": "X", "pid": 1,
                "tid": 1 + int(bool(e.get("inner"))), "ts": e["start_us"], "dur": e["dur_us"],
                "args": {"kernel": e["name"], "op": e.get("op", ""), "node": e.get("node"),
                         "thread": e.get("tid")},
            })
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"model": self.model, "total_ms": self.total_ms}}


def _rounded(d: Mapping[str, float] | None) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in (d or {}).items()}


def stats_ms(values_us: list[float] | np.ndarray) -> dict[str, float]:
    """mean/p50/p90/min/std in ms of durations in µs."""
    a = np.asarray(values_us, dtype=np.float64) / 1000.0
    if a.size == 0:
        return dict.fromkeys(STAT_KEYS, 0.0)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "min": float(a.min()),
            "std": float(a.std(ddof=1)) if a.size > 1 else 0.0}


# ---------------------------------------------------------------------------------------------
# Parent side


def profile_model(model: str | Path | onnx.ModelProto, settings: ProfileSettings | None = None,
                  inputs: dict[str, np.ndarray] | None = None, progress: Progress | None = None,
                  cancelled: CancelCheck | None = None) -> Profile:
    """Profile ``model`` (a path or a proto) on onnxruntime; see the module docstring."""
    [profile] = profile_models([model], settings, inputs, progress, cancelled)
    return profile


def profile_models(models: Sequence[str | Path | onnx.ModelProto],
                   settings: ProfileSettings | None = None,
                   inputs: dict[str, np.ndarray] | None = None, progress: Progress | None = None,
                   cancelled: CancelCheck | None = None) -> list[Profile]:
    """Profile ``models`` in one child process, their runs interleaved round by round, on the
    same inputs (made from the first model unless given): run ``i`` of every model was timed
    moments apart, so ``timing.paired_ratio`` of their series compares them on one machine."""
    from opstudio.core.isolation import call_isolated
    from opstudio.core.measure.inputs import make_inputs
    from opstudio.core.model.model_io import load_model, save_model
    from opstudio.core.model.phases import describe_step
    from opstudio.core.tempdir import opstudio_tempdir

    settings = settings or ProfileSettings()
    settings.validate()
    with opstudio_tempdir(prefix="profile-") as tmp:
        paths, labels = [], []
        first: onnx.ModelProto | None = None
        weights: list[tuple[int, bool]] = []
        for i, model in enumerate(models):
            if isinstance(model, onnx.ModelProto):
                path = tmp / f"model{i}.onnx"
                save_model(model, path, overwrite=True)
                labels.append(model.graph.name or "model")
                weights.append(weight_bytes(model))
                if i == 0:
                    first = model
            else:
                path = Path(model)
                labels.append(str(model))
                if not path.is_file():
                    raise OpstudioError(f"{path}: no such file")
                weights.append(weight_bytes(load_model(path, load_external_data=False,
                                                       name_nodes=False)))
            paths.append(str(path))
        if inputs is None:
            if progress:
                progress(0.0, "preparing inputs")
            if first is None:
                first = load_model(paths[0], lazy=True)
            inputs = make_inputs(first, dims=settings.dims, shapes=settings.shapes,
                                 npz_path=settings.inputs_path, seed=settings.seed,
                                 phase=settings.phase, past=settings.past, model_path=paths[0])
        profiles = call_isolated(_measure_in_child, paths, settings.to_json(), inputs,
                                 str(tmp), shared=shared_session(paths),
                                 timeout=settings.timeout_s, progress=progress,
                                 cancelled=cancelled)
        if first is None:
            first = load_model(paths[0], lazy=True)
    step = describe_step(first, inputs)
    fed = [TensorInfo(name, str(a.dtype), list(a.shape)) for name, a in inputs.items()]
    kv = kv_bytes(first, inputs)
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

# --until-stable without --time-budget: stop trying after this long
UNTIL_STABLE_BUDGET_S = 30.0


def _profile_in_child(model_path: str, settings_json: dict[str, Any],
                      inputs: dict[str, np.ndarray], workdir: str,
                      progress: Progress | None = None) -> Profile:
    [profile] = _measure_in_child([model_path], settings_json, inputs, workdir, progress)
    return profile


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


def _sessions_that_fit(session_bytes: Sequence[int | None]) -> int:
    """How many sessions of every model fit ``_SESSIONS_MEMORY_SHARE`` of the memory, each as
    big as that model's first one was measured (unmeasured: no limit from it)."""
    held = sum(b for b in session_bytes if b)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1
    return PLAIN_SESSIONS if held <= 0 else int(_SESSIONS_MEMORY_SHARE * memory // held)


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


class _Rotation:
    """Several sessions of model ``model`` (of ``models``), one of which runs in each round
    (``turn``): model 0's session ``i mod k``, model m's ``(i + m·⌊i/k⌋) mod k``, so that over
    k² rounds every session of one model meets every session of the other. ``used`` holds the
    session of each run."""

    def __init__(self, sessions: list[Any], model: int) -> None:
        self.sessions, self.model, self.current = sessions, model, 0
        self.used: list[int] = []

    def turn(self, i: int) -> None:
        k = len(self.sessions)
        self.current = (i + self.model * (i // k)) % k

    def run(self, outputs: Any, feeds: Any) -> None:
        self.used.append(self.current)
        self.sessions[self.current].run(outputs, feeds)


class Fed:
    """A session that runs on its own inputs whatever it is handed: sessions of models with
    different inputs take turns in one ``interleaved_times``."""

    def __init__(self, sess: Any, feeds: Mapping[str, np.ndarray]) -> None:
        self.sess, self.feeds = sess, feeds

    def run(self, _outputs: Any, _feeds: Any) -> None:
        _run(self.sess, self.feeds)


@dataclass
class _Side:
    model: onnx.ModelProto  # without weights
    path: str
    work: Path
    dump: bool
    profiled: Any
    plain: list[Any]  # one session or more (``PLAIN_SESSIONS``), none when shared
    feeds: dict[str, np.ndarray]
    session_bytes: int | None = None  # RssAnon that creating the profiled session took


def _open_side(ort: Any, model_path: str, settings: ProfileSettings, work: Path,
               inputs: Mapping[str, np.ndarray]) -> _Side:
    from opstudio.core.model.model_io import ensure_node_names, load_model, save_model

    work.mkdir(parents=True, exist_ok=True)
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
    # the plain sessions are opened once every model's profiled one is measured
    return _Side(model, model_path, work, dump, sess, [], feeds, grown)


def _measure_in_child(model_paths: list[str], settings_json: dict[str, Any],
                      inputs: dict[str, np.ndarray], workdir: str,
                      progress: Progress | None = None, shared: bool | None = None
                      ) -> list[Profile]:
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    settings = ProfileSettings.from_json(settings_json)
    report = progress or (lambda f, m: None)
    report(0.01, "loading the model" if len(model_paths) == 1 else "loading the models")
    if shared is None:
        shared = shared_session(model_paths)
    plains = 0 if shared else plain_sessions(model_paths)
    peak = [anon_bytes()]

    def sampled(fraction: float, message: str) -> None:
        # RssAnon has no high-water mark: sample it after every round
        peak.append(anon_bytes())
        report(fraction, message)

    sides = []
    with AnonPeak() as opening:
        for i, path in enumerate(model_paths):
            sides.append(_open_side(ort, path, settings, Path(workdir) / f"m{i}", inputs))
        if plains and settings.measure_plain:
            # a session can hold several times its file (fp16 weights cast to fp32, prepacked
            # copies): the plain sessions are counted by what the profiled ones took
            plains = max(1, min(plains, _sessions_that_fit([s.session_bytes for s in sides])))
            for side in sides:
                side.plain = [load_session(ort, side.path, profile_session_options(ort, settings),
                                           settings.provider) for _ in range(plains)]
    peak.append(opening.peak)
    sessions: dict[str, Any] = {}
    for i, side in enumerate(sides):
        if len(side.plain) > 1:
            sessions[f"plain{i}"] = _Rotation([Fed(s, side.feeds) for s in side.plain], i)
        elif side.plain:
            sessions[f"plain{i}"] = Fed(side.plain[0], side.feeds)
    for i, side in enumerate(sides):
        sessions[f"profiled{i}"] = Fed(side.profiled, side.feeds)
    report(0.1, "warming up")
    nodes = sum(len(s.model.graph.node) for s in sides)
    times, stable = run_rounds(sessions, settings, len(sides), nodes, sampled)
    traces = [side.profiled.end_profiling() for side in sides]
    if shared and settings.measure_plain:
        # the profiler is off once its trace is written: the same sessions time the plain runs
        plain_sessions_ = {f"plain{i}": Fed(side.profiled, side.feeds)
                           for i, side in enumerate(sides)}
        report(0.5, "timing without the profiler")
        plain_times, plain_stable = run_rounds(plain_sessions_, settings, len(sides), nodes,
                                            sampled)
        times.update(plain_times)
        if plain_stable is not None and (stable is None or plain_stable["pct"] > stable["pct"]):
            stable = plain_stable
    peak_bytes = max((p for p in peak if p is not None), default=None)

    profiles = []
    for i, side in enumerate(sides):
        report(0.9, "attributing kernels to nodes")
        trace_path = traces[i]
        session_bytes = side.session_bytes
        open_at_once = 1 + len(side.plain)
        side.profiled, side.plain = None, []
        try:
            trace = read_trace(trace_path)
        except (OSError, ValueError) as exc:
            raise OpstudioError(f"cannot read onnxruntime's profile ({exc})") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(trace_path)
        optimized = None
        opt_path = side.work / "optimized.onnx"
        if side.dump and opt_path.is_file():
            with contextlib.suppress(Exception):
                optimized = onnx.load_model(str(opt_path), load_external_data=False)
        profiled = [t * 1e3 for t in times[f"profiled{i}"]]
        plain = [t * 1e3 for t in times.get(f"plain{i}", [])]
        profile = build_profile(side.model, trace, settings.warmup, len(profiled), optimized,
                                profiled, plain)
        rotation = sessions.get(f"plain{i}")
        if isinstance(rotation, _Rotation) and plain:
            profile.plain_sessions = rotation.used[-len(plain):]
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
        profile.settings = settings
        profile.onnxruntime = ort.__version__
        profile.memory = Memory(session_bytes=session_bytes, peak_bytes=peak_bytes,
                                sessions=open_at_once, models=len(sides))
        if shared and plain:
            profile.notes.append(
                "a big model: one session per model, timed with the profiler and then without "
                "it, so the profiler's overhead is from runs minutes apart")
        profiles.append(profile)
    report(1.0, "done")
    return profiles


def run_rounds(sessions: Mapping[str, Any], settings: ProfileSettings, models: int, nodes: int,
            report: Callable[[float, str], None]
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
    (measured: an identical copy read 3.8× faster)."""
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
    rotations = [s for s in sessions.values() if isinstance(s, _Rotation)]
    for rotation in rotations:  # the first session warms up in the first round
        for sess in rotation.sessions[1:]:
            # one run allocates what a session keeps; the first round warms the process
            for _ in range(min(settings.warmup, 1)):
                sess.run(None, {})
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
        chunk = interleaved_times(_round_order(sessions, models, done, settings.seed), {},
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
            if isinstance(s, _Rotation) and times[k]}


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


def profile_session_options(ort: Any, settings: ProfileSettings, **more: Any) -> Any:
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
        shapes = ", ".join(describe_tensors([TensorInfo(k, v.dtype.name, list(v.shape))
                                             for k, v in feeds.items()]))
        raise OpstudioError(
            f"onnxruntime failed to run the model: {_ort_message(exc)} (inputs: {shapes}; "
            "set them with --dim/--shape/--inputs)") from None


def _ort_message(exc: BaseException) -> str:
    text = str(exc).strip()
    # "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions ..." -> the last part
    if text.startswith("[ONNXRuntimeError]"):
        parts = text.split(" : ", 3)
        text = parts[-1] if len(parts) == 4 else text
    lines = text.splitlines()
    return (lines[0] if lines else type(exc).__name__)[:400]


# ---------------------------------------------------------------------------------------------
# Trace -> Profile (pure; tested on recorded traces too)


# What the profile reads of an onnxruntime trace event; the rest (input/output shapes, thread
# scheduling statistics) can be most of a trace's size: a 10k-kernel model run 100 times
# writes a million events.
TRACE_EVENT_CAP = 1_000_000
_EVENT_KEYS = frozenset({"cat", "name", "ts", "dur", "tid", "args"})
_ARGS_KEYS = frozenset({"op_name", "provider"})


def _slim_event(obj: dict[str, Any]) -> dict[str, Any]:
    if "dur" in obj and "ts" in obj:
        args = obj.get("args")
        slim = {k: v for k, v in obj.items() if k in _EVENT_KEYS}
        if isinstance(args, dict):
            slim["args"] = {k: v for k, v in args.items() if k in _ARGS_KEYS}
        return slim
    return obj


def _wanted(event: Mapping[str, Any]) -> bool:
    """The events a profile is built from: runs and kernel executions (not the fences and
    session events around them, two thirds of a trace)."""
    name = event.get("name")
    if not isinstance(name, str):
        return False
    return name == "model_run" or (event.get("cat") == "Node" and name.endswith("_kernel_time"))


# One event as onnxruntime writes it: fixed key order, then "args" (checked against its output;
# a line that does not match goes to the JSON parser).
_EVENT_LINE = re.compile(
    r'\{"cat" : "(?P<cat>\w+)","pid" :-?\d+,"tid" :(?P<tid>-?\d+),"dur" :(?P<dur>-?\d+),'
    r'"ts" :(?P<ts>-?\d+),"ph" : "X","name" :"(?P<name>[^"\\]*)","args" : \{')
_ARG = {key: re.compile(f'"{key}"' + r' : "([^"\\]*)"') for key in _ARGS_KEYS}


def _fast_event(text: str) -> dict[str, Any] | None:
    m = _EVENT_LINE.match(text)
    if m is None or not text.endswith("}}"):
        return None
    name = m.group("name")
    if name != "model_run" and not name.endswith("_kernel_time"):
        return {"name": name}  # not wanted: no need to read the rest
    args: dict[str, Any] = {}
    rest = text[m.end():]
    for key, pattern in _ARG.items():
        found = pattern.findall(rest)
        if len(found) > 1:
            return None  # the key also occurs nested: leave it to the JSON parser
        if found:
            args[key] = found[0]
    return {"cat": m.group("cat"), "tid": int(m.group("tid")), "dur": int(m.group("dur")),
            "ts": int(m.group("ts")), "name": name, "args": args}


def read_trace(path: str | os.PathLike[str], fast: bool = True) -> list[dict[str, Any]]:
    """The wanted events of an onnxruntime trace file, slimmed.

    onnxruntime writes one event per line, so the file is read a line at a time and only
    what the profile needs is kept, with repeated names interned: a 10k-kernel model run
    100 times writes a million events, and parsing the whole file at once held several GiB.
    Lines in onnxruntime's usual layout are read with one regular expression (``fast``; a
    full JSON parse of a million lines took 28 s here), any other line with the JSON parser;
    a file in any other layout is parsed whole."""
    events: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            text = line.strip().rstrip(",")
            if text in ("", "[", "]"):
                continue
            event = _fast_event(text) if fast else None
            if event is None:
                try:
                    event = json.loads(text, object_hook=_slim_event)
                except ValueError:
                    break  # not one event per line
            if isinstance(event, dict) and _wanted(event):
                event["name"] = sys.intern(event["name"])
                if isinstance(event.get("cat"), str):
                    event["cat"] = sys.intern(event["cat"])
                args = event.get("args")
                if isinstance(args, dict):
                    for key in ("op_name", "provider"):
                        if isinstance(args.get(key), str):
                            args[key] = sys.intern(args[key])
                events.append(event)
        else:
            return events
    with open(path, encoding="utf-8") as fh:
        whole = json.load(fh, object_hook=_slim_event)
    return [e for e in whole if isinstance(e, dict) and _wanted(e)]


def split_runs(trace: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """``(model_run event, its kernel events)`` for every run in the trace, in order."""
    runs = sorted((e for e in trace if e.get("name") == "model_run" and "dur" in e),
                  key=lambda e: e["ts"])
    kernels = sorted((e for e in trace if e.get("cat") == "Node"
                      and str(e.get("name", "")).endswith("_kernel_time")),
                     key=lambda e: e["ts"])
    starts = [r["ts"] for r in runs]
    out: list[tuple[dict[str, Any], list[dict[str, Any]]]] = [(r, []) for r in runs]
    for k in kernels:
        i = bisect.bisect_right(starts, k["ts"]) - 1
        if i >= 0 and k["ts"] <= runs[i]["ts"] + runs[i]["dur"] + 1:
            out[i][1].append(k)
    return out


def _kernel_name(event: Mapping[str, Any]) -> str:
    return str(event["name"])[: -len("_kernel_time")]


def _inner_flags(events: list[dict[str, Any]], containers: set[str]) -> list[int | None]:
    """For each event, the index of the outermost control-flow event containing it (or None)."""
    cands = sorted((i for i, e in enumerate(events)
                    if (e.get("args") or {}).get("op_name") in CONTROL_FLOW
                    or _kernel_name(e) in containers),
                   key=lambda i: (events[i]["ts"], -events[i]["dur"]))
    outer: list[int] = []
    for i in cands:
        e = events[i]
        if outer:
            o = events[outer[-1]]
            if e["ts"] >= o["ts"] and e["ts"] + e["dur"] <= o["ts"] + o["dur"] + 1:
                continue
        outer.append(i)
    starts = [events[i]["ts"] for i in outer]
    flags: list[int | None] = []
    for j, e in enumerate(events):
        k = bisect.bisect_right(starts, e["ts"]) - 1
        parent = outer[k] if k >= 0 else None
        if parent is not None and parent != j:
            o = events[parent]
            if e["ts"] + e["dur"] <= o["ts"] + o["dur"] + 1:
                flags.append(parent)
                continue
        flags.append(None)
    return flags


def build_profile(model: onnx.ModelProto, trace: list[dict[str, Any]], warmup: int,
                  timed: int, optimized: onnx.ModelProto | None = None,
                  profiled_wall_us: list[float] | None = None,
                  plain_wall_us: list[float] | None = None) -> Profile:
    """Statistics per original node from an onnxruntime trace (the last ``timed`` runs)."""
    from opstudio.core.measure.attribution import attribute

    all_runs = split_runs(trace)
    runs = all_runs[warmup:] if len(all_runs) > warmup else all_runs
    if timed:
        runs = runs[-timed:]
    if not runs:
        raise OpstudioError("onnxruntime's profile holds no model run")
    notes = []
    if timed and len(all_runs) < warmup + timed:
        # onnxruntime stops recording once its trace holds a million events, silently.
        notes.append(f"onnxruntime's trace holds {len(all_runs)} of the {warmup + timed} runs "
                     f"(it stops recording at {TRACE_EVENT_CAP:,} events): statistics are over "
                     f"the {len(runs)} timed runs it holds; ask for fewer runs to profile them all")
    containers = set()
    if optimized is not None:
        containers = {n.name for n in optimized.graph.node if _has_graph_attr(n)}
    else:
        containers = {n.name for n in model.graph.node if _has_graph_attr(n)}

    # Per run: top-level kernel time and kernel executions, by kernel name.
    per_run_time: list[dict[str, float]] = []
    per_run_calls: list[dict[str, int]] = []
    inner_kernels: dict[str, set[str]] = defaultdict(set)  # container kernel -> inner kernels
    ops: dict[str, str] = {}
    parents_by_run: list[list[int | None]] = []
    for _, events in runs:
        flags = _inner_flags(events, containers)
        parents_by_run.append(flags)
        t: dict[str, float] = defaultdict(float)
        c: dict[str, int] = defaultdict(int)
        for e, parent in zip(events, flags):
            name = _kernel_name(e)
            if parent is None:
                t[name] += float(e["dur"])
                c[name] += 1
                ops.setdefault(name, (e.get("args") or {}).get("op_name", ""))
            else:
                owner = _kernel_name(events[parent])
                c[f"{owner}\0{name}"] += 1  # per inner kernel: a Loop body runs n times
                inner_kernels[owner].add(name)
        per_run_time.append(t)
        per_run_calls.append(c)
    n_runs = len(runs)
    total_us = [float(r["dur"]) for r, _ in runs]
    quiet = quiet_runs(total_us)
    kernel_mean = {k: sum(per_run_time[i].get(k, 0.0) for i in quiet) / len(quiet) for k in ops}

    attr = attribute(model, ops, optimized, weights=kernel_mean)

    total = stats_ms([total_us[i] for i in quiet])
    nodes: list[NodeStats] = []
    for group in attr.groups:
        ks = group.kernels
        series = [sum(r.get(k, 0.0) for k in ks) for r in per_run_time]
        keys = set(ks) | {f"{k}\0{i}" for k in ks for i in inner_kernels.get(k, ())}
        calls = max(sum(r.get(k, 0) for r in per_run_calls) for k in keys) / n_runs
        st = stats_ms([series[i] for i in quiet])
        kernels = list(group.kernels)
        for k in group.kernels:
            kernels.extend(sorted(inner_kernels.get(k, ())))
        nodes.append(NodeStats(
            name=group.name, op_type=group.op_type, mean_ms=st["mean"], p50_ms=st["p50"],
            p90_ms=st["p90"], min_ms=st["min"], std_ms=st["std"],
            calls=round(calls, 3), share=st["mean"] / total["mean"] if total["mean"] else 0.0,
            kernels=kernels, group=list(group.members) if len(group.members) > 1 else [],
            series_ms=[x / 1000.0 for x in series]))
    nodes.sort(key=lambda n: (-n.p50_ms, -n.mean_ms, n.name))

    unattributed: list[dict[str, Any]] = [
        {"kernel": k, "op_type": ops.get(k, ""),
         "mean_ms": round(kernel_mean.get(k, 0.0) / 1000.0, 6)}
        for k in attr.unattributed]
    unattributed.sort(key=lambda r: -r["mean_ms"])
    unattributed_ms = sum(r["mean_ms"] for r in unattributed)

    by_op: dict[str, dict[str, Any]] = {}
    for n in nodes:
        row = by_op.setdefault(n.op_type, {"op_type": n.op_type, "mean_ms": 0.0, "count": 0})
        row["mean_ms"] += n.mean_ms
        row["count"] += 1
    op_types = sorted(by_op.values(), key=lambda r: -r["mean_ms"])

    plain_us = list(plain_wall_us or [])
    plain_quiet = quiet_runs(plain_us)
    plain = stats_ms([plain_us[i] for i in plain_quiet]) if plain_us else None
    kernels_per_run = sum(len(ev) for _, ev in runs) / n_runs
    overhead = _overhead(profiled_wall_us or [], plain_us, kernels_per_run)
    noise = _noise(total_us, plain_us)
    noise["uncertain_pct"] = _uncertain_pct([total_us[i] for i in quiet],
                                            [[n.series_ms[i] for i in quiet] for n in nodes])
    if noise["uncertain_pct"] is not None and noise["uncertain_pct"] >= UNCERTAIN_PCT:
        # first: the one note the app's status line shows
        notes.insert(0, uncertain_note(noise["uncertain_pct"]))
    if noise["busy"]:
        notes.append(noise["message"])

    # Timeline of the median (quiet) run.
    order = sorted(quiet, key=lambda i: total_us[i])
    mid = order[len(order) // 2]
    run_event, events = runs[mid]
    group_name = {k: attr.groups[g].name for k, g in attr.kernel_group.items()}
    timeline = []
    for e, parent in zip(events, parents_by_run[mid]):
        name = _kernel_name(e)
        owner = name if parent is None else _kernel_name(events[parent])
        timeline.append({"name": name, "op": (e.get("args") or {}).get("op_name", ""),
                         "node": group_name.get(owner), "start_us": float(e["ts"] - run_event["ts"]),
                         "dur_us": float(e["dur"]), "tid": e.get("tid"),
                         "inner": parent is not None})

    traced = sum(n.mean_ms for n in nodes) + unattributed_ms
    return Profile(
        model="", settings=ProfileSettings(), total_ms=total, plain_ms=plain, overhead=overhead,
        nodes=nodes, op_types=op_types, unattributed_ms=unattributed_ms,
        unattributed=unattributed, untraced_ms=max(0.0, total["mean"] - traced), runs=n_runs,
        kernel_events=timeline, attribution=attr.method, notes=notes, noise=noise,
        total_series_ms=[t / 1000.0 for t in total_us],
        plain_series_ms=[t / 1000.0 for t in plain_us])


# the heaviest operators, covering this share of the time, speak for the profile's figures
_HEAVY_SHARE = 0.8
_HEAVY_MAX = 10


def _uncertain_pct(total: Sequence[float], series: Sequence[Sequence[float]]) -> float | None:
    """How far the profile's figures could move (``timing.drift_pct``): of the total, and the
    median of the heaviest operators' (those making up ``_HEAVY_SHARE`` of the time; ``series``
    in the profile's order, slowest first), whichever is farther; None with too few runs."""
    heavy: list[Sequence[float]] = []
    covered = 0.0
    sums = [float(np.sum(s)) for s in series]
    whole = sum(sums)
    for s, t in zip(series, sums):
        if covered >= _HEAVY_SHARE * whole or len(heavy) >= _HEAVY_MAX:
            break
        heavy.append(s)
        covered += t
    drifts = [d for d in (drift_pct(s) for s in heavy) if d is not None]
    found = [d for d in (drift_pct(total), float(np.median(drifts)) if drifts else None)
             if d is not None]
    return round(max(found), 1) if found else None


def uncertain_note(pct: float) -> str:
    return (f"figures uncertain to ±{pct:.0f} %: stretches of this profile's runs disagree by "
            "that much (the machine is busy); profile again when it is quieter")


def _noise(profiled_us: Sequence[float], plain_us: Sequence[float]) -> dict[str, Any]:
    """Disturbed runs of each kind and the 95 % intervals of the totals' medians (quiet runs).
    The worse of the two kinds speaks for the machine."""
    from opstudio.core.measure.timing import median_interval, spread

    out: dict[str, Any] = {"runs": len(profiled_us), "busy": False, "disturbed": {}, "cv": {}}
    worst = None
    for kind, us in (("profiled", profiled_us), ("plain", plain_us)):
        if not us:
            continue
        sp = spread([u / 1000.0 for u in us])
        out["disturbed"][kind] = sp.disturbed
        out["cv"][kind] = round(sp.cv, 4)
        lo, hi = median_interval(sp.quiet_ms)
        out["total_ci" if kind == "profiled" else "plain_ci"] = [round(lo, 6), round(hi, 6)]
        if worst is None or sp.disturbed > worst.disturbed:
            worst = sp
        out["busy"] = out["busy"] or sp.busy
    out["message"] = worst.describe() if worst is not None else ""
    return out


def _has_graph_attr(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute)


def _overhead(profiled_us: Sequence[float], plain_us: Sequence[float],
              kernels_per_run: float) -> dict[str, Any]:
    """Profiled vs plain wall time (the paired ratio of runs timed in turns, quiet rounds), and
    what the difference costs per kernel event. Profiling cannot make a run faster: a ratio
    below 1 means the plain runs were disturbed, and is said so, not stated as an overhead."""
    from opstudio.core.measure.timing import MIN_ROUNDS, UNDECIDED, paired_ratio

    if not profiled_us or not plain_us:
        return {"ratio": None, "note": "plain runs were not measured"}
    n = min(len(profiled_us), len(plain_us))
    keep = sorted(set(quiet_runs(profiled_us[:n])) & set(quiet_runs(plain_us[:n]))) or list(range(n))
    prof_q = [profiled_us[i] for i in keep]
    plain_q = [plain_us[i] for i in keep]
    if min(plain_q) <= 0:
        return {"ratio": None, "note": "plain run time too small to compare"}
    r = paired_ratio(prof_q, plain_q)
    prof = float(np.median(prof_q)) / 1000.0
    plain = float(np.median(plain_q)) / 1000.0
    per_kernel_us = max(0.0, (prof - plain) * 1000.0 / kernels_per_run) if kernels_per_run else 0.0
    out = {"ratio": None, "ratio_ci": [round(r.low, 4), round(r.high, 4)],
           "significant": r.significant, "label": r.label(),
           "profiled_wall_ms": round(prof, 6),
           "plain_wall_ms": round(plain, 6), "kernels_per_run": round(kernels_per_run, 2),
           "per_kernel_us": round(per_kernel_us, 3)}
    if r.verdict == UNDECIDED:
        out["note"] = (f"what profiling adds cannot be told from {r.rounds} pairs of runs "
                       f"({MIN_ROUNDS} needed)")
    elif r.high < 1.0:
        out["note"] = (f"the plain runs were slower than the profiled ones ({r.describe()}), "
                       "which profiling cannot cause: the machine was busy while they ran; no "
                       "overhead is stated")
    elif not r.significant:
        out["note"] = (f"profiling adds no measurable time (interval {r.low:.2f}–{r.high:.2f}×): "
                       "per-node times reflect plain runs")
    else:
        out["ratio"] = round(r.median, 4)
        if r.median <= 1.1:
            out["note"] = "profiling adds little: per-node times reflect plain runs"
        elif r.median <= 1.3:
            out["note"] = "profiling adds a little per kernel; shares remain representative"
        else:
            out["note"] = (
                f"profiled runs are {r.median:.2f}x slower than plain runs: onnxruntime's "
                f"profiler costs ~{per_kernel_us:.0f} µs per kernel over {kernels_per_run:.0f} "
                "kernels a run, so kernels of that order read slower than they run; use the "
                "plain time for the whole model")
    return out
