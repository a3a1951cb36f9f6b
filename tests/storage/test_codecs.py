"""The feature codecs: bit-exact against independent references, readable by plain zarr, honest fidelity."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from storage.arrays import create_array
from storage.codecs import (BFLOAT16_MAX, as_stored, decode_bfloat16, decode_int8, encode_bfloat16, encode_int8,
                            feature_array_options, fidelity)


def _features(rows: int = 300, dim: int = 48, seed: int = 0) -> np.ndarray:
    """Teacher-like rows: a shared mean, channels of unequal scale and one outlier channel."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim)) * np.linspace(0.2, 3.0, dim) + 1.5
    x[:, 5] *= 40.0
    return x.astype(np.float32)


def test_bfloat16_words_are_torchs_round_to_nearest_even():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-20, 20, 20000),
                        # exact ties between two bfloat16 values: the lower word's last bit decides
                        np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7F0000], np.uint32).view(np.float32),
                        np.array([0.0, -0.0, 1.0, -2.5, BFLOAT16_MAX, 1e-40, -3e-39, 1e-45], np.float32)])  # subnormals
    words = encode_bfloat16(x)
    reference = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(words, reference)
    np.testing.assert_array_equal(decode_bfloat16(words), torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    # a NaN stays a NaN whatever its payload (rounding the payload would carry into the sign and give ±0)
    nans = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FC00000], np.uint32).view(np.float32)
    assert np.isnan(decode_bfloat16(encode_bfloat16(nans))).all()


def _int8_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The codec's definition computed row by row in float64 with an explicit DCT-II matrix (no scipy)."""
    m, d = x.shape
    k, n = np.meshgrid(np.arange(d), np.arange(d), indexing="ij")
    dct = np.sqrt(2.0 / d) * np.cos(np.pi * (2 * n + 1) * k / (2 * d))
    dct[0] /= np.sqrt(2.0)
    nonzero = [i for i in range(m) if np.any(x[i] != 0)]
    mean = np.median(x[nonzero], axis=0).astype(np.float32)  # the per-channel median of the non-zero rows
    q = np.zeros((m, d), np.int8)
    out = np.zeros((m, d))
    for i in nonzero:  # an all-zero row stays zeros
        y = dct @ (x[i].astype(np.float64) - mean)
        s = np.float32(np.abs(y).max() / 127.0)
        q[i] = np.clip(np.rint(y / s), -127, 127) if s > 0 else 0
        out[i] = dct.T @ (q[i] * np.float64(s)) + mean
    return q, mean, out


def test_int8_rows_match_a_naive_float64_reference():
    x = _features(rows=64, dim=24)
    x[3] = 0.0  # a zero row (a failed image's summary) stays finite
    data = encode_int8(x)
    q, mean, expected = _int8_reference(x)
    raw = np.frombuffer(data, np.uint8)
    np.testing.assert_array_equal(raw[: 4 * 24].view("<f4"), mean)
    got_q = raw[4 * 24 + 4 * 64:].view(np.int8).reshape(64, 24)
    assert (np.abs(got_q.astype(int) - q.astype(int)) <= 1).all() and (got_q == q).mean() > 0.99  # float32 vs 64 ties
    decoded = decode_int8(data, x.shape)
    np.testing.assert_allclose(decoded, expected, rtol=0, atol=2e-4 * np.abs(x).max())
    assert (decoded[3] == 0).all() and raw[4 * 24 + 4 * 3: 4 * 24 + 4 * 4].view("<f4")[0] == -1.0
    with pytest.raises(ValueError, match="must hold"):
        decode_int8(data[:-1], x.shape)


def test_int8_one_outlier_row_does_not_cost_the_other_rows_of_its_chunk():
    """A high-norm row (a ViT's outlier token) in a chunk: centred on the chunk's mean, every other row would carry
    its shift (min cosine 0.979 at D = 16 when measured); the median centre leaves them at the precision of a chunk
    without the outlier, and the outlier row keeps its own."""
    rng = np.random.default_rng(0)
    for d in (16, 384):
        x = rng.standard_normal((64, d)).astype(np.float32)
        x[3, 0] = 1e4
        got = decode_int8(encode_int8(x), x.shape)
        cos = (got * x).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(x, axis=1)
        assert np.delete(cos, 3).min() > 0.9999 and cos[3] > 0.9999, (d, np.delete(cos, 3).min(), cos[3])


