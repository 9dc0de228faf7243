"""Per-node sensitivity: what each technique, applied to one node alone, costs and buys.

For every candidate node × technique (default params) we need two numbers:

- the output error when only that node is rewritten (cosine and SNR of every model output
  against the original, on the same inputs). This is measured one candidate at a time, in a
  child process per technique, so a rewrite that crashes onnxruntime costs one candidate only;
- the latency change of that node, as medians over the timed runs (robust to a busy machine).
  Profiling a model per candidate would cost minutes on a real model; instead each technique is applied to *all* its candidates at once and profiled
  once: the profiler attributes every kernel to its original node (provenance), which gives each
  node's time after. Interactions (cache effects between neighbours) are second order and the
  combined plan is verified end to end by the advisor anyway.

Results are cached on disk per model bytes, settings and techniques.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import Cancelled, ContractBroken, OpstudioError
from opstudio.core.isolation import call_isolated
from opstudio.core.measure.inputs import make_inputs
from opstudio.core.measure.profiler import Profile, ProfileSettings, profile_model
from opstudio.core.model.model_io import load_model
from opstudio.core.passes import ScanParams, default_scan
from opstudio.core.plan import reasons
from opstudio.core.plan.timer import measured_timer
from opstudio.core.progress import CancelCheck, Progress, clamped, part, stopper

# Technique -> the params a sensitivity scan tries (a list: each variant is measured as its own
# candidate), as each technique's Pass declares them (``Pass.scan_params``).
DEFAULT_TECHNIQUES: dict[str, ScanParams] = default_scan()
# Op types worth scanning: the ones that carry weights and time.
SCANNED_OP_TYPES = ("MatMul", "Gemm", "Conv", "ConvTranspose")
# Bumped when what a cached scan holds changes (2: refusals are kept; 3: keyed by the
# onnxruntime and opstudio versions too, which change what a rewrite produces and costs).
CACHE_FORMAT = "3"


@dataclass
class Candidate:
    node: str
    op_type: str
    technique: str
    params: dict[str, Any]
    before_ms: float
    after_ms: float | None = None
    cosine: float | None = None  # worst over the model's float outputs
    snr_db: float | None = None  # worst over the model's float outputs; inf = identical
    error: str | None = None  # why the candidate could not be measured
    # Share of the node's measured saving that the whole model kept (see ``end_to_end``).
    discount: float = 1.0
    # Which of several param sets of one technique this is ("" when there is only one).
    variant: str = ""

    @property
    def label(self) -> str:
        return f"{self.technique} ({self.variant})" if self.variant else self.technique

    @property
    def key(self) -> str:
        """Unique per node, technique and variant: ``node/technique (variant)``."""
        return f"{self.node}/{self.label}"

    @property
    def gain_ms(self) -> float:
        if self.after_ms is None:
            return 0.0
        return (self.before_ms - self.after_ms) * self.discount

    @property
    def noise_ratio(self) -> float:
        """Error power / signal power (10^(-SNR/10)); additive for independent errors."""
        if self.snr_db is None:
            return math.inf
        return 0.0 if math.isinf(self.snr_db) else 10 ** (-self.snr_db / 10)

    @property
    def usable(self) -> bool:
        return self.error is None and self.after_ms is not None and self.snr_db is not None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["gain_ms"] = self.gain_ms
        if self.snr_db is not None and math.isinf(self.snr_db):
            data["snr_db"] = None
            data["identical"] = True
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Candidate:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if data.get("identical"):
            fields["snr_db"] = math.inf
        return cls(**fields)


def scan_entries(techniques: Mapping[str, ScanParams]) -> list[tuple[str, dict[str, Any], str]]:
    """``(technique, params, variant label)`` for every param set to measure.

    A variant is named by the params in which it differs from the technique's other variants
    (``per_channel=true``); a technique with one param set has no variant label."""
    entries: list[tuple[str, dict[str, Any], str]] = []
    for technique, value in techniques.items():
        sets = [dict(value)] if isinstance(value, Mapping) else [dict(v) for v in value]
        if len(sets) == 1:
            entries.append((technique, sets[0], ""))
            continue
        keys = sorted({k for p in sets for k in p})
        differ = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in sets}) > 1]
        for params in sets:
            label = ", ".join(f"{k}={json.dumps(params.get(k))}" for k in differ)
            entries.append((technique, params, label))
    return entries


@dataclass
class Sensitivity:
    baseline: Profile
    candidates: list[Candidate] = field(default_factory=list)
    techniques: dict[str, Any] = field(default_factory=dict)
    # Slow weighted nodes a technique's own check refused, never tried: technique -> node -> why.
    refused: dict[str, dict[str, str]] = field(default_factory=dict)

    def for_node(self, name: str) -> list[Candidate]:
        return [c for c in self.candidates if c.node == name]

    def why_nothing_applies(self) -> str | None:
        """When no candidate could be applied at all (each was refused, or failed when tried),
        the reasons, grouped per technique with counts; else None. This is not "nothing pays":
        there, rewrites were made and measured, and none was worth it."""
        if any(c.error is None for c in self.candidates):
            return None
        why = [f"{technique}: {reason}" for technique, nodes in self.refused.items()
               for reason in nodes.values()]
        why += [f"{c.label}: {_bare(c.error or '')}" for c in self.candidates]
        if not why:
            return ("the model has no " + ", ".join(SCANNED_OP_TYPES[:-1])
                    + f" or {SCANNED_OP_TYPES[-1]} node to rewrite")
        return f"{len(why)} tries — " + reasons.summarise(why, limit=4)

    def to_json(self) -> dict[str, Any]:
        return {"baseline": self.baseline.to_json(), "techniques": self.techniques,
                "candidates": [c.to_json() for c in self.candidates],
                "refused": {t: dict(n) for t, n in self.refused.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sensitivity:
        return cls(baseline=Profile.from_json(data["baseline"]),
                   candidates=[Candidate.from_json(c) for c in data["candidates"]],
                   techniques=dict(data.get("techniques", {})),
                   refused={t: dict(n) for t, n in data.get("refused", {}).items()})


_STEP_PREFIX = re.compile(r"^step \d+ \([^)]*\): (node '[^']*' \([^)]*\) cannot take [\w-]+: )?")


def _bare(error: str) -> str:
    """An optimizer error without the step and node it names: the cause alone."""
    return _STEP_PREFIX.sub("", error)


def split_rows(before: Profile, after: Profile,
               weighted: set[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-node times before and after, when kernels cover several nodes.

    A rewrite often changes how onnxruntime groups nodes: INT8 on three projections that read
    the same activation shares one quantization of it, which the profile reports with one of
    them. The before/after rows are matched as groups (``compare.match_nodes``) and each
    group's time is split evenly over its weighted nodes, so the shared cost is shared too and
    no node's time goes missing because another node heads its group."""
    from opstudio.core.measure.compare import match_nodes

    split_b: dict[str, float] = {}
    split_a: dict[str, float] = {}
    for row in match_nodes(before, after):
        members = row.group or [row.name]
        owners = [m for m in members if m in weighted] or members
        for m in owners:
            # a node only one side has (removed/added) costs nothing on the other
            split_b[m] = (row.before_ms or 0.0) / len(owners)
            split_a[m] = (row.after_ms or 0.0) / len(owners)
    return split_b, split_a


