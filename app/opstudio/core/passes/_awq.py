"""Activation-aware weight scaling before 4-bit rounding (AWQ, Lin et al. 2024).

A few input channels of an LLM projection carry much larger activations than the rest, and
the rounding error of their weight rows is multiplied by them. Scaling those rows up by s_j
before rounding (and the activation down by s_j, which ``scale_inputs`` folds into the
preceding norm where it can) shrinks their relative error at the cost of the others'. As in
the paper, ``s = mean|x|^α`` (normalised around 1) and α is searched on a grid per input tensor,
so that q/k/v and gate/up share one s; what is minimised is the output error on the
calibration inputs, ``Σ tr(ΔWᵀ·XᵀX·ΔW) / tr(Wᵀ·XᵀX·W)`` summed over the group, with ΔW the
error of round-to-nearest in blocks along K as MatMulNBits stores them. α = 0 (no scaling)
is on the grid, so the chosen scaling never predicts a larger error than plain rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GRID = tuple(i / 10 for i in range(11))
# output columns the α search looks at per weight: each column's error is its own blocks
# along K, so evenly strided columns estimate the ratio; a 151936-wide vocabulary projection
# otherwise costs minutes of Gram products per α
SEARCH_COLUMNS = 8192


@dataclass
class Search:
    """The α chosen for one input tensor and the relative output errors it predicts."""

    alpha: float
    scale: np.ndarray
    error: float  # with the scaling
    plain: float  # round-to-nearest alone


def round_blocks(w: np.ndarray, block: int, symmetric: bool) -> np.ndarray:
    """``w`` [K, N] rounded to 4 bits in blocks of ``block`` along K, then restored.

    Symmetric: levels -8…7 with scale max|w|/8 (the largest magnitude lands on -8 or 8→7);
    asymmetric: 16 levels between min and max with an integer zero point, both including 0.
    The same grids MatMulNBits' quantizer writes, up to how ties round.
    """
    k, n = w.shape
    pad = (-k) % block
    padded = np.pad(w, ((0, pad), (0, 0))) if pad else w
    b = padded.reshape(-1, block, n)
    if symmetric:
        scale = np.abs(b).max(axis=1, keepdims=True) / 8.0
        scale[scale == 0] = 1.0
        q = np.clip(np.round(b / scale), -8, 7)
        out = q * scale
    else:
        lo = np.minimum(b.min(axis=1, keepdims=True), 0.0)
        hi = np.maximum(b.max(axis=1, keepdims=True), 0.0)
        scale = (hi - lo) / 15.0
        scale[scale == 0] = 1.0
        zero = np.clip(np.round(-lo / scale), 0, 15)
        q = np.clip(np.round(b / scale) + zero, 0, 15)
        out = (q - zero) * scale
    return out.reshape(-1, n)[:k]


def _error(w: np.ndarray, restored: np.ndarray, gram: np.ndarray, norm: float) -> float:
    delta = restored - w
    return float(np.einsum("kn,kn->", delta, gram @ delta)) / norm


def search(weights: Sequence[np.ndarray], abs_mean: np.ndarray, gram: np.ndarray,
           block: int, symmetric: bool, grid: Sequence[float] = GRID) -> Search:
    """The α on ``grid`` whose scaling gives the least output error over ``weights``
    (each [K, N], input channels first) for inputs with per-channel ``abs_mean`` and Gram
    matrix ``gram`` [K, K]. Wide weights are judged on ``SEARCH_COLUMNS`` strided columns."""
    mats = [np.asarray(w, np.float64).reshape(w.shape[0], -1) for w in weights]
    mats = [m[:, ::-(-m.shape[1] // SEARCH_COLUMNS)] for m in mats]
    norms = [max(float(np.einsum("kn,kn->", w, gram @ w)), 1e-30) for w in mats]
    # channels the calibration never saw active keep s = 1 (any s would do; 1 changes nothing)
    seen = abs_mean > 0
    floor = abs_mean[seen].min() if seen.any() else 1.0
    magnitude = np.where(seen, abs_mean, floor)
    errors: dict[float, tuple[float, np.ndarray]] = {}
    for alpha in sorted({0.0, *grid}):
        s = magnitude ** alpha
        s = s / np.sqrt(s.max() * s.min())
        errors[alpha] = (sum(_error(w, round_blocks(w * s[:, None], block, symmetric)
                                    / s[:, None], gram, norm)
                             for w, norm in zip(mats, norms)), s)
    alpha = min(errors, key=lambda a: errors[a][0])
    return Search(alpha=alpha, scale=errors[alpha][1], error=errors[alpha][0],
                  plain=errors[0.0][0])
