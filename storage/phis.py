"""PHI-S: PCA-Hadamard isotropic standardization of teacher features (Ranzinger et al. 2024; AMoE §3.2).

With mean μ, covariance Σ = U Λ Uᵀ (population, eigenvalues λ) and a normalized Hadamard matrix H
(orthogonal, entries ±1/√D), PHI-S maps a feature x ∈ R^D to

    y = (1/φ) · H Uᵀ (x − μ),         φ² = tr(Σ)/D = mean(λ)      (PHI-S paper, Eq. for "PHI-S")

Cov(y) = (1/φ²) H Λ Hᵀ, whose diagonal is (1/φ²)·Σ_k H_ik² λ_k = (1/φ²)·(1/D)·Σ_k λ_k = 1: every
channel gets unit variance with one isotropic scale, so no teacher or channel dominates an MSE or
smooth-L1 loss. The inverse is x = φ · U Hᵀ y + μ (H and U orthogonal). In row-vector form, as
stored: y = (x − mean) @ whitenᵀ with whiten = H Uᵀ / φ, and x = y @ unwhitenᵀ + mean with
unwhiten = φ U Hᵀ.

All that PHI-S asks of H is that H Λ Hᵀ has an equal diagonal. Widths with no Hadamard construction
(storage/hadamard.py: D ≢ 0 mod 4 above 2, and 668, ...) use an orthogonal R with that same property
instead (storage/isotropic.py, Chan & Li 1983), so every width gets PHI-S itself: one isotropic scale
φ, a rotation, unit variance on every channel. (RADIO falls back to a random orthogonal matrix, which
leaves channel variances spread around 1; PCA whitening, this module's earlier fallback, rescales
each principal direction separately.) ``method`` records the rotation: "phi-s" (Hadamard),
"phi-s-equal-diagonal"; files written by the earlier fallback ("pca-whiten") still load.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .fsutil import atomic_write, filesystem
from .isotropic import isotropic_rotation

__all__ = ["MomentAccumulator", "PhisTransform", "estimate_phis"]

EIGEN_FLOOR = 1e-6


class MomentAccumulator:
    """Streaming count, mean and covariance in float64 (Chan et al. pairwise combination)."""

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self.mean = np.zeros(self.dim, np.float64)
        self.m2 = np.zeros((self.dim, self.dim), np.float64)  # Σ (x - mean)(x - mean)ᵀ

    def update(self, x: np.ndarray) -> "MomentAccumulator":
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected rows of dim {self.dim}, got shape {x.shape}")
        if len(x) == 0:
            return self
        x = x.astype(np.float64)
        if not np.isfinite(x).all():
            raise ValueError("non-finite values in PHI-S input")
        other = MomentAccumulator(self.dim)
        other.count = len(x)
        other.mean = x.mean(axis=0)
        centered = x - other.mean
        other.m2 = centered.T @ centered
        return self.merge(other)

    def merge(self, other: "MomentAccumulator") -> "MomentAccumulator":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge dims {self.dim} and {other.dim}")
        if other.count == 0:
            return self
        n = self.count + other.count
        delta = other.mean - self.mean
        self.m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.count * other.count / n)
        self.mean = self.mean + delta * (other.count / n)
        self.count = n
        return self

    @property
    def covariance(self) -> np.ndarray:
        """Population covariance (divides by the count)."""
        if self.count == 0:
            raise ValueError("no samples")
        return self.m2 / self.count


@dataclass
class PhisTransform:
    mean: np.ndarray  # [D]
    rotation: np.ndarray  # [D, D]: R Uᵀ (R = H, or the equal-diagonal rotation); Uᵀ for "pca-whiten" files
    scale: float  # φ
    eigenvalues: np.ndarray  # [D], descending
    method: str  # "phi-s", "phi-s-equal-diagonal" (or "pca-whiten", read from older files)
    count: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def isotropic(self) -> bool:
        """One scale and a rotation (PHI-S); False only for "pca-whiten" files of the earlier fallback."""
        return self.method.startswith("phi-s")

    @property
    def whiten(self) -> np.ndarray:
        if self.isotropic:
            return self.rotation / self.scale
        floor = np.maximum(self.eigenvalues, EIGEN_FLOOR * max(self.eigenvalues.max(), 1e-300))
        return self.rotation / np.sqrt(floor)[:, None]

    @property
    def unwhiten(self) -> np.ndarray:
        if self.isotropic:
            return self.rotation.T * self.scale
        floor = np.maximum(self.eigenvalues, EIGEN_FLOOR * max(self.eigenvalues.max(), 1e-300))
        return self.rotation.T * np.sqrt(floor)[None, :]

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - self.mean) @ self.whiten.T

    def invert(self, y: np.ndarray) -> np.ndarray:
        return np.asarray(y, np.float64) @ self.unwhiten.T + self.mean

    @classmethod
    def from_moments(cls, mean: np.ndarray, cov: np.ndarray, count: int) -> "PhisTransform":
        mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
        dim = mean.shape[0]
        if cov.shape != (dim, dim):
            raise ValueError(f"covariance shape {cov.shape} does not match mean dim {dim}")
        evals, evecs = np.linalg.eigh((cov + cov.T) / 2)
        order = np.argsort(evals)[::-1]
        evals, evecs = np.clip(evals[order], 0.0, None), evecs[:, order]
        phi = float(np.sqrt(evals.mean()))
        if not phi > 0:
            raise ValueError("features have zero variance: PHI-S is undefined")
        rotation, kind = isotropic_rotation(evals)
        return cls(mean, rotation @ evecs.T, phi, evals, "phi-s" if kind == "hadamard" else "phi-s-equal-diagonal",
                   int(count))

    def save(self, url: str) -> None:
        buf = io.BytesIO()
        np.savez(  # the rotation is not stored: it is whiten times the scale(s), see ``load``
            buf,
            mean=self.mean, whiten=self.whiten, unwhiten=self.unwhiten, scale=np.float64(self.scale),
            eigenvalues=self.eigenvalues, method=np.str_(self.method), count=np.int64(self.count),
        )
        fs, path = filesystem(url)
        atomic_write(fs, path, buf.getvalue())

    @classmethod
    def load(cls, url: str) -> "PhisTransform":
        fs, path = filesystem(url)
        with np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False) as z:
            method, scale, evals = str(z["method"]), float(z["scale"]), z["eigenvalues"]
            if method.startswith("phi-s"):
                rotation = z["whiten"] * scale
            else:
                floor = np.maximum(evals, EIGEN_FLOOR * max(evals.max(), 1e-300))
                rotation = z["whiten"] * np.sqrt(floor)[:, None]
            return cls(z["mean"], rotation, scale, evals, method, int(z["count"]))


def _row_blocks(total: int, block: int) -> list[tuple[int, int]]:
    return [(s, min(s + block, total)) for s in range(0, total, block)]


def estimate_phis(
    array,
    *,
    chunk_rows: int = 65536,
    max_rows: int | None = None,
    seed: int = 0,
    valid: np.ndarray | None = None,
    block_rows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PhisTransform:
    """Estimate PHI-S from a 2-D array-like [T, D] (zarr, numpy, dask), streaming, never whole.

    Without ``max_rows`` (or when the array has fewer valid rows), every valid row is used, read
    ``chunk_rows`` at a time. With ``max_rows``, whole row blocks (``block_rows``, default the
    array's chunk length) are visited in a seeded random order until ``max_rows`` valid rows are
    accumulated: reads stay contiguous while the sample spans the whole store (AMoE: 3M samples).
    ``valid`` is a boolean mask over rows (e.g. images/ok for the summary array).
    """
    total, dim = int(array.shape[0]), int(array.shape[1])
    if valid is not None and len(valid) != total:
        raise ValueError(f"valid mask has {len(valid)} rows, array has {total}")
    n_valid = total if valid is None else int(np.count_nonzero(valid))
    if n_valid == 0:
        raise ValueError("no valid rows to estimate PHI-S from")
    acc = MomentAccumulator(dim)
    if max_rows is None or max_rows >= n_valid:
        blocks, budget = _row_blocks(total, chunk_rows), n_valid
    else:
        native = getattr(array, "chunks", None)
        size = block_rows or (int(native[0]) if native and isinstance(native[0], (int, np.integer)) else 1024)
        blocks = _row_blocks(total, size)
        order = np.random.default_rng(seed).permutation(len(blocks))
        blocks, budget = [blocks[i] for i in order], max_rows
    done = 0
    for r0, r1 in blocks:
        rows = np.asarray(array[r0:r1])
        if valid is not None:
            rows = rows[np.asarray(valid[r0:r1], bool)]
        if done + len(rows) > budget:
            rows = rows[: budget - done]
        acc.update(rows)
        done += len(rows)
        if progress:
            progress(done, budget)
        if done >= budget:
            break
    return PhisTransform.from_moments(acc.mean, acc.covariance, acc.count)