def run_time(profile: Profile) -> float:
    """Median time of one run: unprofiled when it was measured, else profiled."""
    plain = (profile.plain_ms or {}).get("p50")
    return plain if plain else profile.total_ms.get("p50", 0.0)


def end_to_end(model_gain_ms: float, node_gain_ms: float) -> float:
    """How much of the per-node savings of a technique to believe.

    Some costs of a rewrite land outside the node it rewrote: casts onnxruntime inserts where
    it has no FP16 kernel, layout reorders, a lost fusion with the neighbour. So when all of a
    technique's candidates are applied together, their per-node savings may not add up to what
    the whole model gained. The savings are then scaled down to the model's gain (to nothing if
    the model got slower); never up, since the model's gain also holds untouched nodes' noise.
    """
    if node_gain_ms <= 0:
        # the nodes did not gain in sum: a lone node's "saving" is then most likely noise
        return 1.0 if model_gain_ms > 0 else 0.0
    return max(0.0, min(1.0, model_gain_ms / node_gain_ms))


def worst_output_error(report: Any) -> tuple[float | None, float | None]:
    """(min cosine, min SNR dB) over an AccuracyReport's float outputs."""
    cosines = [o.cosine for o in report.outputs if o.cosine is not None]
    snrs = [o.snr_db for o in report.outputs if o.snr_db is not None]
    return (min(cosines) if cosines else None, min(snrs) if snrs else None)


