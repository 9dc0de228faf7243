"""Tensor decomposition: a constant weight W ≈ A·B by truncated SVD.

- ``MatMul(X, W)`` with W [K, N] becomes ``MatMul(MatMul(X, A), B)``, A [K, r], B [r, N].
- ``Gemm`` factorizes op(B) [K, N] the same way. The first node is a MatMul with ``alpha``
  folded into A (a Gemm keeping ``transA`` when A is transposed); the second is a Gemm with the
  original C and ``beta`` (a MatMul when there is no C).
- ``Conv`` (group 1, any number of spatial dims) with W [M, C, k…] factorizes W as an
  [M, C·k…] matrix: a k… Conv to r channels that keeps strides, pads, dilations and auto_pad,
  then a 1×…×1 Conv back to M channels with the original bias. This is the SVD form: it keeps
  the full input-channel dimension in the first conv.
- ``method="tucker2"`` factorizes a Conv kernel with a spatial extent along both channel modes
  instead (``_tucker``): a 1×…×1 Conv from C to r_in channels, the k… core Conv from r_in to
  r_out (strides, pads, dilations, auto_pad), then a 1×…×1 Conv to M with the bias. For a
  3×3 kernel at equal ranks this is about half the FLOPs of the SVD form. MatMul, Gemm and
  1×1 Conv weights are matrices, whose Tucker-2 is their SVD, so they take the SVD form.

A model whose weights stay in their files (``load_model(lazy=True)``) is factorized one weight
at a time from its memory map with the same arithmetic; each weight's factors are written to a
scratch file (``_stream``) before the next weight is read.

The singular values are split evenly (√S into both factors) so neither factor's range explodes.
At full rank the result equals the original up to float rounding.

Choosing the rank: ``rank`` takes that rank (capped at full rank); ``energy`` takes the smallest
rank whose singular values keep that fraction of ΣS²; with neither, ``energy`` 0.9 is used. A
rank whose factors hold more parameters than W is applied when asked for by ``rank`` (the details
and notes say it grew: useful as an exactness check), and refused when it comes from ``energy``.
With tucker2 the same rule picks each channel rank from the singular values of that channel
mode's unfolding, and ``rank`` caps both.

Activation-aware methods (MatMul and Gemm weights only) run the model on calibration inputs
(``calibration``: ``"random"`` or an ``.npz`` of model inputs; ``samples``) and take the
statistics of each node's input X, so that the truncation drops what matters least *for the
outputs* XW rather than for W itself. Trained LLM weights are not low-rank in the weight norm
(keeping 90 % of ΣS² of an MLP projection can need 70 % of its rank), but their inputs occupy
few directions, and XW is.

- ``svd-llm`` (Wang et al. 2024, truncation-aware data whitening): with L the Cholesky factor
  of the Gram matrix XᵀX = L·Lᵀ, ‖XW‖ = ‖LᵀW‖, and truncating the SVD of LᵀW = UΣVᵀ to rank r
  minimizes ‖XW − X·A·B‖ over rank-r products: A = L⁻ᵀ·U_r·√Σ_r, B = √Σ_r·V_rᵀ. The discarded
  singular values are then exactly the output error on the calibration data, so ``energy``
  is measured on this whitened spectrum: it is the fraction of ‖XW‖² kept. A Gram matrix that is
  singular (fewer calibration positions than input features, a feature that is always zero)
  gets a ridge of 1e-6 × its mean diagonal first; the details say so.
- ``asvd`` (Yuan et al. 2023): each input row of W is scaled by mean|x|^alpha before the SVD and
  the scale is undone in A. Cheaper statistics, weaker than svd-llm.

Besides the weight error (``rel_error``) these report ``output_rel_error``, ‖XW − X·A·B‖/‖XW‖
on the calibration activations. The factorization is computed in float64; the factors are
stored in the weight's float type, as for svd.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import helper
from threadpoolctl import threadpool_limits

from opstudio.core.errors import OpstudioError
from opstudio.core.model import provenance
from opstudio.core.model.graph import analyze
from opstudio.core.passes import _activations, _tucker
from opstudio.core.passes import _stream as stream
from opstudio.core.passes import _weights as w
from opstudio.core.passes._calibration import (
    calibration_params,
    calibration_samples,
    check_calibration,
)
from opstudio.core.passes.base import ParamSpec, Pass, PassContext, PassResult, ScanParams
from opstudio.core.progress import part

DEFAULT_ENERGY = 0.9
ACTIVATION_METHODS = ("svd-llm", "asvd")
METHODS = ("svd", "tucker2", *ACTIVATION_METHODS)
DEFAULT_SAMPLES = 8
# Added to a singular Gram matrix, relative to its mean diagonal: small enough not to change a
# well-measured direction, large enough that L⁻ᵀ stays representable in float32 factors.
RIDGE = 1e-6


@dataclass
class _Target:
    """What factorizing one node means: the matrix to factor and how the node uses it."""

    node: onnx.NodeProto
    weight_name: str
    weight: np.ndarray  # as stored
    matrix: np.ndarray  # [rows, cols] that is factored as left [rows, r] @ right [r, cols]
    bias_elems: int


class LowRankPass(Pass):
    technique = "lowrank"
    plan_order = 20
    helps_when = "compute"
    because = "low-rank factorization cuts the FLOPs"
    colour = "#e67e22"
    scan_params: ClassVar[ScanParams | None] = {"energy": 0.95}
    label = "Low-rank (SVD, Tucker-2)"
    description = ("Factorize a constant MatMul/Gemm/Conv weight into smaller ones by "
                   "truncated SVD (optionally weighted by calibration activations, SVD-LLM or "
                   "ASVD), or a Conv kernel by Tucker-2: fewer parameters and FLOPs, at a "
                   "reconstruction error")
    params = (
        ParamSpec("rank", "int", None, "Rank", "number of singular values kept "
                  "(exclusive with energy)", minimum=1, optional=True),
        ParamSpec("energy", "float", DEFAULT_ENERGY, "Energy",
                  "fraction of the squared singular values kept, in (0, 1]; used when no rank "
                  "is given (svd-llm: of the whitened ones, i.e. of ‖XW‖² on the calibration "
                  "data)", minimum=0.0, maximum=1.0, optional=True),
        ParamSpec("method", "choice", "svd", "Method",
                  "svd: W ≈ A·B, two nodes; tucker2: a k×k Conv kernel reduced along input and "
                  "output channels, 1×1 → k×k → 1×1 (MatMul, Gemm and 1×1 Conv use svd); "
                  "svd-llm: SVD whitened by the calibration inputs' Gram matrix, keeps what "
                  "matters for the outputs (LLMs); asvd: SVD of W scaled by mean |x|^alpha",
                  choices=METHODS),
        *calibration_params(DEFAULT_SAMPLES),
        ParamSpec("alpha", "float", 0.5, "ASVD alpha",
                  "asvd: exponent of mean |x| in the row scaling", minimum=0.0, maximum=2.0),
    )

    def validate_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        raw = dict(params or {})
        out = super().validate_params(raw)
        if out["rank"] is not None:
            if raw.get("energy") is not None:
                raise OpstudioError("lowrank: give either 'rank' or 'energy', not both")
            out["energy"] = None
        elif out["energy"] is None:
            out["energy"] = DEFAULT_ENERGY
        elif out["energy"] <= 0.0:
            raise OpstudioError(f"lowrank: parameter 'energy' must be above 0, not {out['energy']}")
        return check_calibration(self.technique, out)

    def reads_lazy(self, params: Mapping[str, Any]) -> bool:
        # one weight at a time from its memory map; the activation-aware methods run the
        # model on calibration inputs first
        return params["method"] not in ACTIVATION_METHODS

    def check(self, model: onnx.ModelProto, node: onnx.NodeProto,
              params: Mapping[str, Any] | None = None) -> str | None:
        target = _target(model, node)
        return target if isinstance(target, str) else None

    def _rewrite(self, work: onnx.ModelProto, chosen: Sequence[str], params: Mapping[str, Any],
                 ctx: PassContext) -> PassResult:
        result = PassResult(model=work)
        by_name = {n.name: n for n in work.graph.node}
        targets: list[_Target] = []
        for name in chosen:
            target = _target(work, by_name[name])
            assert not isinstance(target, str), target  # ``check`` took it
            targets.append(target)
        stats: dict[str, _activations.InputStats] = {}
        if params["method"] in ACTIVATION_METHODS:
            targets, stats = _measure(work, targets, params, ctx, result)
            if not targets:
                return result
        dims = w.unit_dims(work)
        info = analyze(work, dims)
        taken = w.all_names(work.graph)
        replacements: dict[str, list[onnx.NodeProto]] = {}
        old_weights: list[str] = []
        with stream.scratch_for(work, ctx.workdir) as scratch:
            for k, target in enumerate(targets):
                ctx.check_cancelled()
                name = target.node.name
                ctx.report(0.5 + 0.5 * k / len(targets) if stats else k / len(targets),
                           f"lowrank: factorizing tensor {k + 1} of {len(targets)} ({name})")
                mark = len(work.graph.initializer)
                out_shape = info.node(name).output_shapes[0] if info.has_node(name) else None
                if params["method"] == "tucker2" and _has_spatial_extent(target):
                    in_shape = info.static_shape(target.node.input[0])
                    done = _factorize_tucker2(work, target, params, taken, in_shape, out_shape)
                else:
                    done = _factorize(work, target, params, taken, out_shape, stats.get(name))
                if isinstance(done, str):
                    result.skipped[name] = done
                    continue
                new_nodes, details = done
                if scratch is not None:  # weights stay in files: the factors go to one too
                    stream.spill(work, mark, scratch)
                replacements[name] = new_nodes
                old_weights.append(target.weight_name)
                result.applied.append(name)
                if dims:
                    details["flops_dims"] = dims  # FLOPs are per sample: named dims set to 1
                result.details[name] = details
                if details.get("ridge"):
                    result.notes.append(
                        f"{name}: its inputs' Gram matrix is singular on the calibration data "
                        f"({details['calibration_rows']} positions for {target.matrix.shape[0]} "
                        f"features); a ridge of {details['ridge']:.3g} was added before whitening")
                if details["params_after"] > details["params_before"]:
                    rank = details.get("rank") or f"{details['rank_out']}×{details['rank_in']}"
                    result.notes.append(
                        f"{name}: rank {rank} keeps more parameters "
                        f"({details['params_after']}) than the original ({details['params_before']})")
        w.replace_nodes(work.graph, replacements)
        w.remove_unused(work, old_weights)
        return result


PASS = LowRankPass()


def _target(model: onnx.ModelProto, node: onnx.NodeProto) -> _Target | str:
    op = node.op_type
    weight = w.float_weight(model, node, "lowrank")
    if isinstance(weight, str):
        return weight
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bias_elems = 0
    if op == "MatMul":
        if weight.ndim != 2:
            return (f"its weight '{node.input[1]}' has {weight.ndim} dims; lowrank factorizes "
                    "2-D weights")
        matrix = weight
    elif op == "Gemm":
        matrix = weight.T if attrs.get("transB", 0) else weight
        if len(node.input) > 2 and node.input[2]:
            bias, _ = w.constant_array(model, node.input[2])
            bias_elems = 0 if bias is None else int(bias.size)
    else:
        if attrs.get("group", 1) != 1:
            return (f"it is a grouped/depthwise Conv (group={attrs['group']}); "
                    "lowrank handles group=1")
        if weight.ndim < 3:
            return f"its weight '{node.input[1]}' has {weight.ndim} dims, not a Conv kernel"
        matrix = weight.reshape(weight.shape[0], -1)
        if len(node.input) > 2 and node.input[2]:
            bias, _ = w.constant_array(model, node.input[2])
            bias_elems = 0 if bias is None else int(bias.size)
    rows, cols = matrix.shape
    if min(rows, cols) < 2:
        return (f"its {rows}×{cols} weight has rank 1 at most; a factorization cannot save "
                "parameters")
    return _Target(node, node.input[1], weight, matrix, bias_elems)


def _measure(model: onnx.ModelProto, targets: list[_Target], params: Mapping[str, Any],
             ctx: PassContext, result: PassResult
             ) -> tuple[list[_Target], dict[str, _activations.InputStats]]:
    """The targets an activation-aware method can take, and their inputs' statistics."""
    method = params["method"]
    kept: list[_Target] = []
    for target in targets:
        node = target.node
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            result.skipped[node.name] = (f"{method} factorizes MatMul and Gemm weights; a Conv "
                                         "takes method svd or tucker2")
        elif node.op_type == "Gemm" and attrs.get("transA", 0):
            result.skipped[node.name] = (f"its Gemm reads its input transposed (transA=1); "
                                         f"{method} needs the input's features on its last axis")
        else:
            kept.append(target)
    if not kept:
        return kept, {}
    samples = calibration_samples(model, params["calibration"], params["samples"], ctx)
    # measuring is the first half of the pass's progress, factorizing the second
    sub = PassContext(inputs=ctx.inputs, workdir=ctx.workdir, cancelled=ctx.cancelled,
                      progress=part(ctx.report, 0.0, 0.5, "lowrank"))
    # asvd needs only mean |x|; the Gram matrix also gives it the output error to report
    stats = _activations.input_stats(model, [t.node.name for t in kept], samples, gram=True,
                                     ctx=sub)
    usable: list[_Target] = []
    for target in kept:
        name, entry = target.node.name, stats[target.node.name]
        features = target.matrix.shape[0]
        if entry.sq_norm.shape[0] != features:
            result.skipped[name] = (f"its input has {entry.sq_norm.shape[0]} features on its last "
                                    f"axis, not the weight's {features} rows")
        elif not np.any(entry.sq_norm > 0):
            result.skipped[name] = ("its input is zero on every calibration sample; "
                                    f"{method} has nothing to weigh the weight by")
        else:
            usable.append(target)
    return usable, stats


