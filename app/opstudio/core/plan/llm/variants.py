"""What the next-token scan tries and where: technique variants, the weighted nodes they may
rewrite (with layer and role) and the recipes that apply them."""

from __future__ import annotations

import importlib.util
import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.plan.recipe import Recipe

SCANNED = ("MatMul", "Gemm")
# the node whose KV cache ``kv-cache`` quantizes (fused by ``fuse``, or exported so)
KV_OP = "GroupQueryAttention"
# a decode step's past (tokens) from which the KV cache is a candidate: below it the cache is a
# small part of the bytes a step reads
KV_PAST = 1024


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

    out = [Variant("fuse", "fuse", {}, "fused norms, rotary and attention (exact)"),
           Variant("int4-awq", "int4-weight", awq(32), "INT4 AWQ"),
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
        Variant("kv-int8", "kv-cache", {"bits": 8, **cal}, "KV cache INT8"),
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


LLM_TECHNIQUES = ("fuse", "kv-cache", "int4-weight", "int8-weight", "int8-dynamic", "lowrank",
                  "prune")


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
    op: str = "MatMul"

    @property
    def unit(self) -> tuple[int, str]:
        return (-1 if self.layer is None else self.layer, self.role)



def find_targets(model: onnx.ModelProto) -> list[Target]:
    """Every MatMul/Gemm with a constant 2-D weight, with its layer and role; and every
    GroupQueryAttention (what ``kv-cache`` takes)."""
    from opstudio.core.model.layers import scope_of
    from opstudio.core.passes import constant_value

    shapes = _weight_shapes(model)
    out = []
    for node in model.graph.node:
        if node.op_type == KV_OP and node.domain == "com.microsoft":
            scope = scope_of(node.name)
            out.append(Target(node.name, scope.layer, scope.role, 0, 0, op=KV_OP))
            continue
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
        if (variant.technique == "kv-cache") != (t.op == KV_OP):
            continue  # the cache is the attention node's; every other technique a weight's
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


def recipe_of(variant_nodes: Sequence[tuple[Variant, Sequence[Target]]]) -> Recipe:
    """One step per technique and param set, in plan order."""
    from opstudio.core.passes import plan_rank
    from opstudio.core.plan.recipe import Step

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


def mlp_partner(role: str, gate_role: str) -> bool:
    """``role`` is another projection of the gated MLP whose gate is ``gate_role``."""
    scope = gate_role.rsplit("/", 2)[0] if gate_role.count("/") >= 2 else ""
    low = role.lower()
    return role.startswith(scope) and ("up" in low or "down" in low)


def bytes_saved(variant: Variant, t: Target) -> float:
    """Weight bytes the node stops reading (float32 before; what matters is the proportion).
    Every layer's KV cache is as large as every other's: an equal share."""
    if variant.technique == "kv-cache":
        return 1.0
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

