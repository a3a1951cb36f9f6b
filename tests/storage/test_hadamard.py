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


@pytest.mark.parametrize("n,q", [(28, 27), (52, 25), (56, 27), (100, 49), (244, 243), (252, 125), (344, 343)])
def test_paley_over_prime_power_fields(n, q):
    """Orders that need GF(p^k): Paley I for q ≡ 3 (mod 4), Paley II for q ≡ 1 (mod 4)."""
    from storage.hadamard import prime_power

    assert prime_power(q)[1] > 1
    h = hadamard(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=0, atol=1e-15)


def test_prime_power():
    from storage.hadamard import prime_power

    assert [prime_power(q) for q in (2, 3, 4, 9, 49, 97, 125, 243)] == [(2, 1), (3, 1), (2, 2), (3, 2), (7, 2),
                                                                      (97, 1), (5, 3), (3, 5)]
    assert [prime_power(q) for q in (0, 1, 6, 12, 45, 100)] == [None] * 6


@pytest.mark.parametrize("n,digest", [(12, "96c4e95b8f52c8de"), (28, "a24c9c5912c711a9"), (104, "446ce5d2db2e397f"),
                                      (768, "6c64696fee95cf79"), (1152, "a1dda116ee953dd2"),
                                      (1280, "1d5d8ce4d8990c5b"), (1408, "936f0e4180cb42c9")])
def test_orders_covered_before_prime_powers_keep_their_matrix(n, digest):
    """The prime-field constructions come first: existing stores' PHI-S rotations are reproduced exactly
    (digests of the sign pattern computed with the code before prime-power fields were added)."""
    import hashlib

    assert hashlib.sha256(np.sign(hadamard(n)).astype(np.int8).tobytes()).hexdigest()[:16] == digest
