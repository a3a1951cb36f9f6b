"""cache-teachers with --codec: what the store holds equals the float32 job through the codec's definition."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from config import load_config
from stages.cache import run_cache
from stages.config import CacheConfig
from storage import layout as L
from storage.codecs import as_stored
from storage.store import FeatureStore, StoreError

from cache_helpers import TINY_CNN

SMALL = {"min_tokens": 16, "max_tokens": 64, "shard_images": 4, "shard_rows": 96, "chunk_rows": 32,
         "pixel_shard_bytes": 1 << 14, "pixel_chunk_bytes": 1 << 12, "batch_size": 4, "phis_max_rows": 5000}


def _cache(folder, url: str, **extra):
    cfg = load_config(CacheConfig, None, {"teacher": TINY_CNN, "random_init": True, "layers": [3], **SMALL, **extra})
    return run_cache(str(folder), url, cfg)


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    got, want = got.reshape(-1, got.shape[-1]).astype(np.float64), want.reshape(-1, want.shape[-1]).astype(np.float64)
    keep = np.linalg.norm(want, axis=1) > 0
    return ((got * want).sum(1) / np.linalg.norm(got, axis=1).clip(1e-300) / np.linalg.norm(want, axis=1).clip(1e-300))[keep]


def test_codec_stores_equal_the_float32_job_through_the_codec(image_folder, tmp_path, ray_local):
    folder, _ = image_folder
    reference = tmp_path / "float32"
    _cache(folder, str(reference), codec="float32")
    want = zarr.open_group(str(reference), mode="r")[f"{L.TEACHERS}/efficientnet_lite0"]
    # bfloat16 joins the float32 store marked as version 3 (no codecs): the store is raised to version 4;
    # int8 goes to a store of its own, version 4 from its creation
    zarr.open_group(str(reference), mode="r+").attrs.update({"format_version": 3})
    for codec, url, name in (("bfloat16", str(reference), "lite0_bf16"), ("int8", str(tmp_path / "int8"), None)):
        report = _cache(folder, url, codec=codec, name=name)
        assert FeatureStore.open(url).format_version == 4
        store = FeatureStore.open(url)
        g = zarr.open_group(url, mode="r")[f"{L.TEACHERS}/{report.teacher}"]
        assert store.teacher_codec(report.teacher) == codec and g.attrs["fingerprint"]["dtype"] == codec
        fidelity = g.attrs["codec_fidelity"]
        for feature in (L.SUMMARY, L.PATCHES, L.layer_path(3)):
            got, ref = g[feature], want[feature]
            assert got.dtype == np.float32 and got.shape == ref.shape
            values, exact = got[:], ref[:]
            rows = got.chunks[0]
            padded = np.concatenate([exact, np.zeros((-len(exact) % rows, *exact.shape[1:]), exact.dtype)])
            expected = np.concatenate([as_stored(codec, padded[i: i + rows]) for i in range(0, len(exact), rows)])
            # within one quantization step of the codec applied to the float32 job's values (the two jobs' forwards
            # need not agree to the last bit)
            step = np.abs(exact).max() * (2.0 ** -8 if codec == "bfloat16" else 2.0 / 127)
            np.testing.assert_allclose(values, expected[: len(exact)], rtol=0, atol=step)
            cos = _cosines(values, exact)
            assert cos.min() > (0.999 if codec == "bfloat16" else 0.99), (codec, feature, cos.min())
            # the recorded fidelity is what a reader measures against the float32 targets
            assert fidelity[feature]["rows"] == cos.size
            assert fidelity[feature]["mean_cosine"] == pytest.approx(float(cos.mean()), abs=1e-5)
            assert fidelity[feature]["min_cosine"] == pytest.approx(float(cos.min()), abs=1e-5)
            assert 0.98 < fidelity[feature]["min_centred_cosine"] <= fidelity[feature]["mean_centred_cosine"] <= 1
            # every unit measured its summary; a unit that owns no patch rows (storage.shards) measured none
            assert (fidelity[feature]["units_sampled"] == store.plan().num_units if feature == L.SUMMARY
                    else 1 <= fidelity[feature]["units_sampled"] <= store.plan().num_units)
            failed = ~store.image_array(L.OK)[:]
            if feature == L.SUMMARY:  # a failed image's row reads as exact zeros under every codec
                assert failed.any() and (values[failed] == 0).all()
        # PHI-S statistics come from the decoded values
        with np.load(store.phis_path(report.teacher, L.PATCHES)) as stats:
            assert np.isfinite(stats["whiten"]).all()
    # another codec for a cached teacher is another fingerprint: refused, the store left as it was
    with pytest.raises(StoreError, match="another fingerprint"):
        _cache(folder, str(tmp_path / "int8"), codec="bfloat16")
    # the older name in a config file gives way to --codec
    assert load_config(CacheConfig, None, {"teacher": TINY_CNN, "codec": "int8", "dtype": "float16"}).feature_codec == "int8"


def test_only_the_sampled_units_measure_fidelity(image_folder, tmp_path, ray_local):
    """The writers of ``fidelity_units`` units spread over the store (first and last included) measure their
    codec; the others skip the second encode. ``codec_fidelity`` summarizes exactly what those units wrote."""
    folder, _ = image_folder
    url = str(tmp_path / "store")
    report = _cache(folder, url, codec="float16", fidelity_units=2)
    store = FeatureStore.open(url)
    plan, name = store.plan(), report.teacher
    assert plan.num_units >= 4
    sampled = {0, plan.num_units - 1}
    commits, layer_commits = store.teacher_commits(name), store.layer_commits(name, 3)
    for unit in range(plan.num_units):
        main, layer = commits.info(unit)["fidelity"], layer_commits.info(unit)["fidelity"]
        if unit in sampled:  # the summary is written by every unit (a unit may own no patch or layer rows)
            assert L.SUMMARY in main, unit
        else:
            assert main == {} and layer == {}, unit
    fidelity = store.teacher_attrs(name)["codec_fidelity"]
    ok = store.image_array(L.OK)[:]
    owned_rows = sum(commits.info(u)["rows"][1] - commits.info(u)["rows"][0] for u in sampled)
    assert fidelity[L.SUMMARY]["units_sampled"] == 2
    assert fidelity[L.SUMMARY]["rows"] == sum(int(ok[slice(*plan.image_range(u))].sum()) for u in sampled)
    assert fidelity[L.PATCHES]["rows"] == fidelity[L.layer_path(3)]["rows"] == owned_rows > 0
    assert 0.999 < fidelity[L.PATCHES]["min_cosine"] <= fidelity[L.PATCHES]["mean_cosine"] <= 1
