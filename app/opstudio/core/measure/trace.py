"""An onnxruntime trace read into a ``Profile`` (pure; tested on recorded traces too).

Control flow: an ``If``/``Loop``/``Scan`` event already contains the time of the kernels of its
subgraphs, which are also listed on their own. Those inner events are charged to the control-flow
node for ``calls`` and ``kernels`` only; their time is counted once, in the node's own event.

Statistics per node are over the quiet timed runs of the node's summed kernel time per run: mean,
p50, p90, min, std (rows sorted by p50: one outlier run does not move a median); ``calls`` is how
many times the node ran per run: the most executions of any of its kernels (1 for a plain or fused
node, n for a kernel in a Loop body run n times); ``share`` is the mean over the mean
``model_run``. Time of kernels no node could be found for is ``unattributed_ms`` (listed in
``unattributed``); the rest of the run the trace does not see (the executor between kernels) is
``untraced_ms``. A model profiled on several sessions has one trace per session; their timed runs
are put back in the order they ran (``rotated_runs``) so that run i still pairs with run i of
another model.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.measure.profile import NodeStats, Profile, stats_ms
from opstudio.core.measure.settings import ProfileSettings
from opstudio.core.measure.timing import UNCERTAIN_PCT, drift_pct, quiet_runs

CONTROL_FLOW = {"If", "Loop", "Scan", "BeamSearch", "GreedySearch", "Sampling",
                "WhisperBeamSearch"}

# What the profile reads of an onnxruntime trace event; the rest (input/output shapes, thread
# scheduling statistics) can be most of a trace's size: a 10k-kernel model run 100 times
# writes a million events.
TRACE_EVENT_CAP = 1_000_000
_EVENT_KEYS = frozenset({"cat", "name", "ts", "dur", "tid", "args"})
_ARGS_KEYS = frozenset({"op_name", "provider"})


# one run of a trace: its ``model_run`` event and its kernels' events
Run = tuple[dict[str, Any], list[dict[str, Any]]]


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


def split_runs(trace: list[dict[str, Any]]) -> list[Run]:
    """``(model_run event, its kernel events)`` for every run in the trace, in order."""
    runs = sorted((e for e in trace if e.get("name") == "model_run" and "dur" in e),
                  key=lambda e: e["ts"])
    kernels = sorted((e for e in trace if e.get("cat") == "Node"
                      and str(e.get("name", "")).endswith("_kernel_time")),
                     key=lambda e: e["ts"])
    starts = [r["ts"] for r in runs]
    out: list[Run] = [(r, []) for r in runs]
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
    all_runs = split_runs(trace)
    runs = all_runs[warmup:] if len(all_runs) > warmup else all_runs
    if timed:
        runs = runs[-timed:]
    notes = []
    if runs and timed and len(all_runs) < warmup + timed:
        # onnxruntime stops recording once its trace holds a million events, silently.
        notes.append(f"onnxruntime's trace holds {len(all_runs)} of the {warmup + timed} runs "
                     f"(it stops recording at {TRACE_EVENT_CAP:,} events): statistics are over "
                     f"the {len(runs)} timed runs it holds; ask for fewer runs to profile them all")
    return profile_of_runs(model, runs, optimized, profiled_wall_us, plain_wall_us, notes)


def rotated_runs(traces: Sequence[list[dict[str, Any]]], used: Sequence[int],
                 ran: Sequence[int]) -> tuple[list[Run], list[str]]:
    """The timed runs of a model profiled on several sessions, one trace each (onnxruntime's
    profiler is per session), in the order they ran, and what a reader must know of them.
    ``used`` is the session of every timed run, ``ran`` how many runs each session made in
    all, its warm-up first. A trace that stopped recording (``TRACE_EVENT_CAP``) ends the
    runs at the first it lacks: the rest would not pair with the other model's."""
    queues = []
    for j, trace in enumerate(traces):
        runs = split_runs(trace)
        first = ran[j] - sum(1 for s in used if s == j)
        queues.append(iter(runs[first:]))
    out: list[Run] = []
    for j in used:
        run = next(queues[j], None)
        if run is None:
            break
        out.append(run)
    notes = []
    if out and len(out) < len(used):
        notes.append(f"onnxruntime's traces hold {len(out)} of the {len(used)} timed runs in "
                     f"order (each stops recording at {TRACE_EVENT_CAP:,} events): statistics "
                     "are over those; ask for fewer runs to profile them all")
    return out, notes


def profile_of_runs(model: onnx.ModelProto, runs: Sequence[Run],
                    optimized: onnx.ModelProto | None = None,
                    profiled_wall_us: list[float] | None = None,
                    plain_wall_us: list[float] | None = None,
                    notes: Sequence[str] = ()) -> Profile:
    """Statistics per original node over the timed ``runs`` of a trace (``split_runs``)."""
    from opstudio.core.measure.attribution import attribute

    if not runs:
        raise OpstudioError("onnxruntime's profile holds no model run")
    notes = list(notes)
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
