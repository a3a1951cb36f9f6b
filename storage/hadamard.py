"""Normalized Hadamard matrices (orthogonal, every entry ±1/√n) for PHI-S rotations.

Constructions, combined by Kronecker products (H_a ⊗ H_b is Hadamard of order ab):
  * Sylvester: orders 2^k.
  * Paley I:  order q + 1 for a prime q ≡ 3 (mod 4):   H = [[1, 1ᵀ], [-1, Q + I]],
  * Paley II: order 2(q + 1) for a prime q ≡ 1 (mod 4): from the symmetric conference matrix
    C = [[0, 1ᵀ], [1, Q]], replacing 0 by [[1, -1], [-1, -1]] and ±1 by ±[[1, 1], [1, -1]],
where Q is the Jacobsthal matrix Q[i, j] = χ(j − i) with χ the quadratic character mod q.
Every order n = 2^k · m where m is 1 or a Paley order is covered: 768 = 12·64, 1152 = 36·32 (or
72·16), 1280 = 20·64, 1536 = 12·128, 384 = 12·32. Other sizes (not 1, 2 or a multiple of 4, or a
multiple of 4 outside these families, e.g. 4·(odd non-Paley) cases such as 668 = 4·167) raise
ValueError; PHI-S then falls back to PCA whitening (storage/phis.py).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["hadamard", "has_hadamard"]


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    residues = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=np.int64)
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> np.ndarray:
    n = q + 1
    h = np.ones((n, n), dtype=np.int64)
    h[1:, 0] = -1
    h[1:, 1:] = _jacobsthal(q) + np.eye(q, dtype=np.int64)
    return h


def _paley2(q: int) -> np.ndarray:
    m = q + 1
    c = np.zeros((m, m), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    one = np.array([[1, 1], [1, -1]], dtype=np.int64)
    blocks = [[zero if v == 0 else v * one for v in row] for row in c]
    return np.block(blocks)


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _base(m: int) -> np.ndarray | None:
    """A ±1 Hadamard matrix of order m from one Paley construction, or None."""
    if m == 1:
        return np.ones((1, 1), dtype=np.int64)
    if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


@lru_cache(maxsize=32)
def _unnormalized(n: int) -> np.ndarray | None:
    if n <= 0:
        return None
    two = 1
    while n % (two * 2) == 0:
        two *= 2
    # try every split n = m * 2^j, the power of two as large as possible first
    j = two
    while j >= 1:
        base = _base(n // j)
        if base is not None:
            return np.kron(base, _sylvester(j))
        j //= 2
    return None


def has_hadamard(n: int) -> bool:
    return _unnormalized(int(n)) is not None


def hadamard(n: int) -> np.ndarray:
    """Normalized (orthogonal) n×n Hadamard matrix, float64; ValueError when none is constructible."""
    h = _unnormalized(int(n))
    if h is None:
        raise ValueError(f"no Hadamard matrix construction for order {n} (Sylvester x Paley I/II)")
    return h.astype(np.float64) / np.sqrt(n)
