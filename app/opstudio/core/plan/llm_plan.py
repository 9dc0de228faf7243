"""The advisor for decoder LLMs: next-token agreement on a prompt, latency of the decode step.

An LLM user budgets accuracy as next-token top-1 agreement (or KL divergence) on real text and
latency as the time of one decode step. A 30-layer decoder has ~210 projections; measuring each
technique on each of them alone would take hours. The scan uses what the layers share instead:

- *by role*: a technique is applied to one role (``mlp/up_proj/MatMul``) in every layer at
  once and the prompt's logits are compared before and after (one prefill run each);
- *by layer*: a reference technique (the first variant, INT4) is applied to every role of one
  layer alone, for a few layers (first, last, evenly between; interpolated in between), which
  ranks how sensitive each layer is;
- the error of a technique on role r in layer l is predicted as the role's error times layer l's
  share of the layers' sensitivity (errors in KL add up for small, independent perturbations);
  these errors are measured on the first half of the judged tokens only, and a plan is held to
  the budget on the second half, by a confidence bound (``judged``, ``Budget.confidence``);
- latency: each technique on every node it takes, the whole model timed against the original
  in alternation (decode step by default), and the saving spread over the nodes by the weight
  bytes each one stops reading (a decode step is memory-bound).

The plan is a multiple-choice knapsack over (layer, role) units: at most one technique per unit
(structured pruning of a gated MLP takes its gate, up and down projections together), most
saving within a predicted KL limit, chosen greedily by saving per unit of KL. The limit is then
searched with real measurements: a plan is applied and its top-1 agreement and KL measured on
the prompt; the largest limit whose plan holds the budget wins. Every measured plan is a point
on the frontier (agreement against decode speedup), shown beside the whole-model variants.

Every measurement is cached as soon as it is made (keyed by the model's and prompt's bytes,
the settings, the variants and the onnxruntime and opstudio versions), so an interrupted scan
resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import heapq
import importlib.util
import inspect
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from opstudio.core.errors import ContractBroken, OpstudioError
from opstudio.core.measure.accuracy import SYNTHETIC
from opstudio.core.model.runtime import create_session, session_options
from opstudio.core.progress import CancelCheck, Progress, clamped, part, stopper

if TYPE_CHECKING:
    from opstudio.core.plan.scan_executor import RayScan

SCANNED = ("MatMul", "Gemm")
# layers measured alone to rank layer sensitivity (all of them when there are this few)
LAYER_SAMPLES = 8
# a variant whose whole-model time ratio is not below this is not worth any error
MIN_SPEEDUP = 0.98
# predicted-KL limits tried around the first guess, and the bisection steps between
MAX_VERIFY = 7
# the final plan-against-start timing runs this many times the scan's time per variant
FINAL_TIMING = 3
# a variant at least this many times less accurate (KL) than a no slower one is not scanned
DOMINANCE = 10.0
# plans whose predicted savings differ by less than this share of the step's time are a tie
# (paired decode timings resolve about ±0.5–1 %): the more accurate one is chosen
TIE_SHARE = 0.005
CACHE_KIND = "llm"
# bumped when what a cached measurement holds changes (3: the judged positions, KL's standard
# error and the search and confirming halves, which the budget's confidence bound needs)
SCAN_FORMAT = 3
# child processes measuring accuracy side by side (each rewrite is mostly single-threaded Python)
ACCURACY_WORKERS = 2


@dataclass(frozen=True)
class Variant:
    """One technique with one param set, as the scan tries it."""

    id: str
    technique: str
    params: dict[str, Any]
    label: str
    # lowrank: kept rank as a share of the rank at which the factors read as many bytes as
    # the weight (so 0.5 halves the bytes); resolved per node shape
    rank_share: float | None = None

    def params_for(self, k: int, n: int) -> dict[str, Any]:
        params = dict(self.params)
        if self.rank_share is not None:
            even = k * n / (k + n)
            params["rank"] = max(1, round(self.rank_share * even / 16) * 16)
        return params

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def default_variants(calibration: str = "random", *, torch: bool | None = None,
                     gptq: bool = False, hqq: bool = False, rtn: bool = False) -> list[Variant]:
    """What the LLM scan tries: INT4 weight-only with activation-aware scaling (AWQ,
    calibrated on the prompt) in blocks of 32 and of 64 (round to nearest, HQQ and GPTQ when
    asked, the last two with torch), INT8 weight-only in blocks of 32 and of 64, INT8 dynamic
    per channel, activation-aware low-rank (SVD-LLM) and joint structured pruning of gated
    MLPs. Accuracy levels are left to ``auto``: the level measured fastest here.

    Blocks of 64 decode ~4 % faster than blocks of 32 on a 135M decoder (fewer scales to
    read) for a somewhat larger error, in INT4 and in INT8 alike (INT8 b64: 1.05× INT8 b32's
    speed at 1.6× its KL; b128 and b256 are no faster than b64), so the plan can pick per
    unit. Plain rounding shares AWQ's kernel and speed at a larger error, so it is only tried
    when asked; HQQ's float zero points keep MatMulNBits off its fast CPU kernels (5× slower
    than float32)."""
    if torch is None:
        torch = importlib.util.find_spec("torch") is not None
    cal = {"calibration": calibration, "samples": 1}

    def awq(block: int) -> dict[str, Any]:
        return {"block_size": block, "symmetric": False, "algorithm": "awq",
                "accuracy_level": "auto", **cal}

    out = [Variant("int4-awq", "int4-weight", awq(32), "INT4 AWQ"),
           Variant("int4-awq64", "int4-weight", awq(64), "INT4 AWQ, blocks of 64")]
    if rtn:
        out.append(Variant("int4-rtn", "int4-weight", {"block_size": 32, "symmetric": True,
                                                        "accuracy_level": "auto"}, "INT4 RTN"))
    if torch and hqq:
        out.append(Variant("int4-hqq", "int4-weight", {"block_size": 32, "algorithm": "hqq",
                                                        "accuracy_level": "auto"}, "INT4 HQQ"))
    if torch and gptq:
        out.append(Variant("int4-gptq", "int4-weight",
                           {"block_size": 32, "algorithm": "gptq", **cal}, "INT4 GPTQ"))
    out += [
        Variant("int8-weight", "int8-weight", {"block_size": 32, "accuracy_level": "auto"},
                "INT8 weight-only"),
        Variant("int8-weight64", "int8-weight", {"block_size": 64, "accuracy_level": "auto"},
                "INT8 weight-only, blocks of 64"),
        Variant("int8-dynamic", "int8-dynamic", {"per_channel": True}, "INT8 dynamic"),
        Variant("svd-llm", "lowrank", {"method": "svd-llm", **cal}, "low-rank SVD-LLM",
                rank_share=0.5),
        Variant("prune-mlp", "prune", {"structured": True, "sparsity": 0.25,
                                        "importance": "activation", **cal},
                "prune 25 % of MLP"),
    ]
    return out


LLM_TECHNIQUES = ("int4-weight", "int8-weight", "int8-dynamic", "lowrank", "prune")


def variants_for(techniques: Sequence[str] | Mapping[str, Any], calibration: str = "random",
                 algorithms: Sequence[str] | None = None) -> list[Variant]:
    """The default variants of the named techniques (INT4 ``algorithms`` when given: awq,
    rtn, hqq, gptq). A technique the LLM scan has no variant for is an error."""
    names = list(techniques)
    unknown = [t for t in names if t not in LLM_TECHNIQUES]
    if unknown:
        raise OpstudioError(f"the next-token advisor does not try {', '.join(unknown)}; it "
                            f"tries {', '.join(LLM_TECHNIQUES)}")
    wanted = set(algorithms or ())
    out = [v for v in default_variants(calibration, gptq="gptq" in wanted, hqq="hqq" in wanted,
                                       rtn="rtn" in wanted)
           if v.technique in names]
    if algorithms is not None:
        out = [v for v in out if v.technique != "int4-weight"
               or v.params.get("algorithm", "rtn") in wanted]
        if "int4-weight" in names and not any(v.technique == "int4-weight" for v in out):
            raise OpstudioError(f"INT4 algorithm(s) {', '.join(sorted(wanted))} unavailable "
                                "(hqq and gptq need torch: pip install 'opstudio[llm]')")
    if not out:
        raise OpstudioError("no technique to try")
    return out


@dataclass
class Target:
    """A weighted node the scan may rewrite: where it sits and how big its weight is."""

    node: str
    layer: int | None
    role: str
    k: int
    n: int

    @property
    def unit(self) -> tuple[int, str]:
        return (-1 if self.layer is None else self.layer, self.role)


@dataclass
class RoleResult:
    variant: str
    role: str
    nodes: list[str]
    top1: float | None = None
    kl: float | None = None
    error: str | None = None


@dataclass
class WholeResult:
    """A variant on every node it takes: accuracy, and decode time against the original."""

    variant: str
    nodes: int
    top1: float | None = None
    kl: float | None = None
    ratio: float | None = None  # time after / before, median of interleaved pairs
    low: float | None = None
    high: float | None = None
    error: str | None = None
    confirm: dict[str, Any] | None = None  # on the confirming half of the judged tokens

    @property
    def speedup(self) -> float | None:
        return None if not self.ratio else 1.0 / self.ratio


@dataclass
class FrontierPoint:
    label: str
    top1: float | None
    kl: float | None
    speedup: float | None
    low: float | None = None  # speedup interval
    high: float | None = None
    kind: str = "plan"  # "plan" or "whole"
    limit: float | None = None  # the predicted-KL limit of a plan
    holds: bool = False


@dataclass
class Choice:
    """What the plan does to one (layer, role) unit."""

    layer: int
    role: str
    variant: str
    nodes: list[str]
    gain_ms: float
    kl: float


@dataclass
class LlmAdvice:
    budget: Any  # advisor.Budget
    phase: str
    base_ms: float
    variants: list[Variant]
    roles: list[RoleResult]
    whole: list[WholeResult]
    layer_kl: dict[int, float]
    layer_measured: list[int]
    chosen: list[Choice]
    recipe: Any  # recipe.Recipe
    verified: dict[str, float | None] | None
    speedup: FrontierPoint | None
    frontier: list[FrontierPoint]
    refused: dict[str, dict[str, str]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    seconds: float = 0.0
    nothing_applies: str | None = None

    def variant(self, vid: str) -> Variant:
        return next(v for v in self.variants if v.id == vid)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "llm", "budget": self.budget.to_json(), "phase": self.phase,
            "base_ms": self.base_ms, "variants": [v.to_json() for v in self.variants],
            "roles": [asdict(r) for r in self.roles], "whole": [asdict(w) for w in self.whole],
            "layer_kl": {str(k): v for k, v in self.layer_kl.items()},
            "layer_measured": list(self.layer_measured),
            "chosen": [asdict(c) for c in self.chosen],
            "recipe": self.recipe.to_json(), "verified": self.verified,
            "speedup": None if self.speedup is None else asdict(self.speedup),
            "frontier": [asdict(p) for p in self.frontier],
            "refused": self.refused, "log": list(self.log), "seconds": self.seconds,
            "nothing_applies": self.nothing_applies}


# --- targets -------------------------------------------------------------------------------

def find_targets(model: onnx.ModelProto) -> list[Target]:
    """Every MatMul/Gemm with a constant 2-D weight, with its layer and role."""
    from opstudio.core.model.layers import scope_of
    from opstudio.core.passes import constant_value

    shapes = _weight_shapes(model)
    out = []
    for node in model.graph.node:
        if node.op_type not in SCANNED or len(node.input) < 2:
            continue
        shape = shapes.get(node.input[1])
        if shape is None:
            value, _ = constant_value(model, node.input[1])
            shape = None if value is None else tuple(value.shape)
        if shape is None or len(shape) != 2:
            continue
        k, n = shape
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            k, n = n, k
        scope = scope_of(node.name)
        out.append(Target(node.name, scope.layer, scope.role, int(k), int(n)))
    return out


def _weight_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of initializers and of what Cast/Transpose/Identity make of them, without
    reading any weight's data."""
    shapes = {i.name: tuple(int(d) for d in i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if not node.input or node.input[0] not in shapes:
            continue
        src = shapes[node.input[0]]
        if node.op_type in ("Cast", "Identity"):
            shapes[node.output[0]] = src
        elif node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"),
                        list(range(len(src)))[::-1])
            shapes[node.output[0]] = tuple(src[p] for p in perm)
    return shapes


def applicable(model: onnx.ModelProto, targets: Sequence[Target], variant: Variant
               ) -> tuple[list[Target], dict[str, str]]:
    """The targets ``variant``'s pass can take, and why it refuses the others."""
    from opstudio.core.passes import get_pass

    pass_ = get_pass(variant.technique)
    by_name = {n.name: n for n in model.graph.node}
    ok: list[Target] = []
    refused: dict[str, str] = {}
    for t in targets:
        node = by_name[t.node]
        if variant.technique == "prune" and "gate" not in t.role.lower():
            continue  # a gated MLP is pruned through its gate projection, jointly
        why = _check(pass_, model, node, variant.params_for(t.k, t.n))
        if why is None:
            ok.append(t)
        else:
            refused[t.node] = why
    return ok, refused


def _check(pass_: Any, model: onnx.ModelProto, node: onnx.NodeProto,
           params: Mapping[str, Any]) -> str | None:
    """The pass's own check of ``node`` under ``params`` (a block size or ``structured``
    decides it)."""
    if "params" in inspect.signature(pass_.check).parameters:
        return pass_.check(model, node, pass_.validate_params(params))
    if pass_.technique == "prune":
        return pass_.check(model, node, structured=bool(params.get("structured")))
    if pass_.technique in ("int4-weight", "int8-weight"):
        return pass_.check(model, node, int(params.get("block_size", 32)))
    return pass_.check(model, node)


def recipe_of(variant_nodes: Sequence[tuple[Variant, Sequence[Target]]]) -> Any:
    """One step per technique and param set, in plan order."""
    from opstudio.core.passes import plan_rank
    from opstudio.core.plan.recipe import Recipe, Step

    groups: dict[tuple[str, str], tuple[str, dict[str, Any], list[str]]] = {}
    for variant, targets in variant_nodes:
        for t in targets:
            params = variant.params_for(t.k, t.n)
            key = (variant.technique, json.dumps(params, sort_keys=True))
            groups.setdefault(key, (variant.technique, params, []))[2].append(t.node)
    steps = [Step(technique=tech, params=dict(params), nodes=list(nodes))
             for (tech, _), (_, params, nodes) in sorted(
                 groups.items(), key=lambda kv: (plan_rank(kv[0][0]), kv[0][1]))]
    return Recipe(steps)


# --- measurements (child processes) ----------------------------------------------------------

def apply_recipe(model: onnx.ModelProto, recipe_json: Mapping[str, Any],
                 samples: Sequence[Mapping[str, np.ndarray]]) -> onnx.ModelProto:
    """The passes of a recipe applied in turn, without the optimizer's validity check: for the
    scan's many throwaway rewrites (the final plan goes through ``optimize``)."""
    from opstudio.core.passes import PassContext, get_pass
    from opstudio.core.plan.recipe import Recipe

    current, owned = model, False
    for step in Recipe.from_json(recipe_json).steps:
        pass_ = get_pass(step.technique)
        ctx = PassContext(inputs=list(samples), owns_model=owned)
        if hasattr(ctx, "check_validity"):
            ctx.check_validity = False  # a throwaway rewrite: onnxruntime runs it next anyway
        result = pass_.apply(current, list(step.nodes or []), pass_.validate_params(step.params),
                             ctx)
        current, owned = result.model, True
    return current


def _session(model: onnx.ModelProto | str, threads: int, opt_level: str = "disable") -> Any:
    # the scan compares like with like: graph optimizations change neither side's numerics
    # noticeably and cost seconds per session on a 7000-node decoder
    opts = session_options(threads=threads,
                           opt_level="disable" if opt_level == "disable" else "all")
    return create_session(model, opts)


def logits_name(model: onnx.ModelProto, outputs: Mapping[str, np.ndarray]) -> str:
    from opstudio.core.measure.accuracy import output_kind

    names = [k for k, v in outputs.items()
             if np.issubdtype(np.asarray(v).dtype, np.floating)
             and output_kind(k, np.asarray(v)) == "logits"]
    if not names:
        raise OpstudioError("the model has no logits output (a float output named …logits… "
                            "or as wide as a vocabulary): budget it by cosine or SNR instead")
    return names[0]


@dataclass
class HeldOut:
    """A prompt split in two: calibration feeds for the activation-aware techniques, and the
    part of its logits (``rows`` × ``positions``) every rewrite is judged on. Judging on the
    calibration tokens would flatter them: SVD-LLM at a rank above the number of calibration
    positions reproduces those positions exactly, whatever it does to any other text."""

    calibration: dict[str, np.ndarray]
    rows: slice = field(default_factory=lambda: slice(None))
    positions: slice = field(default_factory=lambda: slice(None))
    describe: str = "judged on the calibration tokens too (the prompt is too short to split)"


MIN_SPLIT = 8  # tokens of a one-sequence prompt below which it is not split
# calibration statistics (per-channel activation scales, a Gram matrix's leading directions)
# settle within ~100 tokens, while a top-1 budget needs every judged position it can get
CALIBRATION_TOKENS = 128


def held_out(prompt: Mapping[str, np.ndarray]) -> HeldOut:
    """Several sequences: calibrate on the first, judge on the others. One sequence of T
    tokens: calibrate on its first min(T/2, ``CALIBRATION_TOKENS``) tokens, judge the logits
    of the rest (which still see the whole prompt before them)."""
    ids = next((v for k, v in prompt.items() if np.asarray(v).ndim == 2
                and np.issubdtype(np.asarray(v).dtype, np.integer)
                and "mask" not in k and "position" not in k), None)
    if ids is None:
        return HeldOut(dict(prompt))
    batch, length = np.shape(ids)
    if batch >= 2:
        first = {k: (v[:1] if np.ndim(v) and np.shape(v)[0] == batch else v)
                 for k, v in prompt.items()}
        return HeldOut(first, rows=slice(1, None),
                       describe=f"calibrated on sequence 1, judged on sequences 2–{batch}")
    if length < MIN_SPLIT:
        return HeldOut(dict(prompt))
    half = min(length // 2, CALIBRATION_TOKENS)
    calibration = {k: (v[:, :half] if np.ndim(v) >= 2 and np.shape(v)[:2] == (1, length)
                       else v) for k, v in prompt.items()}
    return HeldOut(calibration, positions=slice(half, None),
                   describe=f"calibrated on the prompt's first {half} tokens, judged on the "
                            f"next-token logits of the other {length - half}")


def next_token_error(ref: np.ndarray, new: np.ndarray,
                     held: HeldOut | None = None) -> tuple[float, float]:
    """Top-1 agreement and mean KL on the judged positions."""
    out = judged(ref, new, held)
    return out["top1"], (out["kl"] if out["kl"] is not None else math.inf)


JUDGED = ("top1", "kl", "kl_se", "positions", "search", "confirm")
# judged positions below which they are not split into a search and a confirming half
MIN_CONFIRM = 16


def judged(ref: np.ndarray, new: np.ndarray, held: HeldOut | None = None) -> dict[str, Any]:
    """Top-1 agreement, mean KL, the KL's standard error and the number of judged positions,
    on all of them and on each half (``search``: the first, ``confirm``: the second).

    The planner ranks units by their error on the search half and holds a plan to the budget
    on the confirming half: a plan assembled from the units that happened to hurt least on
    some text is flattered by that text (on A's held-out tokens, plans chosen at top-1 0.91–0.94
    gave 0.88–0.89 on another prompt); text it was not chosen on is a fair test."""
    from opstudio.core.measure.accuracy import agreement_per_position, kl_per_position

    if held is not None and ref.ndim >= 3:
        ref = ref[held.rows, held.positions]
        new = new[held.rows, held.positions]
    agree = agreement_per_position(ref, new)
    kl = kl_per_position(ref, new)
    out = _stats(agree, kl)
    if kl.size >= 2 * MIN_CONFIRM:
        half = kl.size // 2
        out["search"] = _stats(agree[:half], kl[:half])
        out["confirm"] = _stats(agree[half:], kl[half:])
    return out


def _stats(agree: np.ndarray, kl: np.ndarray) -> dict[str, Any]:
    mean = float(kl.mean()) if kl.size else 0.0
    finite = math.isfinite(mean)
    return {"top1": float(agree.mean()) if agree.size else 1.0,
            "kl": mean if finite else None,
            "kl_se": float(kl.std() / math.sqrt(kl.size)) if finite and kl.size > 1 else None,
            "positions": int(kl.size)}


def half(result: Mapping[str, Any], which: str) -> Mapping[str, Any]:
    """``result``'s ``search`` or ``confirm`` half; the whole of it when it was not split."""
    return result.get(which) or result


def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path | None, data: Mapping[str, Any]) -> None:
    if path is None:
        return
    from opstudio.core.fileio import write_text_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(data), overwrite=True)
    except OSError:
        pass


