"""A profile's types: the figures per original node and for the whole run, as ``profiler``
measures them, and their JSON, CSV and Chrome-trace forms."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from opstudio.core.measure.memory import Memory
from opstudio.core.measure.settings import ProfileSettings
from opstudio.core.model.tensors import TensorInfo

STAT_KEYS = ("mean", "p50", "p90", "min", "std")


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
    # which of the model's plain sessions each plain run ran on (``PLAIN_SESSIONS``), and
    # which of its profiled sessions each profiled run (and its operators' figures) came from
    plain_sessions: list[int] = field(default_factory=list, repr=False, compare=False)
    profiled_sessions: list[int] = field(default_factory=list, repr=False, compare=False)
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

