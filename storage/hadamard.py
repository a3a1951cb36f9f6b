"""Normalized Hadamard matrices (orthogonal, every entry ±1/√n) for PHI-S rotations.

Constructions, combined by Kronecker products (H_a ⊗ H_b is Hadamard of order ab):
  * Sylvester: orders 2^k.
  * Paley I:  order q + 1 for a prime power q ≡ 3 (mod 4):   H = [[1, 1ᵀ], [-1, Q + I]],
  * Paley II: order 2(q + 1) for a prime power q ≡ 1 (mod 4): from the symmetric conference matrix
    C = [[0, 1ᵀ], [1, Q]], replacing 0 by [[1, -1], [-1, -1]] and ±1 by ±[[1, 1], [1, -1]],
where Q is the Jacobsthal matrix Q[i, j] = χ(x_j − x_i) over the q elements of the finite field
GF(q), χ its quadratic character (1 on nonzero squares, −1 on non-squares, 0 at 0). For a prime
q the field is the integers mod q; for q = p^k (k > 1) its elements are polynomials over GF(p)
modulo a monic irreducible polynomial of degree k, found by search.
Every order n = 2^k · m where m is 1 or a Paley order is covered: 768 = 12·64, 1152 = 36·32,
1280 = 20·64, 384 = 12·32, 1000 = 2·500 (499 prime), 100 = 2·50 (Paley II, q = 49 = 7²).
Other sizes (D ≢ 0 mod 4 with D > 2, and multiples of 4 outside these families, 668 being the
smallest) raise ValueError; PHI-S then uses an equal-diagonal rotation (storage/isotropic.py).
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np

__all__ = ["hadamard", "has_hadamard", "prime_power"]


def prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # the smallest prime factor
    k, rest = 0, q
    while rest % p == 0:
        rest //= p
        k += 1
    return (p, k) if rest == 1 else None


def _poly_mod(a: list[int], m: list[int], p: int) -> list[int]:
    """``a`` modulo the monic ``m`` over GF(p); coefficients lowest first."""
    a = list(a)
    while len(a) >= len(m):
        lead = a[-1]
        if lead:
            shift = len(a) - len(m)
            for i, c in enumerate(m):
                a[shift + i] = (a[shift + i] - lead * c) % p
        a.pop()
    return a


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p) (no monic factor of degree ≤ k/2)."""
    for tail in itertools.product(range(p), repeat=k):
        m = [*tail, 1]
        if m[0] == 0:
            continue
        if not any(not any(_poly_mod(m, [*low, 1], p))
                   for deg in range(1, k // 2 + 1) for low in itertools.product(range(p), repeat=deg)):
            return m
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = χ(x_j − x_i) over GF(q); elements are numbered by their base-p digits (lowest first)."""
    p, k = prime_power(q)
    digits = np.array([[(x // p**i) % p for i in range(k)] for x in range(q)], dtype=np.int64)
    modulus = _irreducible(p, k) if k > 1 else [0, 1]
    squares = set()
    for x in range(1, q):
        d = digits[x]
        product = [0] * (2 * k - 1)
        for i in range(k):
            for j in range(k):
                product[i + j] = (product[i + j] + int(d[i] * d[j])) % p
        reduced = _poly_mod(product, modulus, p) + [0] * k
        squares.add(sum(reduced[i] * p**i for i in range(k)))
    chi = np.array([0] + [1 if x in squares else -1 for x in range(1, q)], dtype=np.int64)
    diff = (digits[None, :, :] - digits[:, None, :]) % p  # x_j − x_i, digit by digit
    return chi[(diff * p ** np.arange(k)).sum(-1)]


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


def _base(m: int, fields: str) -> np.ndarray | None:
    """A ±1 Hadamard matrix of order m from one Paley construction over prime (``fields="prime"``) or
    prime-power (``"prime-power"``) fields, or None."""
    if m == 1:
        return np.ones((1, 1), dtype=np.int64)
    usable = (lambda q: prime_power(q) is not None and prime_power(q)[1] == 1) if fields == "prime" else (
        lambda q: prime_power(q) is not None)
    if m % 4 == 0 and usable(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and usable(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


@lru_cache(maxsize=32)
def _unnormalized(n: int) -> np.ndarray | None:
    if n <= 0:
        return None
    two = 1
    while n % (two * 2) == 0:
        two *= 2
    # every split n = m * 2^j, the power of two as large as possible first; prime fields before prime
    # powers, so every order the prime constructions cover keeps the matrix (and the PHI-S files) it had
    for fields in ("prime", "prime-power"):
        j = two
        while j >= 1:
            base = _base(n // j, fields)
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
        raise ValueError(f"no Hadamard matrix construction for order {n} (Sylvester x Paley I/II over prime powers)")
    return h.astype(np.float64) / np.sqrt(n)
