import numpy as np
import pytest
import zarr

from storage.hadamard import hadamard, has_hadamard
from storage.phis import MomentAccumulator, PhisTransform, estimate_phis


def _anisotropic(dim: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    evals = np.logspace(-2, 2, dim)
    mean = rng.normal(scale=5.0, size=dim)
    x = rng.normal(size=(n, dim)) * np.sqrt(evals) @ q.T + mean
    return x, mean, q @ np.diag(evals) @ q.T


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 44, 48, 96, 768, 1152, 1280])
def test_hadamard_is_orthogonal_with_equal_magnitudes(n):
    h = hadamard(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), atol=1e-15)


@pytest.mark.parametrize("n", [3, 6, 10, 668])
def test_hadamard_missing_orders(n):
    assert not has_hadamard(n)
    with pytest.raises(ValueError, match=str(n)):
        hadamard(n)


@pytest.mark.parametrize("dim", [64, 48])
def test_whitened_channels_have_unit_variance_and_roundtrip(dim):
    x, mean, cov = _anisotropic(dim, 100_000)
    acc = MomentAccumulator(dim).update(x)
    t = PhisTransform.from_moments(acc.mean, acc.covariance, acc.count)
    assert t.method == "phi-s"
    y = t.apply(x)
    var = y.var(axis=0)
    assert np.all(np.abs(var - 1) < 0.05), var
    assert np.abs(y.mean(axis=0)).max() < 1e-6
    # isotropic: one scale, phi^2 = mean eigenvalue
    assert t.scale == pytest.approx(np.sqrt(np.trace(acc.covariance) / dim))
    np.testing.assert_allclose(t.unwhiten @ t.whiten, np.eye(dim), atol=1e-5)
    np.testing.assert_allclose(t.invert(y), x, atol=1e-5)


def test_streaming_float16_zarr_equals_numpy(tmp_path):
    x, _, _ = _anisotropic(32, 20_000, seed=1)
    x16 = x.astype(np.float16)
    arr = zarr.open_array(str(tmp_path / "a"), mode="w", shape=x16.shape, dtype="float16", chunks=(1000, 32))
    arr[:] = x16
    t = estimate_phis(arr, chunk_rows=1500)
    ref = x16.astype(np.float64)
    np.testing.assert_allclose(t.mean, ref.mean(0), rtol=1e-9, atol=1e-9)
    cov = np.cov(ref, rowvar=False, bias=True)
    t_ref = PhisTransform.from_moments(ref.mean(0), cov, len(ref))
    np.testing.assert_allclose(t.eigenvalues, t_ref.eigenvalues, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(t.whiten @ cov @ t.whiten.T, t_ref.whiten @ cov @ t_ref.whiten.T, atol=1e-6)


def test_merge_equals_single_pass_and_masking():
    x, _, _ = _anisotropic(16, 5000, seed=2)
    a = MomentAccumulator(16).update(x[:1234]).update(x[1234:3000])
    b = MomentAccumulator(16).update(x[3000:])
    one = MomentAccumulator(16).update(x)
    a.merge(b)
    assert a.count == one.count
    np.testing.assert_allclose(a.mean, one.mean, atol=1e-12)
    np.testing.assert_allclose(a.covariance, one.covariance, atol=1e-10)
    valid = np.random.default_rng(0).random(5000) > 0.3
    t = estimate_phis(x, chunk_rows=700, valid=valid)
    np.testing.assert_allclose(t.mean, x[valid].mean(0), atol=1e-12)
    assert t.count == valid.sum()


def test_subsampling_is_seeded_and_bounded():
    x, _, _ = _anisotropic(16, 10_000, seed=3)
    a = estimate_phis(x, max_rows=3000, seed=5, block_rows=100)
    b = estimate_phis(x, max_rows=3000, seed=5, block_rows=100)
    c = estimate_phis(x, max_rows=3000, seed=6, block_rows=100)
    assert a.count == 3000
    np.testing.assert_array_equal(a.mean, b.mean)
    assert not np.array_equal(a.mean, c.mean)


@pytest.mark.parametrize("dim", [2, 3, 5, 100, 384, 668, 1000, 1280])
def test_every_width_gets_phis_one_scale_a_rotation_unit_channels(dim):
    """Hadamard where it exists (2, 100 = Paley II over GF(49), 384, 1000, 1280), the equal-diagonal
    rotation elsewhere (3, 5, 668): always one isotropic scale, exactly unit channel variances."""
    rng = np.random.default_rng(dim)
    rows = max(3 * dim, 200)
    spectrum = np.exp(rng.uniform(-4, 3, dim))  # variances spread over three orders of magnitude
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    x = (rng.normal(size=(rows, dim)) * np.sqrt(spectrum)) @ basis.T + rng.normal(size=dim)
    t = estimate_phis(x)
    assert t.method == ("phi-s" if dim in (2, 100, 384, 1000, 1280) else "phi-s-equal-diagonal")
    singular = np.linalg.svd(t.whiten, compute_uv=False)
    assert singular.max() / singular.min() <= 1 + 1e-6  # one scale times an orthogonal matrix
    np.testing.assert_allclose(t.apply(x).var(0), 1.0, rtol=0, atol=1e-6)  # every channel, on the fitted data
    np.testing.assert_allclose(t.unwhiten @ t.whiten, np.eye(dim), atol=1e-9)
    cov = np.cov(x, rowvar=False, bias=True)
    phi_radio = np.sqrt(np.linalg.eigvalsh(cov).mean())  # RADIO's φ: √(mean eigenvalue)
    assert t.scale == pytest.approx(phi_radio, rel=1e-5)
    np.testing.assert_allclose(t.invert(t.apply(x)), x, atol=1e-8)


def test_files_of_the_earlier_pca_fallback_still_load(tmp_path):
    x, _, _ = _anisotropic(10, 5000, seed=4)
    t = estimate_phis(x)
    evals = t.eigenvalues
    old = PhisTransform(t.mean, t.rotation, t.scale, evals, "pca-whiten", t.count)
    old.rotation = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))[1][:, ::-1].T
    old.save(str(tmp_path / "old.npz"))
    back = PhisTransform.load(str(tmp_path / "old.npz"))
    assert back.method == "pca-whiten" and not back.isotropic
    np.testing.assert_allclose(back.invert(back.apply(x)), x, atol=1e-8)


