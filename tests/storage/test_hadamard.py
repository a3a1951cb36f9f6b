import numpy as np
import pytest
import scipy.linalg

from storage.hadamard import hadamard, has_hadamard


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 44, 48, 384, 768, 1024, 1152, 1280, 1536])
def test_orthogonal_with_equal_magnitudes(n):
    h = hadamard(n)
    assert h.shape == (n, n) and h.dtype == np.float64 and has_hadamard(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", [2, 4, 16, 64])
def test_powers_of_two_are_sylvester(n):
    np.testing.assert_array_equal(hadamard(n) * np.sqrt(n), scipy.linalg.hadamard(n))


@pytest.mark.parametrize("n", [0, -4, 3, 5, 6, 10, 14, 18, 30, 668])
def test_missing_orders_raise_naming_n(n):
    assert not has_hadamard(n)
    with pytest.raises(ValueError, match=rf"order {n}\b"):
        hadamard(n)


def test_has_hadamard_agrees_with_hadamard():
    built = [n for n in range(1, 101) if has_hadamard(n)]
    for n in built:
        np.testing.assert_allclose(hadamard(n) @ hadamard(n).T, np.eye(n), atol=1e-12)
    assert [n for n in built if n > 2 and n % 4] == []  # Hadamard orders are 1, 2 or multiples of 4
    assert [n for n in range(4, 49, 4) if n not in built] == []  # every multiple of 4 up to 48
