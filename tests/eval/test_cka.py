"""Linear CKA (AMoE Eq. 8) against the float64 HSIC form with a centring matrix, and its invariances."""

from __future__ import annotations

import numpy as np
import pytest

from eval.cka import linear_cka


def _hsic_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s definition on n×n Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_linear_cka_equals_the_centred_gram_definition_and_its_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 7))
    y = x @ rng.normal(size=(7, 5)) + 0.5 * rng.normal(size=(60, 5))  # related, other width
    assert linear_cka(x, y) == pytest.approx(_hsic_reference(x, y), rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert linear_cka(x, 3.0 * y @ q + 2.0) == pytest.approx(linear_cka(x, y), rel=1e-10)  # rotation, scale, shift
    assert linear_cka(x, x) == pytest.approx(1.0)
    unrelated = linear_cka(x, rng.normal(size=(60, 5)))
    assert 0.0 <= unrelated < linear_cka(x, y) <= 1.0
    assert np.isnan(linear_cka(x[:1], y[:1])) and np.isnan(linear_cka(np.ones((5, 3)), y[:5]))
    with pytest.raises(ValueError, match="paired rows"):
        linear_cka(x, y[:10])