def _whitening(gram: np.ndarray) -> tuple[np.ndarray, float]:
    """L with L·Lᵀ = gram (+ a ridge when gram is singular), and that ridge (0.0 if none)."""
    gram = (gram + gram.T) / 2  # exactly symmetric
    ridge = RIDGE * float(np.mean(np.diag(gram)))
    try:
        lower = np.linalg.cholesky(gram)
        # the i-th pivot is diag(L)_i²: one far below the ridge is a direction the data does
        # not span, and inverting it would blow A's entries past float32
        if float(np.min(np.diag(lower))) ** 2 >= ridge:
            return lower, 0.0
    except np.linalg.LinAlgError:
        pass
    return np.linalg.cholesky(gram + ridge * np.eye(len(gram))), ridge


def _split(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int
           ) -> tuple[np.ndarray, np.ndarray]:
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def _factors(target: _Target, params: Mapping[str, Any],
             stats: _activations.InputStats | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """``left`` [rows, r], ``right`` [r, cols], the spectrum the rank was chosen from, extras."""
    matrix = target.matrix.astype(np.float64)
    method = params["method"] if stats is not None else "svd"
    extra: dict[str, Any] = {}
    # One BLAS thread: the factors then come out bit-identical on any machine (same recipe,
    # same bytes), and a multithreaded SVD on a busy machine is many times slower, not faster.
    with threadpool_limits(limits=1):
        if method == "svd-llm":
            assert stats is not None and stats.gram is not None
            lower, ridge = _whitening(stats.gram)
            u, s, vt = np.linalg.svd(lower.T @ matrix, full_matrices=False)
            rank = choose_rank(s, params["rank"], params["energy"])
            left, right = _split(u, s, vt, rank)
            left = np.linalg.solve(lower.T, left)  # undo the whitening: A = L⁻ᵀ·U_r·√Σ_r
            extra["ridge"] = ridge
        elif method == "asvd":
            assert stats is not None
            scale = stats.abs_mean ** params["alpha"]
            # a feature that is always zero does not matter; keep its row at the smallest weight
            floor = float(scale[scale > 0].min()) if np.any(scale > 0) else 1.0
            scale = np.where(scale > 0, scale, floor)
            u, s, vt = np.linalg.svd(scale[:, None] * matrix, full_matrices=False)
            rank = choose_rank(s, params["rank"], params["energy"])
            left, right = _split(u, s, vt, rank)
            left = left / scale[:, None]
            extra["alpha"] = params["alpha"]
        else:
            u, s, vt = np.linalg.svd(matrix, full_matrices=False)
            rank = choose_rank(s, params["rank"], params["energy"])
            left, right = _split(u, s, vt, rank)
        if stats is not None and stats.gram is not None:
            # ‖XD‖² = tr(Dᵀ·XᵀX·D) for the error D, with the Gram matrix as measured
            diff = matrix - left @ right
            error = float(np.sum(diff * (stats.gram @ diff)))
            total = float(np.sum(matrix * (stats.gram @ matrix)))
            extra["output_rel_error"] = math.sqrt(max(error, 0.0) / total) if total > 0 else 0.0
            extra["calibration_rows"] = stats.rows
    return left, right, s, extra


def choose_rank(singular: np.ndarray, rank: int | None, energy: float | None) -> int:
    """The rank to keep: ``rank`` capped at full, or the smallest keeping ``energy`` of ΣS²."""
    full = len(singular)
    if rank is not None:
        return min(rank, full)
    squares = singular.astype(np.float64) ** 2
    total = squares.sum()
    if total == 0.0:
        return 1
    kept = np.cumsum(squares) / total
    # a small tolerance so that energy 1.0 is reached despite rounding of the cumulative sum
    return min(full, int(np.searchsorted(kept, float(energy or DEFAULT_ENERGY) - 1e-12)) + 1)


def _factorize(model: onnx.ModelProto, target: _Target, params: Mapping[str, Any],
               taken: set[str], out_shape: list | None,
               stats: _activations.InputStats | None = None
               ) -> tuple[list[onnx.NodeProto], dict[str, Any]] | str:
    node = target.node
    matrix = target.matrix.astype(np.float64)
    left, right, s, extra = _factors(target, params, stats)  # [rows, r], [r, cols]
    rank = left.shape[1]
    rows, cols = matrix.shape
    params_before = rows * cols + target.bias_elems
    params_after = rank * (rows + cols) + target.bias_elems
    if params["rank"] is None and params_after >= params_before:
        return (f"energy {params['energy']:g} needs rank {rank} of {len(s)}, and rank {rank} "
                f"would need {rank * (rows + cols)} parameters, not fewer than the original "
                f"{rows}×{cols} weight's {rows * cols}")
    approx = left @ right
    norm = float(np.linalg.norm(matrix))
    rel_error = float(np.linalg.norm(matrix - approx) / norm) if norm > 0 else 0.0
    total = float((s.astype(np.float64) ** 2).sum())
    energy_kept = float((s[:rank].astype(np.float64) ** 2).sum() / total) if total > 0 else 1.0

    dtype = target.weight.dtype
    name = node.name
    name_a = w.unique_name(taken, f"{name}_lowrank_a")
    name_b = w.unique_name(taken, f"{name}_lowrank_b")
    mid = w.unique_name(taken, f"{name}_lowrank_mid")
    weight_a = w.unique_name(taken, f"{name}_lowrank_a_weight")
    weight_b = w.unique_name(taken, f"{name}_lowrank_b_weight")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    if op == "MatMul":
        w.add_initializer(model, left.astype(dtype), weight_a)
        w.add_initializer(model, right.astype(dtype), weight_b)
        first = helper.make_node("MatMul", [node.input[0], weight_a], [mid], name=name_a)
        second = helper.make_node("MatMul", [mid, weight_b], [node.output[0]], name=name_b)
    elif op == "Gemm":
        alpha = float(attrs.get("alpha", 1.0))
        w.add_initializer(model, (left * alpha).astype(dtype), weight_a)
        w.add_initializer(model, right.astype(dtype), weight_b)
        if attrs.get("transA", 0):
            inputs = [node.input[0], weight_a]
            if w.opset(model) < 11:  # C is optional only from opset 11
                zero = w.unique_name(taken, f"{name}_lowrank_zero")
                w.add_initializer(model, np.zeros([1], dtype=dtype), zero)
                inputs.append(zero)
            first = helper.make_node("Gemm", inputs, [mid], name=name_a, transA=1)
        else:
            first = helper.make_node("MatMul", [node.input[0], weight_a], [mid], name=name_a)
        if len(node.input) > 2 and node.input[2]:
            second = helper.make_node("Gemm", [mid, weight_b, node.input[2]], [node.output[0]],
                                      name=name_b, beta=float(attrs.get("beta", 1.0)))
        else:
            second = helper.make_node("MatMul", [mid, weight_b], [node.output[0]], name=name_b)
    else:
        kernel = target.weight.shape[2:]
        w.add_initializer(model, right.reshape((rank, *target.weight.shape[1:])).astype(dtype),
                          weight_a)
        w.add_initializer(model, left.reshape((rows, rank) + (1,) * len(kernel)).astype(dtype),
                          weight_b)
        keep = {k: v for k, v in attrs.items()
                if k in ("strides", "pads", "dilations", "auto_pad", "kernel_shape")}
        first = helper.make_node("Conv", [node.input[0], weight_a], [mid], name=name_a, **keep)
        second_inputs = [mid, weight_b] + ([node.input[2]] if len(node.input) > 2
                                           and node.input[2] else [])
        second = helper.make_node("Conv", second_inputs, [node.output[0]], name=name_b,
                                  kernel_shape=[1] * len(kernel))
    origin = provenance.get_origin(node)
    for new in (first, second):
        provenance.set_origin(new, origin)
    flops_before, flops_after = _flops(op, target, rank, out_shape)
    details: dict[str, Any] = {
        "method": params["method"] if stats is not None else "svd", "rank": rank,
        "full_rank": len(s), "energy_kept": energy_kept, "rel_error": rel_error, **extra,
        "params_before": params_before, "params_after": params_after,
        "flops_before": flops_before, "flops_after": flops_after,
        "nodes": [name_a, name_b],
    }
    if params["rank"] is not None and params["rank"] > rank:
        details["rank_requested"] = params["rank"]
    if params["energy"] is not None:
        details["energy_requested"] = params["energy"]
    return [first, second], details


def _has_spatial_extent(target: _Target) -> bool:
    return target.node.op_type == "Conv" and math.prod(target.weight.shape[2:]) > 1


def _factorize_tucker2(model: onnx.ModelProto, target: _Target, params: Mapping[str, Any],
                       taken: set[str], in_shape: list | None, out_shape: list | None
                       ) -> tuple[list[onnx.NodeProto], dict[str, Any]] | str:
    node = target.node
    m, c = target.weight.shape[:2]
    kernel = target.weight.shape[2:]
    spatial = math.prod(kernel)
    k3 = target.weight.astype(np.float64).reshape(m, c, spatial)
    with threadpool_limits(limits=1):  # bit-identical factors, as in _factorize
        start = _tucker.hosvd(k3)
        r_out = choose_rank(start.out_spectrum, params["rank"], params["energy"])
        r_in = choose_rank(start.in_spectrum, params["rank"], params["energy"])
        # A factor cannot have more columns than the projected unfolding has rows of rank.
        r_out = min(r_out, r_in * spatial)
        r_in = min(r_in, r_out * spatial)
        params_before = m * c * spatial + target.bias_elems
        params_after = c * r_in + r_in * r_out * spatial + r_out * m + target.bias_elems
        if params["rank"] is None and params_after >= params_before:
            return (f"energy {params['energy']:g} needs channel ranks {r_out} (of {m}) and "
                    f"{r_in} (of {c}), which would need {params_after - target.bias_elems} "
                    f"parameters, not fewer than the original kernel's {m * c * spatial}")
        t = _tucker.decompose(k3, r_out, r_in, start)
    r_out, r_in = t.core.shape[:2]
    norm = float(np.linalg.norm(k3))
    rel_error = float(np.linalg.norm(k3 - t.reconstruct()) / norm) if norm > 0 else 0.0

    dtype = target.weight.dtype
    name = node.name
    ones = [1] * len(kernel)
    names = [w.unique_name(taken, f"{name}_tucker_{part}") for part in ("in", "core", "out")]
    mids = [w.unique_name(taken, f"{name}_tucker_{part}_mid") for part in ("in", "core")]
    weights = [w.unique_name(taken, f"{name}_tucker_{part}_weight")
               for part in ("in", "core", "out")]
    w.add_initializer(model, t.u_in.T.reshape((r_in, c, *ones)).astype(dtype), weights[0])
    w.add_initializer(model, t.core.reshape((r_out, r_in, *kernel)).astype(dtype), weights[1])
    w.add_initializer(model, t.u_out.reshape((m, r_out, *ones)).astype(dtype), weights[2])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    # Padding after a bias-free 1×1 conv equals padding before it (zeros stay zeros), so the
    # core conv takes the original's geometry and the 1×1 convs none.
    keep = {k: v for k, v in attrs.items()
            if k in ("strides", "pads", "dilations", "auto_pad", "kernel_shape")}
    bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
    new_nodes = [
        helper.make_node("Conv", [node.input[0], weights[0]], [mids[0]], name=names[0],
                         kernel_shape=ones),
        helper.make_node("Conv", [mids[0], weights[1]], [mids[1]], name=names[1], **keep),
        helper.make_node("Conv", [mids[1], weights[2], *bias], [node.output[0]], name=names[2],
                         kernel_shape=ones),
    ]
    origin = provenance.get_origin(node)
    for new in new_nodes:
        provenance.set_origin(new, origin)

    flops_before = flops_after = None
    if out_shape and in_shape and all(isinstance(d, int) and d >= 0 for d in out_shape):
        out_positions = math.prod(out_shape) // m
        in_positions = math.prod(in_shape) // c
        bias_flops = math.prod(out_shape) if bias else 0
        flops_before = 2 * out_positions * m * c * spatial + bias_flops
        flops_after = (2 * in_positions * c * r_in + 2 * out_positions * r_out * r_in * spatial
                       + 2 * out_positions * m * r_out + bias_flops)

    def kept(singular: np.ndarray, rank: int) -> float:
        total = float((singular ** 2).sum())
        return float((singular[:rank] ** 2).sum() / total) if total > 0 else 1.0

    details: dict[str, Any] = {
        "method": "tucker2", "rank_out": int(r_out), "rank_in": int(r_in),
        "full_rank_out": int(m), "full_rank_in": int(c),
        "energy_kept_out": kept(start.out_spectrum, r_out),
        "energy_kept_in": kept(start.in_spectrum, r_in),
        "rel_error": rel_error, "params_before": params_before, "params_after": params_after,
        "flops_before": flops_before, "flops_after": flops_after, "nodes": names,
    }
    if params["rank"] is not None:
        details["rank_requested"] = params["rank"]
    if params["energy"] is not None:
        details["energy_requested"] = params["energy"]
    return new_nodes, details


def _flops(op: str, target: _Target, rank: int, out_shape: list | None
           ) -> tuple[int | None, int | None]:
    """FLOPs of the node and of its two replacements (a multiply-add is 2, as in flops.py)."""
    if not out_shape or not all(isinstance(d, int) and d >= 0 for d in out_shape):
        return None, None
    out_n = math.prod(out_shape)
    rows, cols = target.matrix.shape
    bias = out_n if target.bias_elems else 0
    if op in ("MatMul", "Gemm"):  # matrix is [K, N]; output rows = out_n / N
        m = out_n // cols
        return 2 * m * rows * cols + bias, 2 * m * rows * rank + 2 * m * rank * cols + bias
    # Conv: matrix is [M, C·k…]; out_n / M output positions
    positions = out_n // rows
    return (2 * out_n * cols + bias,
            2 * positions * rank * cols + 2 * out_n * rank + bias)
