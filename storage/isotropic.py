"""Rotations that spread a spectrum evenly over the channels: the "H" of PHI-S for every width.

PHI-S (Ranzinger et al. 2024) rotates PCA-aligned features with a normalized Hadamard matrix H: the
diagonal of H Λ Hᵀ is mean(λ) on every channel, so one isotropic scale φ = √mean(λ) gives every
channel unit variance. What PHI-S needs of H is exactly that property: an orthogonal R whose
R Λ Rᵀ has an equal diagonal. Such an R exists for every width D (Schur–Horn: the constant vector
mean(λ)·1 is majorized by λ), and Chan & Li (1983, "Diagonal elements and eigenvalues of a real
symmetric matrix") build it with at most D − 1 Givens rotations: pick a channel above the mean and
one below it, and rotate in their plane by the angle that puts the first exactly on the mean; the
first is then done for good. ``isotropic_rotation`` uses Hadamard where a construction exists
(``storage.hadamard``) and this rotation elsewhere: D ≡ 2 (mod 4) with D > 2, odd D > 1, and the
multiples of 4 without a known construction (668 is the smallest).
"""

from __future__ import annotations

import numpy as np

from .hadamard import hadamard, has_hadamard

__all__ = ["equal_diagonal_rotation", "isotropic_rotation"]


def equal_diagonal_rotation(eigenvalues: np.ndarray, *, tol: float = 1e-13) -> np.ndarray:
    """Orthogonal R (float64) with diag(R · diag(λ) · Rᵀ) = mean(λ) on every channel (Chan & Li 1983).

    Deterministic: each step rotates the channel furthest above the mean with the one furthest below.
    """
    lam = np.asarray(eigenvalues, np.float64)
    d = lam.shape[0]
    target = lam.mean()
    a = np.diag(lam)
    r = np.eye(d)
    slack = tol * max(float(np.abs(lam).max(initial=0.0)), 1e-300)
    for _ in range(max(d - 1, 0)):
        dev = np.diag(a) - target
        i, j = int(np.argmax(dev)), int(np.argmin(dev))
        if dev[i] <= slack and dev[j] >= -slack:
            break
        aii, ajj, aij = a[i, i], a[j, j], a[i, j]
        # (G A Gᵀ)_ii = (aii + ajj)/2 + h·cos 2θ + aij·sin 2θ = (aii + ajj)/2 + ρ·cos(2θ − ψ), set equal to the mean
        h = (aii - ajj) / 2
        rho, psi = np.hypot(h, aij), np.arctan2(aij, h)
        theta = (psi + np.arccos(np.clip((target - (aii + ajj) / 2) / rho, -1.0, 1.0))) / 2
        c, s = np.cos(theta), np.sin(theta)
        rows = np.array([[c, s], [-s, c]])
        a[[i, j], :] = rows @ a[[i, j], :]
        a[:, [i, j]] = a[:, [i, j]] @ rows.T
        r[[i, j], :] = rows @ r[[i, j], :]
        a[i, i] = target  # exact by construction; remove rounding so the channel stays done
    return r


def isotropic_rotation(eigenvalues: np.ndarray) -> tuple[np.ndarray, str]:
    """(R, name): a normalized Hadamard matrix where one exists, else the equal-diagonal rotation."""
    d = len(eigenvalues)
    if has_hadamard(d):
        return hadamard(d), "hadamard"
    return equal_diagonal_rotation(eigenvalues), "equal-diagonal"
