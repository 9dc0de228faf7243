"""Tucker-2 of a Conv kernel: W [M, C, k…] ≈ core [r_out, r_in, k…] ×₀ U_out [M, r_out] ×₁ U_in [C, r_in].

The spatial modes stay whole; only the channel modes are reduced. The factors come from a
truncated HOSVD refined by a few sweeps of higher-order orthogonal iteration (HOOI), which is
the classical way to compress a trained convolution into 1×1 → k×k → 1×1 (Kim et al. 2016).
Every step is an SVD of an unfolding through NumPy; the decomposition itself is a few lines, and
a tensor library would add a dependency (and SciPy) for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HOOI_SWEEPS = 8


@dataclass
class Hosvd:
    """Both channel unfoldings' full SVD factors: what the ranks are chosen from and what the
    refinement starts from (computed once)."""

    u_out: np.ndarray  # [M, min(M, C·S)]
    out_spectrum: np.ndarray  # singular values of the output-channel unfolding
    u_in: np.ndarray  # [C, min(C, M·S)]
    in_spectrum: np.ndarray  # singular values of the input-channel unfolding


@dataclass
class Tucker2:
    core: np.ndarray  # [r_out, r_in, S] with S the product of the kernel's spatial dims
    u_out: np.ndarray  # [M, r_out], orthonormal columns
    u_in: np.ndarray  # [C, r_in], orthonormal columns

    def reconstruct(self) -> np.ndarray:
        """The approximated kernel as [M, C, S]."""
        return np.einsum("ois,mo,ci->mcs", self.core, self.u_out, self.u_in, optimize=True)


def hosvd(kernel: np.ndarray) -> Hosvd:
    """SVDs of the output-channel [M, C·S] and input-channel [C, M·S] unfoldings of [M, C, S]."""
    m, c, s = kernel.shape
    u_out, s_out, _ = np.linalg.svd(kernel.reshape(m, c * s), full_matrices=False)
    u_in, s_in, _ = np.linalg.svd(kernel.transpose(1, 0, 2).reshape(c, m * s),
                                  full_matrices=False)
    return Hosvd(u_out, s_out, u_in, s_in)


def _leading(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, _, _ = np.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank]


def decompose(kernel: np.ndarray, r_out: int, r_in: int, start: Hosvd | None = None,
              sweeps: int = HOOI_SWEEPS) -> Tucker2:
    """Tucker-2 of ``kernel`` [M, C, S] (float64) with the given channel ranks, refined from the
    truncated HOSVD ``start`` (computed here when not given).

    At r_out = M and r_in = C both factors are square orthogonal and the result is exact."""
    start = start if start is not None else hosvd(kernel)
    u_out, u_in = start.u_out[:, :r_out], start.u_in[:, :r_in]
    for _ in range(sweeps):
        # Each factor is the leading subspace of the kernel projected on the other one.
        y = np.einsum("mcs,ci->mis", kernel, u_in, optimize=True)
        u_out = _leading(y.reshape(y.shape[0], -1), r_out)
        z = np.einsum("mcs,mo->cos", kernel, u_out, optimize=True)
        u_in = _leading(z.reshape(z.shape[0], -1), r_in)
    core = np.einsum("mcs,mo,ci->ois", kernel, u_out, u_in, optimize=True)
    return Tucker2(core, u_out, u_in)