def _pending(cache: str | None, kind: str, tasks: Sequence[tuple[str, Mapping[str, Any]]]
             ) -> tuple[Path | None, dict[str, Any], dict[str, Any], list[tuple[str, Any]]]:
    """The cache file, its contents, its ``kind`` section and the tasks not in it yet."""
    path = Path(cache) if cache else None
    store = _read_cache(path)
    done: dict[str, Any] = store.setdefault(kind, {})
    return path, store, done, [(i, r) for i, r in tasks if i not in done]


def _reference_logits(model: onnx.ModelProto, session: Any,
                      feeds: Mapping[str, np.ndarray]) -> tuple[str, np.ndarray]:
    """The name of the model's logits output and its value on ``feeds``."""
    names = [o.name for o in session.get_outputs()]
    first = dict(zip(names, session.run(None, dict(feeds))))
    name = logits_name(model, first)
    return name, first[name]


class Judge:
    """The model loaded once with its logits on the prompt; called with a recipe, the
    rewrite's top-1 agreement and KL against them (or why it failed). What a scan job does,
    in a child process here or on a cluster's worker (``scan_executor``)."""

    def __init__(self, model_path: str, prompt: Mapping[str, np.ndarray], threads: int = 0,
                 opt_level: str = "disable") -> None:
        from opstudio.core.model.model_io import load_model

        self.model = load_model(model_path)
        self.prompt, self.threads, self.opt_level = prompt, threads, opt_level
        self.name, self.reference = _reference_logits(
            self.model, _session(self.model, threads, opt_level), prompt)
        self.split = held_out(prompt)

    def __call__(self, recipe_json: Mapping[str, Any]) -> dict[str, Any]:
        try:
            rewritten = apply_recipe(self.model, recipe_json, [self.split.calibration])
            logits = _session(rewritten, self.threads, self.opt_level).run(
                [self.name], dict(self.prompt))[0]
            return judged(self.reference, logits, self.split)
        except (OpstudioError, ContractBroken) as exc:
            return {"error": str(exc)}
        except Exception as exc:  # a pass or onnxruntime refusing a combination
            return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def measure_accuracy(model_path: str, prompt: Mapping[str, np.ndarray],
                     tasks: Sequence[tuple[str, Mapping[str, Any]]], cache: str | None,
                     threads: int = 0, opt_level: str = "disable",
                     progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Runs in a child: top-1 agreement and KL of the prompt's logits for each ``(id,
    recipe)``, the model loaded once; each result is written to ``cache`` as it comes."""
    path, store, done, todo = _pending(cache, "accuracy", tasks)
    if todo:
        judge = Judge(model_path, prompt, threads, opt_level)
        for index, (task_id, recipe_json) in enumerate(todo):
            if progress is not None:
                progress(index / len(todo), f"accuracy: {task_id}")
            done[task_id] = judge(recipe_json)
            store["accuracy"] = done
            _write_cache(path, store)
    return {i: done[i] for i, _ in tasks if i in done}


def _merge_parts(cache: str | None) -> dict[str, Any]:
    """The cached accuracy results, with those of parallel workers (``<cache>.partN``, left
    behind by an interrupted run too) merged in and their files removed."""
    if cache is None:
        return {}
    main = Path(cache)
    store = _read_cache(main)
    done = store.setdefault("accuracy", {})
    parts = sorted(main.parent.glob(main.name + ".part*"))
    for piece in parts:
        done.update(_read_cache(piece).get("accuracy", {}))
    if parts:
        _write_cache(main, store)
        for piece in parts:
            piece.unlink(missing_ok=True)
    return done


def accuracy_in_parallel(model_path: str, prompt: Mapping[str, np.ndarray],
                         tasks: Sequence[tuple[str, Mapping[str, Any]]], cache: str | None,
                         threads: int = 0, workers: int = 2, timeout: float | None = None,
                         cancelled: CancelCheck | None = None,
                         progress: Progress | None = None,
                         cluster: RayScan | None = None) -> dict[str, dict[str, Any]]:
    """``measure_accuracy`` split over ``workers`` child processes: most of a rewrite's time is
    the pass's single-threaded Python, so two of them keep two cores busy. Each writes its own
    part of the cache; the parts are merged when they are done (or on the next run). With a
    ``cluster``, the jobs run on its workers instead, each result cached as it arrives."""
    from concurrent.futures import ThreadPoolExecutor

    from opstudio.core.isolation import call_isolated

    done = _merge_parts(cache)
    if cluster is not None:
        path, store, done, todo = _pending(cache, "accuracy", tasks)

        def keep(task_id: str, result: dict[str, Any]) -> None:
            done[task_id] = result
            _write_cache(path, store)

        cluster.run(Judge, (cluster.model_path, prompt, 1), todo, keep, timeout=timeout,
                    cancelled=cancelled, progress=progress, task="judging")
        return {i: done[i] for i, _ in tasks if i in done}
    todo = [(i, r) for i, r in tasks if i not in done]
    workers = max(1, min(workers, len(todo)))
    if todo:
        shares = [todo[w::workers] for w in range(workers)]
        fractions = [0.0] * workers

        def run(w: int) -> dict[str, dict[str, Any]]:
            def report(f: float, m: str) -> None:
                fractions[w] = f
                if progress is not None:
                    progress(sum(fractions) / workers, m)

            part = None if cache is None else f"{cache}.part{w}"
            return call_isolated(measure_accuracy, model_path, prompt, shares[w], part,
                                 threads if workers == 1 else max(1, threads // workers),
                                 timeout=timeout, cancelled=cancelled, progress=report,
                                 task="measuring accuracy")

        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(run, range(workers)))
        for r in results:
            done.update(r)
        merged = _merge_parts(cache)
        done.update(merged)
    return {i: done[i] for i, _ in tasks if i in done}


def build_and_judge(model_path: str, prompt: Mapping[str, np.ndarray],
                    tasks: Sequence[tuple[str, Mapping[str, Any]]], folder: str,
                    threads: int = 0, progress: Progress | None = None
                    ) -> dict[str, dict[str, Any]]:
    """Runs in a child: each recipe applied, judged on the prompt and saved in ``folder``,
    for ``measure_speed`` to time (models are built side by side, timed together)."""
    from opstudio.core.model.model_io import load_model, save_model

    model = load_model(model_path)
    name, reference = _reference_logits(model, _session(model, threads), prompt)
    split = held_out(prompt)
    out: dict[str, dict[str, Any]] = {}
    for index, (task_id, recipe_json) in enumerate(tasks):
        if progress is not None:
            progress(index / len(tasks), f"building {task_id}")
        try:
            rewritten = apply_recipe(model, recipe_json, [split.calibration])
            result = judged(
                reference, _session(rewritten, threads).run([name], dict(prompt))[0], split)
            target = Path(folder) / f"{hashlib.sha1(task_id.encode()).hexdigest()[:16]}.onnx"
            save_model(rewritten, target, overwrite=True)
            out[task_id] = {"path": str(target), **result}
        except Exception as exc:  # reported per task
            out[task_id] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return out


def speed_in_parallel(model_path: str, timed: Mapping[str, np.ndarray],
                      prompt: Mapping[str, np.ndarray],
                      tasks: Sequence[tuple[str, Mapping[str, Any]]], cache: str | None,
                      threads: int = 0, time_budget_s: float = 8.0, workers: int = 2,
                      timeout: float | None = None, cancelled: CancelCheck | None = None,
                      progress: Progress | None = None,
                      cluster: RayScan | None = None) -> dict[str, dict[str, Any]]:
    """The whole-model variants built and judged by ``workers`` processes side by side
    (``build_and_judge``), then timed together in one (``measure_speed``). With a
    ``cluster``, its workers judge them and they are built again here to be timed: latency
    is this machine's."""
    from concurrent.futures import ThreadPoolExecutor

    from opstudio.core.isolation import call_isolated
    from opstudio.core.tempdir import opstudio_tempdir

    done = _read_cache(Path(cache)).get("speed", {}) if cache else {}
    todo = [(i, r) for i, r in tasks if i not in done]
    if not todo:
        return {i: done[i] for i, _ in tasks if i in done}
    if cluster is not None:
        judged_there = accuracy_in_parallel(
            model_path, prompt, todo, cache, threads, timeout=timeout, cancelled=cancelled,
            progress=None if progress is None else lambda f, m: progress(0.5 * f, m),
            cluster=cluster)
        return call_isolated(measure_speed, model_path, timed, [held_out(prompt).calibration],
                             tasks, cache, threads, time_budget_s, None, judged_there,
                             timeout=timeout, cancelled=cancelled,
                             progress=(None if progress is None else
                                       lambda f, m: progress(0.5 + 0.5 * f, m)),
                             task="timing the variants")
    workers = max(1, min(workers, len(todo)))
    fractions = [0.0] * workers
    with opstudio_tempdir(prefix="variants-") as folder:
        def run(w: int) -> dict[str, dict[str, Any]]:
            def report(f: float, m: str) -> None:
                fractions[w] = f
                if progress is not None:
                    progress(0.7 * sum(fractions) / workers, m)

            return call_isolated(build_and_judge, model_path, prompt, todo[w::workers],
                                 str(folder), threads if workers == 1 else 1,
                                 timeout=timeout, cancelled=cancelled, progress=report,
                                 task="building the variants")

        with ThreadPoolExecutor(max_workers=workers) as pool:
            built: dict[str, dict[str, Any]] = {}
            for r in pool.map(run, range(workers)):
                built.update(r)
        return call_isolated(measure_speed, model_path, timed, [], tasks, cache, threads,
                             time_budget_s, None, built, timeout=timeout, cancelled=cancelled,
                             progress=(None if progress is None else
                                       lambda f, m: progress(0.7 + 0.3 * f, m)),
                             task="timing the variants")