def test_rank_deficient_is_finite():
    rng = np.random.default_rng(0)
    x = np.zeros((50, 16))
    x[:, :3] = rng.normal(size=(50, 3))  # 13 constant channels, fewer samples than some dims
    t = estimate_phis(x)
    assert np.isfinite(t.whiten).all() and np.isfinite(t.unwhiten).all()
    np.testing.assert_allclose(t.invert(t.apply(x)), x, atol=1e-8)


@pytest.mark.parametrize("url", ["local", "memory://phis/summary.npz"])
def test_save_load_roundtrip(tmp_path, url):
    x, _, _ = _anisotropic(12, 2000, seed=5)
    t = estimate_phis(x)
    path = str(tmp_path / "p" / "summary.npz") if url == "local" else url
    t.save(path)
    back = PhisTransform.load(path)
    np.testing.assert_array_equal(back.whiten, t.whiten)
    np.testing.assert_allclose(back.rotation, t.rotation, atol=1e-12)
    np.testing.assert_allclose(back.invert(back.apply(x)), x, atol=1e-8)
    assert back.method == t.method and back.count == t.count
    if url == "local":
        with np.load(path, allow_pickle=False) as z:
            assert {"mean", "whiten", "unwhiten"} <= set(z.files)
            np.testing.assert_array_equal(z["whiten"], t.whiten)


def test_bad_input():
    with pytest.raises(ValueError, match="dim"):
        MomentAccumulator(4).update(np.zeros((3, 5)))
    bad = np.ones((10, 4))
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        estimate_phis(bad)
    with pytest.raises(ValueError, match="zero variance"):
        estimate_phis(np.ones((10, 4)))
    with pytest.raises(ValueError, match="valid"):
        estimate_phis(np.zeros((10, 4)), valid=np.zeros(10, bool))