def pick_candidates(model: onnx.ModelProto, baseline: Profile, techniques: Iterable[str],
                    max_nodes: int = 40, coverage: float = 0.97
                    ) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """Technique -> nodes worth scanning: the slowest weighted nodes that cover ``coverage`` of
    their op types' time, at most ``max_nodes``, filtered by each pass's own check; and the
    refusals of that check, technique -> node -> why."""
    from opstudio.core.passes import get_pass

    by_name = {n.name: n for n in model.graph.node}
    ranked = [s for s in baseline.nodes if s.name in by_name
              and by_name[s.name].op_type in SCANNED_OP_TYPES]
    total = sum(s.mean_ms for s in ranked) or 1.0
    chosen: list[str] = []
    acc = 0.0
    for s in ranked:
        if len(chosen) >= max_nodes or acc / total >= coverage:
            break
        chosen.append(s.name)
        acc += s.mean_ms
    out: dict[str, list[str]] = {}
    refused: dict[str, dict[str, str]] = {}
    for technique in techniques:
        pass_ = get_pass(technique)
        out[technique] = []
        for name in chosen:
            why = pass_.check_any(model, by_name[name], getattr(techniques, "get", lambda _: None)(technique))
            if why is None:
                out[technique].append(name)
            else:
                refused.setdefault(technique, {})[name] = why
    return out, refused