def measure_speed(model_path: str, decode: Mapping[str, np.ndarray],
                  samples: Sequence[Mapping[str, np.ndarray]],
                  tasks: Sequence[tuple[str, Mapping[str, Any]]], cache: str | None,
                  threads: int = 0, time_budget_s: float = 8.0,
                  judge: Mapping[str, np.ndarray] | None = None,
                  prebuilt: Mapping[str, Mapping[str, Any]] | None = None,
                  progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Runs in a child: each recipe's model against the original, all timed in alternation
    on ``decode`` (ratios of paired runs with their interval), and the original's median ms;
    with ``judge`` (the prompt) also each model's top-1 agreement and KL on it, so a model
    built once is both timed and judged. ``prebuilt``: task -> ``build_and_judge``'s result,
    models judged (and built, when they name a ``path``) beforehand by other processes."""
    from opstudio.core.measure.timing import interleaved_times, paired_ratio, session
    from opstudio.core.model.model_io import load_model

    path, store, done, todo = _pending(cache, "speed", tasks)
    if todo:
        model = load_model(model_path)
        sessions = {"": session(model, threads)}
        errors: dict[str, dict[str, Any]] = {}
        name: str | None = None
        reference: np.ndarray | None = None
        split = held_out(judge) if judge is not None else None
        if judge is not None and not prebuilt:
            name, reference = _reference_logits(model, sessions[""], judge)
        for index, (task_id, recipe_json) in enumerate(todo):
            if progress is not None:
                progress(0.8 * index / len(todo), f"building {task_id}")
            try:
                built = (prebuilt or {}).get(task_id)
                if built is not None and "error" in built:
                    raise OpstudioError(built["error"])
                # judged elsewhere, and maybe built only there (on a cluster's worker)
                sessions[task_id] = session(
                    built["path"] if built is not None and "path" in built
                    else apply_recipe(model, recipe_json, samples), threads)
                if built is not None:
                    errors[task_id] = {k: built[k] for k in JUDGED if k in built}
                    continue
                if reference is not None and judge is not None:
                    errors[task_id] = judged(
                        reference, sessions[task_id].run([name], dict(judge))[0], split)
            except Exception as exc:  # reported per task
                done[task_id] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                sessions.pop(task_id, None)
        if progress is not None:
            progress(0.8, f"timing {len(sessions) - 1} variant(s) against the original")
        times = interleaved_times(sessions, dict(decode), rounds=400, min_rounds=12,
                                  time_budget_s=time_budget_s * max(1, len(sessions) - 1))
        base = times[""]
        timed_ids = [t for t in sessions if t]
        for task_id in timed_ids:
            r = paired_ratio(times[task_id], base)
            # with a few variants, each against each other too: a choice between two of
            # them then rests on their own paired rounds, not on two ratios to a third
            versus = {} if len(timed_ids) > 3 else {
                other: _triple(paired_ratio(times[task_id], times[other]))
                for other in timed_ids if other != task_id}
            done[task_id] = {"ratio": r.median, "low": r.low, "high": r.high,
                             "rounds": r.rounds, "base_ms": float(np.median(base)),
                             "shapes": {k: list(np.shape(v)) for k, v in decode.items()},
                             **({"versus": versus} if versus else {}),
                             **errors.get(task_id, {})}
        store["speed"] = done
        _write_cache(path, store)
    return {i: done[i] for i, _ in tasks if i in done}


def _triple(r: Any) -> list[float]:
    return [r.median, r.low, r.high]


# --- the plan ------------------------------------------------------------------------------

@dataclass
class _Option:
    variant: str
    gain: float
    err: float
    nodes: list[str]
    covers: tuple[tuple[int, str], ...] = ()  # other units this option takes over


def plan_for_limit(options: Mapping[tuple[int, str], Sequence[_Option]], limit: float,
                   start: Mapping[tuple[int, str], _Option] | None = None
                   ) -> dict[tuple[int, str], _Option]:
    """At most one option per unit, greatest total gain with total error ≤ ``limit``, greedily
    by gain per error (an option that covers other units replaces what they had).

    ``start``: an assignment to upgrade from (one technique everywhere that is known to hold
    the budget): the greedy then only moves units to options that save more. A pure greedy
    from nothing spends the error on the most efficient small steps and can end below what one
    technique everywhere gives."""
    current: dict[tuple[int, str], _Option] = dict(start or {})
    locked: set[tuple[int, str]] = {u for o in current.values() for u in o.covers}
    total = sum(o.err for o in current.values())

    def held(unit: tuple[int, str], opt: _Option) -> tuple[float, float]:
        units = [unit, *opt.covers]
        return (sum(current[u].gain for u in units if u in current),
                sum(current[u].err for u in units if u in current))

    def best(unit: tuple[int, str]) -> tuple[float, _Option] | None:
        if unit in locked or (unit in current and current[unit].covers):
            return None
        top: tuple[float, _Option] | None = None
        for opt in options.get(unit, ()):
            if any(u in locked or (u in current and current[u].covers) for u in opt.covers):
                continue
            g0, e0 = held(unit, opt)
            dg, de = opt.gain - g0, opt.err - e0
            if dg <= 0 or total + de > limit * (1 + 1e-9):
                continue
            slope = math.inf if de <= 0 else dg / de
            if top is None or slope > top[0] or (slope == top[0] and dg > top[1].gain - g0):
                top = (slope, opt)
        return top

    heap: list[tuple[float, int, tuple[int, str]]] = []
    order = {u: i for i, u in enumerate(sorted(options))}
    for unit in options:
        b = best(unit)
        if b is not None:
            heapq.heappush(heap, (-b[0], order[unit], unit))
    while heap:
        neg, _, unit = heapq.heappop(heap)
        b = best(unit)
        if b is None:
            continue
        if b[0] < -neg * (1 - 1e-9):
            heapq.heappush(heap, (-b[0], order[unit], unit))
            continue
        opt = b[1]
        _, e0 = held(unit, opt)
        total += opt.err - e0
        for u in opt.covers:
            current.pop(u, None)
            locked.add(u)
        current[unit] = opt
        again = best(unit)
        if again is not None:
            heapq.heappush(heap, (-again[0], order[unit], unit))
    return current


Held = tuple[float, Any, list["Choice"], tuple[float | None, float | None]]


def most_accurate_of_fastest(holding: Sequence[Held], tie_ms: float) -> Held:
    """Of the plans that held the budget (limit, recipe, choices, (top-1, KL)), the most
    accurate among those whose predicted saving is within ``tie_ms`` of the greatest: savings
    closer than the timing can tell apart are a tie, and the margin a tie leaves to the budget
    is what carries the plan over to text it was not judged on."""
    def saving(h: Held) -> float:
        return sum(c.gain_ms for c in h[2])

    top = max(saving(h) for h in holding)
    ties = [h for h in holding if saving(h) >= top - tie_ms]
    return max(ties, key=lambda h: (-math.inf if h[3][0] is None else h[3][0],
                                    -(h[3][1] if h[3][1] is not None else math.inf),
                                    saving(h)))


def needed_agreement(budget: float, positions: int, confidence: float) -> float | None:
    """The least measured top-1 agreement on ``positions`` whose lower bound holds ``budget``
    (None: not even agreement everywhere does)."""
    from opstudio.core.measure.accuracy import agreement_low

    for agree in range(math.floor(budget * positions), positions + 1):
        if agreement_low(agree / positions, positions, confidence) >= budget - 1e-12:
            return agree / positions
    return None


def layer_weights(layer_kl: Mapping[int, float], layers: Sequence[int]) -> dict[int, float]:
    """Each layer's share of sensitivity, interpolated between measured layers; sums to 1."""
    if not layers:
        return {}
    known = sorted((k, max(v, 0.0)) for k, v in layer_kl.items() if v is not None)
    if not known:
        return {layer: 1.0 / len(layers) for layer in layers}
    xs = np.array([k for k, _ in known], float)
    ys = np.array([v for _, v in known], float)
    raw = {layer: float(np.interp(layer, xs, ys)) for layer in layers}
    floor = max(1e-12, 0.01 * max(raw.values()))
    raw = {k: max(v, floor) for k, v in raw.items()}
    s = sum(raw.values())
    return {k: v / s for k, v in raw.items()}


def sample_layers(layers: Sequence[int], count: int = LAYER_SAMPLES) -> list[int]:
    """First two, last two and evenly between: LLMs' first and last layers are the sensitive
    ones, the middle is smooth enough to interpolate."""
    layers = sorted(set(layers))
    if len(layers) <= count:
        return layers
    picks = {layers[0], layers[1], layers[-2], layers[-1]}
    for x in np.linspace(0, len(layers) - 1, count - 2):
        picks.add(layers[round(float(x))])
    return sorted(picks)


def top1_from_kl(kl: float, kl_se: float | None, fit: tuple[float, float],
                 confidence: float) -> float:
    """The top-1 agreement that ``fit`` (``fit_top1``'s ``a``, ``b``) gives the upper bound
    of a mean KL at ``confidence``."""
    z = NormalDist().inv_cdf(confidence)
    kl_high = max(kl + z * (kl_se or 0.0), 0.0)
    return 1.0 - min(1.0, fit[0] * kl_high ** fit[1])


def fit_top1(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``disagreement ≈ a · KL^b`` fitted on measured (KL, top-1) pairs, to turn a top-1 budget
    into a predicted-KL limit (only the first guess: the limit is then searched by measuring)."""
    xy = [(math.log(kl), math.log(1 - t)) for kl, t in points
          if kl is not None and t is not None and kl > 1e-9 and t < 1.0]
    if len(xy) < 2:
        return 1.0, 0.5  # disagreement ≈ √KL: the usual shape at small KL
    x = np.array([p[0] for p in xy])
    y = np.array([p[1] for p in xy])
    if np.ptp(x) < 1e-6:
        return float(math.exp(np.mean(y - 0.5 * x))), 0.5
    b, _ = np.polyfit(x, y, 1)
    b = float(min(max(b, 0.2), 1.5))
    return float(math.exp(np.mean(y - b * x))), b


def advise_llm(model_path: str, settings: Any, budget: Any,
               variants: Sequence[Variant] | None = None, *, use_cache: bool = True,
               layer_samples: int = LAYER_SAMPLES, time_budget_s: float = 6.0,
               progress: Progress | None = None,
               cancelled: CancelCheck | None = None, cluster: str | None = None) -> LlmAdvice:
    """Scan by role and layer, plan within ``budget`` (top-1 or KL) for the decode step (or
    the prefill with ``settings.phase == "prefill"``), verify and time; see the module doc.
    ``cluster``: "auto" or "ray://HOST:PORT" judges the scan's variants on Ray's workers
    (``scan_executor``); timing stays here."""
    from opstudio.core.isolation import call_isolated
    from opstudio.core.measure.inputs import make_inputs
    from opstudio.core.measure.text_prompt import with_text_prompt
    from opstudio.core.model.model_io import load_model
    from opstudio.core.plan.recipe import Recipe
    from opstudio.core.plan.scan_executor import open_cluster
    from opstudio.core.plan.sensitivity import cache_key, cache_path

    started = time.perf_counter()
    # refused before any work when its workers cannot read the model
    ray_scan = open_cluster(cluster, str(model_path))
    log: list[str] = []

    say = clamped(progress)
    stop = stopper(cancelled)

    path = str(model_path)
    phase = settings.phase or "decode"
    # without a prompt file, a text tokenized with the model's tokenizer when there is one
    given = settings.inputs_path
    settings, judged_on = with_text_prompt(settings, path)
    model = load_model(path)
    if not _has_logits(model):
        raise OpstudioError("the model has no logits output (a float output named …logits… "
                            "or as wide as a vocabulary): budget it by cosine or SNR instead")
    prompt = make_inputs(model, dims=settings.dims, shapes=settings.shapes,
                         npz_path=settings.inputs_path, seed=settings.seed, phase="prefill",
                         model_path=path)
    timed = prompt if phase == "prefill" else make_inputs(
        model, dims=settings.dims, shapes=settings.shapes, npz_path=settings.inputs_path,
        seed=settings.seed, phase="decode", past=settings.past, model_path=path)
    # the scan calibrates on the first part of the prompt (handed to every pass as its
    # samples: "random" takes those first) and judges on the rest; the plan it hands out
    # names the prompt itself when the prompt file feeds the model
    split = held_out(prompt)
    if judged_on:
        log.append(f"prompt: {judged_on}" + (": not a measure of quality; give a tokenizer or "
                                             "a prompt" if judged_on == SYNTHETIC else ""))
    log.append(f"accuracy: {split.describe}; units are ranked on the first half of the "
               "judged tokens and plans held to the budget on the second (from "
               f"{2 * MIN_CONFIRM} judged tokens on)")
    # the plan names the user's prompt file, not the text's (the optimizer and the app
    # calibrate on the text themselves when the tokenizer is at hand)
    calibration = _calibration_source(model, given)
    variants = [replace(v, params={**v.params, "calibration": "random"})
                if "calibration" in v.params else v
                for v in (variants if variants is not None else default_variants())]
    targets = find_targets(model)
    layers = sorted({t.layer for t in targets if t.layer is not None})
    extra = [settings.inputs_path] if settings.inputs_path else []
    key = cache_key(Path(path), settings, {"variants": [v.to_json() for v in variants],
                                            "phase": phase, "layer_samples": layer_samples,
                                            "scan": SCAN_FORMAT},
                     0, extra)
    cache = str(cache_path(key, CACHE_KIND)) if use_cache else None

    refused: dict[str, dict[str, str]] = {}
    usable: dict[str, list[Target]] = {}
    for v in variants:
        ok, why = applicable(model, targets, v)
        usable[v.id] = ok
        if why:
            refused[v.label] = why
    del model
    if not any(usable.values()):
        reasons_ = [f"{label}: {why}" for label, nodes in refused.items()
                    for why in nodes.values()]
        from opstudio.core.plan import reasons

        nothing = (reasons.summarise(reasons_, limit=4) if reasons_
                   else "the model has no MatMul or Gemm with a constant weight")
        return LlmAdvice(budget, phase, 0.0, variants, [], [], {}, [], [], Recipe([]), None,
                         None, [], refused, [f"nothing could be applied: {nothing}"],
                         time.perf_counter() - started, nothing_applies=nothing)

    # speed first: every variant on every node it takes, timed against the original; a
    # variant that does not make the step faster is not worth scanning by role
    speed_tasks = [(f"whole|{v.id}", recipe_of([(v, usable[v.id])]).to_json())
                   for v in variants if usable[v.id]]
    stop()
    say(0.0, f"timing {len(speed_tasks)} whole-model variant(s) on the {phase} step")
    speed = speed_in_parallel(path, timed, prompt, speed_tasks, cache, settings.threads,
                              time_budget_s, workers=ACCURACY_WORKERS,
                              timeout=max(settings.timeout_s, 60.0) * 10, cancelled=cancelled,
                              progress=part(say, 0.0, 0.25), cluster=ray_scan)
    base_ms = next((s["base_ms"] for s in speed.values() if "base_ms" in s), 0.0)

    def pays(v: Variant) -> bool:
        s = speed.get(f"whole|{v.id}", {})
        return bool(s.get("ratio")) and s["ratio"] < MIN_SPEEDUP and s["high"] < 1.0

    def dominated(v: Variant) -> Variant | None:
        """A variant that takes all of ``v``'s nodes, decodes at least as fast and is far
        more accurate on the whole model: the planner shares savings out by bytes, so ``v``
        would lose to it on every unit, and its role scan would be time spent for nothing."""
        mine = speed.get(f"whole|{v.id}", {})
        for u in variants:
            other = speed.get(f"whole|{u.id}", {})
            if u is v or not pays(u) or mine.get("kl") is None or other.get("kl") is None:
                continue
            if {t.node for t in usable[v.id]} <= {t.node for t in usable[u.id]} \
                    and other["ratio"] <= mine["ratio"] \
                    and other["kl"] * DOMINANCE <= mine["kl"]:
                return u
        return None

    # accuracy (every variant on every node was judged as it was timed): the faster ones on
    # each role (all layers at once), and the first of those on every role of a few layers
    tasks: list[tuple[str, Mapping[str, Any]]] = []
    role_nodes: dict[tuple[str, str], list[Target]] = {}
    for v in variants:
        if not pays(v):
            continue
        better = dominated(v)
        if better is not None:
            log.append(f"{v.label}: no faster than {better.label} on the whole model and far "
                       "less accurate; not scanned by role")
            continue
        by_role: dict[str, list[Target]] = {}
        for t in usable[v.id]:
            by_role.setdefault(t.role, []).append(t)
        for role, ts in by_role.items():
            role_nodes[(v.id, role)] = ts
            tasks.append((f"role|{v.id}|{role}", recipe_of([(v, ts)]).to_json()))
    reference = next((v for v in variants if usable[v.id] and pays(v)), None)
    measured_layers: list[int] = []
    if reference is not None:
        measured_layers = sample_layers(layers, layer_samples)
        for layer in measured_layers:
            ts = [t for t in usable[reference.id] if t.layer == layer]
            if ts:
                tasks.append((f"layer|{layer}", recipe_of([(reference, ts)]).to_json()))
    stop()
    say(0.25, f"measuring {len(tasks)} rewrites on the prompt")
    acc = accuracy_in_parallel(path, prompt, tasks, cache, settings.threads,
                               workers=ACCURACY_WORKERS,
                               timeout=max(settings.timeout_s, 60.0) * 10, cancelled=cancelled,
                               progress=part(say, 0.25, 0.75), cluster=ray_scan)

    # what ranks the units is measured on the search half of the judged tokens only
    roles = [RoleResult(vid, role, [t.node for t in ts],
                        half(acc.get(f"role|{vid}|{role}", {}), "search").get("top1"),
                        half(acc.get(f"role|{vid}|{role}", {}), "search").get("kl"),
                        acc.get(f"role|{vid}|{role}", {}).get("error"))
             for (vid, role), ts in role_nodes.items()]
    whole: list[WholeResult] = []
    for v in variants:
        if not usable[v.id]:
            continue
        s = speed.get(f"whole|{v.id}", {})
        whole.append(WholeResult(v.id, len(usable[v.id]), s.get("top1"), s.get("kl"),
                                 s.get("ratio"), s.get("low"), s.get("high"), s.get("error"),
                                 dict(half(s, "confirm")) if "top1" in s else None))
    layer_kl = {layer: half(acc[f"layer|{layer}"], "search")["kl"] for layer in measured_layers
                if half(acc.get(f"layer|{layer}", {}), "search").get("kl") is not None}
    weights = layer_weights(layer_kl, layers)
    for w in whole:
        log.append(f"whole model {w.variant}: top-1 {_f(w.top1)}, KL {_f(w.kl)}, "
                   f"{'' if w.speedup is None else f'{w.speedup:.2f}× '}"
                   f"{'' if w.error is None else w.error}")
    positions = next((w.confirm.get("positions") for w in whole
                      if w.confirm and w.confirm.get("positions")), None)
    if positions and budget.min_top1 is not None and budget.confidence > 0.5:
        need = needed_agreement(budget.min_top1, positions, budget.confidence)
        log.append(f"the budget must hold at {budget.confidence:.0%} confidence on the {positions} "
                   "positions that confirm a plan: " + (
                       f"a plan needs top-1 ≥ {need:.3f} there" if need is not None else
                       f"no plan can show top-1 ≥ {budget.min_top1:g} on so few; give a longer "
                       "prompt (a few hundred tokens) or a lower confidence"))

    # options per (layer, role) unit: the role's error shared out by layer sensitivity, the
    # variant's whole-model saving shared out by the weight bytes each node stops reading
    options: dict[tuple[int, str], list[_Option]] = {}
    vmap = {v.id: v for v in variants}
    for w in whole:
        v = vmap[w.variant]
        if w.ratio is None or w.high is None or w.ratio >= MIN_SPEEDUP or w.high >= 1.0:
            log.append(f"{v.label}: not measurably faster on the {phase} step "
                       f"({'?' if w.ratio is None else f'{w.ratio:.3f}'}× the time); not planned")
            continue
        saving = base_ms * (1.0 - w.ratio)
        shares = {t.node: _bytes_saved(v, t) for t in usable[v.id]}
        total_share = sum(shares.values()) or 1.0
        for r in roles:
            if r.variant != v.id or r.kl is None:
                continue
            for t in role_nodes[(v.id, r.role)]:
                lw = weights.get(t.layer, 1.0) if t.layer is not None else 1.0
                covers: tuple[tuple[int, str], ...] = ()
                if v.technique == "prune":
                    covers = tuple((t.unit[0], x.role) for x in targets
                                   if x.layer == t.layer and x.role != t.role
                                   and _mlp_partner(x.role, t.role))
                options.setdefault(t.unit, []).append(_Option(
                    v.id, saving * shares[t.node] / total_share, r.kl * lw, [t.node], covers))
    unit_target = {t.unit: t for t in targets}

    def realise(choice: Mapping[tuple[int, str], _Option]) -> tuple[Any, list[Choice]]:
        pairs = [(vmap[o.variant], [unit_target[u]]) for u, o in choice.items()]
        chosen = [Choice(u[0], u[1], o.variant, o.nodes, o.gain, o.err)
                  for u, o in sorted(choice.items())]
        return recipe_of(pairs), chosen

    # the predicted-KL limit: a first guess from the scan, then searched by measuring
    a_fit, b_fit = 1.0, 0.5
    if budget.max_kl is not None:
        guess = budget.max_kl
    else:
        measured = ([(r.kl, r.top1) for r in roles] + [(w.kl, w.top1) for w in whole]
                    + [(half(acc[f"layer|{x}"], "search").get("kl"),
                        half(acc[f"layer|{x}"], "search").get("top1")) for x in layer_kl])
        a_fit, b_fit = fit_top1([(k, t) for k, t in measured if k is not None and t is not None])
        guess = ((1.0 - budget.min_top1) / a_fit) ** (1.0 / b_fit) if budget.min_top1 < 1 \
            else 0.0
        log.append(f"top-1 against KL over the scan's measurements: disagreement ≈ "
                   f"{a_fit:.3g} · KL^{b_fit:.2f}")
    frontier: list[FrontierPoint] = []
    verified_at: dict[str, dict[str, Any]] = {}
    best: tuple[float, Any, list[Choice], tuple[float | None, float | None]] | None = None
    limits_tried: list[tuple[float, bool]] = []

    def predicted_top1(c: Mapping[str, Any]) -> float | None:
        """Top-1 as the KL→top-1 relation fitted on every measurement of the scan puts it at
        the upper bound of ``c``'s KL. Top-1 on a few hundred positions moves by ±2 % with
        the positions alone (two plans 0.02 apart in top-1 can be ordered the other way in
        KL), while KL is continuous and the fit pools dozens of measurements: a plan whose
        count of agreements came out lucky still shows its KL (on another prompt, plans
        passed at top-1 0.93–0.94 with KL 0.03 agreed on 0.89)."""
        if budget.min_top1 is None or budget.confidence <= 0.5 or c.get("kl") is None:
            return None
        return top1_from_kl(c["kl"], c.get("kl_se"), (a_fit, b_fit), budget.confidence)

    def holds(res: Mapping[str, Any] | None) -> bool:
        """On the confirming half, by the budget's confidence bound; a top-1 budget also by
        the top-1 its KL predicts."""
        c = half(res or {}, "confirm")
        predicted = predicted_top1(c)
        return budget.holds_next_token(c.get("top1"), c.get("kl"), c.get("positions"),
                                       c.get("kl_se")) \
            and (predicted is None or predicted >= budget.min_top1)

    holding: list[tuple[float, Any, list[Choice], tuple[float | None, float | None]]] = []

    def verify(limit: float) -> bool | None:
        choice = plan_for_limit(options, limit, start)
        recipe, chosen = realise(choice)
        if not recipe.steps:
            limits_tried.append((limit, True))
            return None
        key_ = json.dumps(recipe.to_json(), sort_keys=True)
        if key_ not in verified_at:
            tid = f"plan|{key_}"
            res = call_isolated(measure_accuracy, path, prompt, [(tid, recipe.to_json())],
                                cache, settings.threads, timeout=settings.timeout_s * 4,
                                cancelled=cancelled, task="verifying the plan").get(tid, {})
            verified_at[key_] = res
        res = verified_at[key_]
        top1, kl = res.get("top1"), res.get("kl")
        ok = holds(res)
        c = half(res, "confirm")
        gain = sum(c.gain_ms for c in chosen)
        from_kl = predicted_top1(c)
        log.append(f"plan at predicted KL ≤ {limit:.3g}: {len(chosen)} rewrites, predicted "
                   f"saving {gain:.3f} ms → top-1 {_f(top1)}, KL {_f(kl)}; on the confirming "
                   f"half top-1 {_f(c.get('top1'))}, KL {_f(c.get('kl'))}"
                   f"{'' if from_kl is None else f' (top-1 from its KL: {from_kl:.3f})'}"
                   f"{' (holds)' if ok else ''}")
        frontier.append(FrontierPoint(f"plan KL≤{limit:.2g}", top1, kl, None, kind="plan",
                                      limit=limit, holds=ok))
        limits_tried.append((limit, ok))
        if ok:
            holding.append((limit, recipe, chosen, (top1, kl)))
        return ok

    # the fastest technique that holds the budget on every node it takes is a plan already:
    # the search upgrades units from there
    start: dict[tuple[int, str], _Option] = {}
    holders = sorted((w for w in whole if w.speedup is not None and w.high is not None
                      and w.high < 1.0 and w.ratio is not None and w.ratio < MIN_SPEEDUP
                      and holds(w.confirm)),
                     key=lambda w: w.ratio or 1.0)
    base_variant = holders[0].variant if holders else None
    if base_variant is not None:
        for unit, opts in options.items():
            mine = next((o for o in opts if o.variant == base_variant), None)
            if mine is not None:
                start[unit] = mine
        base_err = sum(o.err for o in start.values())
        recipe_b, chosen_b = realise(start)
        w = holders[0]
        best = (base_err, recipe_b, chosen_b, (w.top1, w.kl))
        holding.append(best)
        frontier.append(FrontierPoint(f"{vmap[base_variant].label} everywhere", w.top1, w.kl,
                                      None, kind="plan", limit=base_err, holds=True))
        log.append(f"start: {vmap[base_variant].label} on every node holds the budget "
                   f"(top-1 {_f(w.top1)}, KL {_f(w.kl)}, {w.speedup:.2f}×); plans upgrade "
                   "units from there")
        guess = max(guess, 1.5 * base_err)
    if options and guess > 0:
        say(0.75, "searching the plan's error limit by measuring")
        lo, hi = (best[0] if best is not None else None), None
        limit = guess
        for _ in range(MAX_VERIFY):
            stop()
            say(0.75 + 0.15 * len(limits_tried) / MAX_VERIFY, f"verifying a plan at KL ≤ {limit:.3g}")
            held = verify(limit)
            if held is None or held:
                lo = limit
                if held is None and hi is None and all(o.err <= limit for opts in options.values()
                                                     for o in opts):
                    break
            else:
                hi = limit
            if hi is None:
                limit = limit * 2
            elif lo is None:
                limit = limit / 4
            else:
                if hi / lo < 1.3:
                    break
                limit = math.sqrt(lo * hi)

    if holding:
        best = most_accurate_of_fastest(holding, TIE_SHARE * base_ms)
        if base_variant and len(holding) > 1 and best[0] == sum(o.err for o in start.values()):
            log.append(f"the upgraded plans that hold are predicted to save within "
                       f"{TIE_SHARE:.1%} of the step of {vmap[base_variant].label} everywhere "
                       "(less than timing tells apart): a tie, which goes to the more accurate")
    chosen: list[Choice] = []
    recipe = Recipe([])
    verified = None
    speed_point = None
    if best is not None:
        _, recipe, chosen, (top1, kl) = best
        verified = {"top1": top1, "kl": kl}
        stop()
        say(0.92, f"timing the plan on the {phase} step")
        tid = f"plan|{json.dumps(recipe.to_json(), sort_keys=True)}"
        timing_tasks = [(tid, recipe.to_json())]
        base_tid = None
        if start and best[0] != sum(o.err for o in start.values()):
            recipe_b, _ = realise(start)
            base_tid = f"plan|{json.dumps(recipe_b.to_json(), sort_keys=True)}"
            timing_tasks.append((base_tid, recipe_b.to_json()))
        # the upgrades' savings were shared out from whole-model ratios that move by a few
        # per cent from run to run, which is all an upgrade may buy: the upgraded plan is
        # kept only if it beats its starting point in their own paired rounds, timed longer
        timings = call_isolated(measure_speed, path, timed, [split.calibration], timing_tasks,
                                cache, settings.threads,
                                time_budget_s * (FINAL_TIMING if base_tid else 1), None,
                                timeout=max(settings.timeout_s, 60.0) * 8, cancelled=cancelled,
                                task="timing the plan")
        res = timings.get(tid, {})
        other = timings.get(base_tid, {}) if base_tid else {}
        versus = res.get("versus", {}).get(base_tid) if base_tid else None
        upgraded_pays = (versus[2] < 1.0 if versus
                         else bool(res.get("ratio")) and other.get("ratio", 1.0) >= res["ratio"])
        if versus:
            log.append(f"the upgraded plan against {vmap[holders[0].variant].label} everywhere: "
                       f"{versus[0]:.3f}× the time [{versus[1]:.3f}, {versus[2]:.3f}]")
        if res.get("ratio") and other.get("ratio") and not upgraded_pays:
            # the upgrades did not pay in the whole model: one technique everywhere wins
            log.append(f"the upgraded plan is not measurably faster than "
                       f"{vmap[holders[0].variant].label} everywhere "
                       f"({res['ratio']:.3f}× against {other['ratio']:.3f}× the original's "
                       "time): keeping the latter")
            recipe, chosen = realise(start)
            w = holders[0]
            top1, kl = w.top1, w.kl
            verified = {"top1": top1, "kl": kl}
            best = (sum(o.err for o in start.values()), recipe, chosen, (top1, kl))
            res = other
        if res.get("ratio"):
            speed_point = FrontierPoint("the plan", top1, kl, 1.0 / res["ratio"],
                                        1.0 / res["high"], 1.0 / res["low"], kind="plan",
                                        limit=best[0], holds=True)
            log.append(f"the plan: {len(chosen)} rewrites, {phase} step "
                       f"{res['ratio']:.3f}× the time [{res['low']:.3f}, {res['high']:.3f}]")
            if res["high"] >= 1.0:
                log.append("the plan is not measurably faster: nothing pays within the budget")
                chosen, recipe, verified = [], Recipe([]), None
                speed_point.holds = False
        for p in frontier:
            if p.limit == best[0]:
                p.speedup, p.low, p.high = (speed_point.speedup, speed_point.low,
                                            speed_point.high) if speed_point else (None,) * 3
    # every other verified plan's speedup is predicted from the savings (timing each would
    # double the search); the whole-model variants were timed
    for p in frontier:
        if p.speedup is None and p.limit is not None and base_ms > 0:
            gain = sum(o.gain for o in plan_for_limit(options, p.limit, start).values())
            p.speedup = base_ms / max(base_ms - gain, 1e-9)
    for w in whole:
        if w.speedup is not None:
            frontier.append(FrontierPoint(vmap[w.variant].label, w.top1, w.kl, w.speedup,
                                          1.0 / w.high if w.high else None,
                                          1.0 / w.low if w.low else None, kind="whole",
                                          holds=holds(w.confirm)))
    say(1.0, "advice ready")
    recipe = _named_calibration(recipe, calibration)
    return LlmAdvice(budget, phase, base_ms, variants, roles, whole, layer_kl, measured_layers,
                     chosen, recipe, verified, speed_point, frontier, refused, log,
                     time.perf_counter() - started)


def _has_logits(model: onnx.ModelProto) -> bool:
    """An output that ``accuracy`` will take for logits, judged from its declared shape."""
    from opstudio.core.measure.accuracy import output_kind

    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if out.type.tensor_type.elem_type not in (onnx.TensorProto.FLOAT,
                                                   onnx.TensorProto.FLOAT16):
            continue
        last = dims[-1].dim_value if dims else 0
        shape = (1,) * max(len(dims) - 1, 1) + (last or 2,)
        if output_kind(out.name, np.empty(shape, np.float32)) == "logits":
            return True
    return False


def _named_calibration(recipe: Any, calibration: str) -> Any:
    """``recipe`` with its calibrated steps reading ``calibration`` (the prompt file) instead
    of the samples the scan handed them, so that the plan runs as it is, without ``--inputs``."""
    from opstudio.core.plan.recipe import Recipe

    if calibration == "random" or not recipe.steps:
        return recipe
    data = recipe.to_json()
    for step in data.get("steps", []):
        params = step.get("params") or {}
        if params.get("calibration") == "random":
            params["calibration"] = calibration
    return Recipe.from_json(data)


def _calibration_source(model: onnx.ModelProto, npz: str | None) -> str:
    """The prompt file when it feeds every model input (the recipe then names its own data);
    else "random", which calibrates on the samples the optimizer is given (the prompt here)."""
    if not npz:
        return "random"
    from opstudio.core.passes import model_inputs

    try:
        with np.load(npz, allow_pickle=False) as data:
            names = set(data.files)
    except (OSError, ValueError):
        return "random"
    return npz if all(i.name in names for i in model_inputs(model)) else "random"


def _mlp_partner(role: str, gate_role: str) -> bool:
    """``role`` is another projection of the gated MLP whose gate is ``gate_role``."""
    scope = gate_role.rsplit("/", 2)[0] if gate_role.count("/") >= 2 else ""
    low = role.lower()
    return role.startswith(scope) and ("up" in low or "down" in low)


def _bytes_saved(variant: Variant, t: Target) -> float:
    """Weight bytes the node stops reading (float32 before; what matters is the proportion)."""
    before = 4.0 * t.k * t.n
    if variant.technique == "int4-weight":
        after = t.k * t.n * (0.5 + 4.0 / int(variant.params.get("block_size", 32)))
    elif variant.technique == "int8-weight":
        after = t.k * t.n * (1.0 + 4.0 / int(variant.params.get("block_size", 32)))
    elif variant.technique in ("int8-dynamic", "int8-static"):
        after = 1.0 * t.k * t.n
    elif variant.technique == "lowrank":
        rank = variant.params_for(t.k, t.n).get("rank") or min(t.k, t.n)
        after = 4.0 * rank * (t.k + t.n)
    elif variant.technique == "prune":
        # the gate, up and down projections each lose the same share of channels
        after = before * (1.0 - 3.0 * float(variant.params.get("sparsity", 0.25)))
    else:
        after = before / 2
    return max(before - after, 0.0)


def _f(x: float | None) -> str:
    return "?" if x is None else f"{x:.4g}"