@pytest.mark.parametrize("codec", ["bfloat16", "int8"])
def test_plain_zarr_reads_the_codec_arrays_as_float32_without_project_imports(codec, tmp_path):
    x = _features()
    group = zarr.open_group(str(tmp_path / "g"), mode="w")
    arr = create_array(group, "patches", shape=x.shape, chunks=(32, x.shape[1]), shards=(128, x.shape[1]),
                       fill_value=0, **feature_array_options(codec))
    arr[:] = x
    padded = np.concatenate([x, np.zeros((-len(x) % 32, x.shape[1]), np.float32)])  # zarr fills the last chunk
    expected = np.concatenate([as_stored(codec, padded[i: i + 32]) for i in range(0, len(x), 32)])[: len(x)]
    # another process that imports only zarr: the codec comes from the installed entry point
    script = ("import sys, json, zarr, numpy as np; a = zarr.open_array(sys.argv[1], mode='r'); v = a[:]; "
              "print(json.dumps({'dtype': str(v.dtype), 'sum': float(v.astype(np.float64).sum()), "
              "'project': sorted(m for m in sys.modules if m.split('.')[0] == 'storage')}))")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "g" / "patches")], capture_output=True,
                         text=True, cwd=tmp_path, check=True)
    seen = json.loads(out.stdout)
    assert seen["dtype"] == "float32" and seen["project"] == ["storage", "storage.codecs"]  # loaded by zarr itself
    assert seen["sum"] == pytest.approx(float(expected.astype(np.float64).sum()), rel=1e-6)
    back = zarr.open_array(str(tmp_path / "g" / "patches"), mode="r")[:]
    np.testing.assert_array_equal(back, expected)
    cos = (back * x).sum(1) / np.linalg.norm(back, axis=1) / np.linalg.norm(x, axis=1)
    assert cos.min() > 0.999
    # the fidelity a writer records is the cosine of what is read back
    measured = fidelity(codec, x, 32)
    assert measured["rows"] == len(x)
    assert measured["cosine_sum"] / measured["rows"] == pytest.approx(float(cos.astype(np.float64).mean()), abs=1e-6)
    assert measured["cosine_min"] == pytest.approx(float(cos.min()), abs=1e-6)
    # centred on each chunk's mean (PHI-S keeps the angles of centred vectors)
    centred = []
    for i in range(0, len(x), 32):
        mean = x[i: i + 32].astype(np.float64).mean(axis=0)
        a, b = back[i: i + 32] - mean, x[i: i + 32] - mean
        centred.append((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    centred = np.concatenate(centred)
    assert measured["centred_sum"] / measured["rows"] == pytest.approx(float(centred.mean()), abs=1e-6)
    assert measured["centred_min"] == pytest.approx(float(centred.min()), abs=1e-6) and centred.min() > 0.99


def test_int8_is_half_of_float16s_bytes_and_refuses_other_dtypes(tmp_path):
    from storage.codecs import Int8RowCodec

    group = zarr.open_group(str(tmp_path / "g"), mode="w")
    opts = feature_array_options("int8")
    with pytest.raises(ValueError, match="no configuration"):  # a later, parameterised version is not this one
        Int8RowCodec.from_dict({"name": "amoe.int8", "configuration": {"scale": "chunk"}})
    with pytest.raises(ValueError, match="encodes float32"):
        create_array(group, "bad", shape=(8, 4), chunks=(8, 4), **{**opts, "dtype": "float16"})
    with pytest.raises(ValueError, match="unknown feature codec"):
        feature_array_options("int4")
    # rows of width 384 in chunks of 256 (the store's defaults): codec bytes before compression
    encoded = len(encode_int8(np.ones((256, 384), np.float32)))
    assert encoded / (256 * 384 * 2) == pytest.approx((384 * 4 + 256 * 4 + 256 * 384) / (256 * 384 * 2))
    assert encoded / (256 * 384 * 2) < 0.52