def analyze_sensitivity(model_path: str | os.PathLike[str], settings: ProfileSettings | None = None,
                        techniques: Mapping[str, ScanParams] | None = None, *,
                        max_nodes: int = 40, inputs: dict[str, np.ndarray] | None = None,
                        baseline: Profile | None = None, use_cache: bool = True,
                        progress: Progress | None = None,
                        cancelled: CancelCheck | None = None) -> Sensitivity:
    settings = settings or ProfileSettings()
    techniques = {k: (dict(v) if isinstance(v, Mapping) else [dict(x) for x in v])
                  for k, v in (techniques or DEFAULT_TECHNIQUES).items()}
    entries = scan_entries(techniques)
    path = Path(model_path)
    key = cache_key(path, settings, techniques, max_nodes)
    cache = _cache_dir() / f"{key}.json"
    if use_cache and cache.is_file():
        try:
            return Sensitivity.from_json(json.loads(cache.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            pass

    say = clamped(progress)
    stop = stopper(cancelled)

    model = load_model(path, lazy=True)  # inputs and the candidates' checks: no weight is copied
    if inputs is None:
        inputs = make_inputs(model, dims=settings.dims, shapes=settings.shapes,
                             npz_path=settings.inputs_path, seed=settings.seed,
                             phase=settings.phase, past=settings.past, model_path=path)
    if baseline is None:
        say(0.0, "profiling the original model")
        baseline = profile_model(path, settings, inputs=inputs, cancelled=cancelled,
                                 progress=part(say, 0.0, 0.2))
    plan, refused = pick_candidates(model, baseline, techniques, max_nodes=max_nodes)
    before = {s.name: s.p50_ms for s in baseline.nodes}
    weighted = {n.name for n in model.graph.node if n.op_type in SCANNED_OP_TYPES}
    op_type = {n.name: n.op_type for n in model.graph.node}
    result = Sensitivity(baseline=baseline, techniques=techniques, refused=refused)
    n_tech = max(1, len(entries))
    for t_index, (technique, params, variant) in enumerate(entries):
        nodes = plan.get(technique) or []
        if not nodes:
            continue
        lo = 0.2 + 0.8 * t_index / n_tech
        span = 0.8 / n_tech
        name = f"{technique} ({variant})" if variant else technique
        stop()
        say(lo, f"{name}: error of {len(nodes)} nodes, one at a time")
        errors = call_isolated(_errors_one_at_a_time, str(path), technique, params,
                               nodes, inputs, timeout=settings.timeout_s * 4,
                               cancelled=cancelled, progress=part(say, lo, lo + 0.6 * span))
        stop()
        say(lo + 0.6 * span, f"{name}: profiling all {len(nodes)} rewritten together")
        after: dict[str, float] = {}
        split_before: dict[str, float] = {}
        discount = 1.0
        failure = None
        try:
            from opstudio.core.plan.optimize import optimize
            from opstudio.core.plan.recipe import Recipe, Step

            applied = [n for n in nodes if errors.get(n, {}).get("error") is None]
            if applied:
                combined = optimize(model, Recipe([Step(technique, params, nodes=applied)]),
                                    inputs=inputs).model
                prof = profile_model(combined, settings, inputs=inputs, cancelled=cancelled,
                                     progress=part(say, lo + 0.6 * span, lo + span))
                split_before, after = split_rows(baseline, prof, weighted)
                # The two profiles were taken at different moments; if the machine got busier
                # or quieter in between, every node moved with it. Timed in alternation, the
                # whole-model ratio is free of that drift: scale the after-profile to it.
                say(lo + span * 0.95, f"{name}: timing the model with and without it")
                ratio = measured_timer(str(path), inputs, settings.threads, time_budget_s=3.0,
                                       timeout_s=settings.timeout_s, cancelled=cancelled)(
                    Recipe([Step(technique, params, nodes=applied)]), Recipe([]))
                base_total = baseline.total_ms.get("p50") or 0.0
                after_total = prof.total_ms.get("p50") or 0.0
                if base_total > 0 and after_total > 0:
                    scale = base_total * ratio.median / after_total
                    after = {k: v * scale for k, v in after.items()}
                node_gain = sum(split_before[n] - after[n] for n in applied if n in after)
                discount = end_to_end(run_time(baseline) * (1.0 - ratio.median), node_gain)
        except Cancelled:
            raise
        except (OpstudioError, ContractBroken) as exc:
            failure = str(exc)
        for node in nodes:
            e = errors.get(node, {})
            result.candidates.append(Candidate(
                node=node, op_type=op_type[node], technique=technique, params=dict(params),
                before_ms=split_before.get(node, before.get(node, 0.0)),
                after_ms=after.get(node) if failure is None and e.get("error") is None else None,
                cosine=e.get("cosine"), snr_db=e.get("snr_db"),
                error=e.get("error") or failure, discount=discount, variant=variant))
    say(1.0, "sensitivity done")
    if use_cache:
        try:
            from opstudio.core.fileio import write_text_atomic

            cache.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cache, json.dumps(result.to_json()), overwrite=True)
        except OSError:
            pass
    return result


def _errors_one_at_a_time(model_path: str, technique: str, params: Mapping[str, Any],
                          nodes: Sequence[str], inputs: Mapping[str, np.ndarray],
                          progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Runs in a child process: output error of each node rewritten alone."""
    from opstudio.core.measure.accuracy import compare_outputs, run_outputs
    from opstudio.core.plan.optimize import optimize
    from opstudio.core.plan.recipe import Recipe, Step

    model = load_model(model_path)
    reference = run_outputs(model, inputs)
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(nodes):
        if progress is not None:
            progress(i / max(1, len(nodes)), f"{technique}: {name}")
        try:
            rewritten = optimize(model, Recipe([Step(technique, dict(params), nodes=[name])]),
                                 inputs=dict(inputs)).model
            report = compare_outputs(reference, run_outputs(rewritten, inputs))
            cosine, snr = worst_output_error(report)
            out[name] = {"cosine": cosine, "snr_db": snr}
        except (OpstudioError, ContractBroken) as exc:
            out[name] = {"error": str(exc)}
    return out


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "opstudio" / "sensitivity"


def cache_path(key: str, kind: str = "") -> Path:
    """Where a scan keyed ``key`` is cached (``kind`` tells scans of different shapes apart)."""
    return _cache_dir() / (f"{key}.{kind}.json" if kind else f"{key}.json")


def versions() -> dict[str, str]:
    """The software a measurement depends on: a new onnxruntime or opstudio measures anew."""
    import onnxruntime

    from opstudio import __version__

    return {"onnxruntime": onnxruntime.__version__, "opstudio": __version__}


def cache_key(path: Path, settings: ProfileSettings, techniques: Mapping[str, Any],
               max_nodes: int, extra_files: Sequence[str | os.PathLike[str]] = ()) -> str:
    """The model's bytes (and ``extra_files``', e.g. a prompt), the settings, the techniques
    and the software versions."""
    h = hashlib.sha256(CACHE_FORMAT.encode())
    for name in (path, *extra_files):
        with open(name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    h.update(json.dumps(settings.to_json(), sort_keys=True, default=str).encode())
    h.update(json.dumps(techniques, sort_keys=True, default=str).encode())
    h.update(str(max_nodes).encode())
    h.update(json.dumps(versions(), sort_keys=True).encode())
    return h.hexdigest()[:32]
