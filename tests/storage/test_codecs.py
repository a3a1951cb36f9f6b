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


def _dct_matrix(d: int) -> np.ndarray:
    """The orthonormal DCT-II as an explicit float64 matrix (no scipy)."""
    k, n = np.meshgrid(np.arange(d), np.arange(d), indexing="ij")
    dct = np.sqrt(2.0 / d) * np.cos(np.pi * (2 * n + 1) * k / (2 * d))
    dct[0] /= np.sqrt(2.0)
    return dct


def _int8_reference(x: np.ndarray, steps_per_rms: int = 16
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Version 2 of the codec's definition (storage/codecs.py docstring), row by row and channel by channel in
    float64: ``(q, centre, scale, step, decoded, transform)``."""
    m, d = x.shape
    dct = _dct_matrix(d)
    nonzero = [i for i in range(m) if np.any(x[i] != 0)]
    zeros = sum(1 for i in nonzero for c in range(d) if x[i, c] == 0)
    sparse = bool(nonzero) and zeros > 0.5 * len(nonzero) * d
    centre, scale = np.zeros(d, np.float32), np.ones(d, np.float32)
    if not sparse and nonzero:
        centre = np.median(x[nonzero], axis=0).astype(np.float32)  # the per-channel median of the non-zero rows
        spread = []
        for c in range(d):  # 1.4826 x the median absolute deviation, the RMS deviation where that is 0
            dev = [float(x[i, c]) - float(centre[c]) for i in nonzero]
            mad = 1.4826 * float(np.median(np.abs(dev)))
            spread.append(mad if mad > 0 else float(np.sqrt(np.mean(np.square(dev)))))
        if max(spread) > 0:
            floor = max(min(r for r in spread if r > 0), max(spread) / 1e6)
            scale = np.array([np.sqrt(max(r, floor) / floor) for r in spread], np.float32)
    q, step, out = np.zeros((m, d), np.int8), np.full(m, -1.0, np.float32), np.zeros((m, d))
    for i in nonzero:  # an all-zero row stays zeros
        z = (x[i].astype(np.float64) - centre) / scale
        y = x[i].astype(np.float64) if sparse else dct @ z
        nonzero_values = y[y != 0]  # the RMS of the values that are not exact zeros
        finest = np.abs(y).max() / 127.0
        coarse = np.sqrt(np.mean(nonzero_values ** 2)) / steps_per_rms if steps_per_rms else finest
        if not sparse and np.abs(z).max() > 8 * np.sqrt(np.mean(z ** 2)):  # a spike keeps the finest step
            coarse = finest
        step[i] = max(finest, coarse)
        q[i] = np.clip(np.rint(y / np.float64(step[i])), -127, 127) if step[i] > 0 else 0
        back = q[i] * np.float64(step[i])
        out[i] = (back if sparse else dct.T @ back) * scale + centre
    return q, centre, scale, step, out, 0 if sparse else 1


def _int8_v1_chunk(x: np.ndarray) -> tuple[bytes, np.ndarray]:
    """A version-1 chunk (arrays created before version 2: median centre, no channel scale, s = max|y|/127),
    built in float64 from its definition, and its decoded rows."""
    m, d = x.shape
    dct = _dct_matrix(d)
    nonzero = [i for i in range(m) if np.any(x[i] != 0)]
    centre = np.median(x[nonzero], axis=0).astype(np.float32)
    q, step, out = np.zeros((m, d), np.int8), np.full(m, -1.0, np.float32), np.zeros((m, d))
    for i in nonzero:
        y = dct @ (x[i].astype(np.float64) - centre)
        step[i] = np.abs(y).max() / 127.0
        q[i] = np.clip(np.rint(y / np.float64(step[i])), -127, 127)
        out[i] = dct.T @ (q[i] * np.float64(step[i])) + centre
    return centre.astype("<f4").tobytes() + step.astype("<f4").tobytes() + q.tobytes(), out


def _split_v2(data: bytes, m: int, d: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    raw = np.frombuffer(data, np.uint8)
    head = 4 + 8 * d
    return (int(raw[:4].view("<u4")[0]), raw[4: 4 + 4 * d].view("<f4"), raw[4 + 4 * d: head].view("<f4"),
            raw[head: head + 4 * m].view("<f4"), raw[head + 4 * m:].view(np.int8).reshape(m, d))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _relu_rows(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """ReLU features: about 85% exact zeros, channels of unequal scale (EfficientNet-Lite's are 94% zeros)."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal((rows, dim)) * np.linspace(0.5, 4.0, dim) - 3.0, 0).astype(np.float32)


@pytest.mark.parametrize("kind,steps_per_rms", [("dense", 16), ("sparse", 16), ("dense", 0)])
def test_int8_rows_match_a_naive_float64_reference(kind, steps_per_rms):
    d = 96  # wide enough for one value to stand 8x above its row's RMS (at most √D)
    x = _features(rows=64, dim=d) if kind == "dense" else _relu_rows(64, d)
    x[3] = 0.0  # a zero row (a failed image's summary) stays finite
    x[7, 2] = 3000.0 if kind == "dense" else x[7, 2]  # a spike: its row keeps the finest step
    data = encode_int8(x, steps_per_rms=steps_per_rms)
    q, centre, scale, step, expected, transform = _int8_reference(x, steps_per_rms)
    got_transform, got_centre, got_scale, got_step, got_q = _split_v2(data, 64, d)
    assert got_transform == transform == (1 if kind == "dense" else 0)
    np.testing.assert_array_equal(got_centre, centre)
    np.testing.assert_allclose(got_scale, scale, rtol=1e-6)
    np.testing.assert_allclose(got_step, step, rtol=1e-6)
    assert (np.abs(got_q.astype(int) - q.astype(int)) <= 1).all() and (got_q == q).mean() > 0.99  # float32 vs 64 ties
    decoded = decode_int8(data, x.shape)
    np.testing.assert_allclose(decoded, expected, rtol=0, atol=2e-4 * np.abs(x).max())
    assert (decoded[3] == 0).all() and got_step[3] == -1.0
    if kind == "sparse":  # untransformed: a zero stays an exact zero (and so a zero byte for Blosc)
        assert (decoded[x == 0] == 0).all()
    with pytest.raises(ValueError, match="must hold"):
        decode_int8(data[:-1], x.shape)
    with pytest.raises(ValueError, match="transform 7"):
        decode_int8(np.uint32(7).tobytes() + data[4:], x.shape)


def test_int8_version_1_chunks_still_decode_and_resume_in_their_own_layout(tmp_path):
    """Arrays created before version 2 name no configuration: they decode as version 1, and a job resuming one
    writes version-1 chunks into it (an array's codec is fixed when it is created)."""
    from storage.codecs import Int8RowCodec

    x = _features(rows=64, dim=24)
    data, expected = _int8_v1_chunk(x)
    np.testing.assert_allclose(decode_int8(data, x.shape, version=1), expected, rtol=0, atol=2e-4 * np.abs(x).max())
    assert Int8RowCodec.from_dict({"name": "amoe.int8"}).version == 1
    assert Int8RowCodec.from_dict({"name": "amoe.int8", "configuration": {"version": 2}}) == Int8RowCodec(2, 16)
    fine = {"name": "amoe.int8", "configuration": {"version": 2, "steps_per_rms": 0}}
    assert Int8RowCodec.from_dict(fine) == Int8RowCodec(2, 0) and Int8RowCodec(2, 0).to_dict() == fine
    for config in ({"version": 3}, {"scale": "chunk"}, {"version": 2, "steps_per_rms": -1},
                   {"version": 2, "steps_per_rms": "16"}):  # a later version is refused, not decoded as this one
        with pytest.raises(ValueError, match="not one this version reads"):
            Int8RowCodec.from_dict({"name": "amoe.int8", "configuration": config})
    group = zarr.open_group(str(tmp_path / "g"), mode="w")
    old = create_array(group, "old", shape=(128, 24), chunks=(64, 24), fill_value=0,
                       **{**feature_array_options("int8"), "serializer": Int8RowCodec(version=1)})
    old[:64] = x
    reopened = zarr.open_array(str(tmp_path / "g" / "old"), mode="r+")  # what a resumed job opens
    assert reopened.metadata.to_dict()["codecs"][0] == {"name": "amoe.int8"}
    reopened[64:] = x
    chunk = (tmp_path / "g" / "old" / "c" / "1" / "0").read_bytes()
    assert len(chunk) > 0
    np.testing.assert_allclose(reopened[64:], expected, rtol=0, atol=2e-4 * np.abs(x).max())
    new = create_array(group, "new", shape=(64, 24), chunks=(64, 24), fill_value=0, **feature_array_options("int8"))
    assert new.metadata.to_dict()["codecs"][0] == {"name": "amoe.int8", "configuration": {"version": 2,
                                                                                         "steps_per_rms": 16}}
    # what a writer measures is what its array keeps: the version-1 array's own round trip, not version 2's
    measured = fidelity("int8", x, 64, reopened.serializer)
    np.testing.assert_allclose(measured["cosine_min"], _cosines(reopened[64:], x).min(), atol=1e-6)
    assert fidelity("int8", x, 64)["cosine_min"] != pytest.approx(measured["cosine_min"], abs=1e-7)


def test_int8_one_outlier_row_does_not_cost_the_other_rows_of_its_chunk():
    """A high-norm row (a ViT's outlier token) in a chunk: centred on the chunk's mean, every other row would carry
    its shift (min cosine 0.979 at D = 16 when measured); the median centre leaves them at the precision of a chunk
    without the outlier (a step of 1/16 of the row's RMS: cosine ≈ 1 − 1/(2·12·16²)), and the outlier row keeps its
    own."""
    rng = np.random.default_rng(0)
    for d in (16, 384):
        x = rng.standard_normal((64, d)).astype(np.float32)
        x[3, 0] = 1e4
        cos = _cosines(decode_int8(encode_int8(x), x.shape), x)
        assert np.delete(cos, 3).min() > 0.9995 and cos[3] > 0.9995, (d, np.delete(cos, 3).min(), cos[3])


def test_int8_a_spike_row_keeps_its_other_channels():
    """A token with one channel 1000x its others (a ViT's massive activation): the DCT spreads the spike over
    the row, so a step of 1/16 of the row's RMS would be 5.6x coarser than max/127 and its other channels would
    fall to a cosine of 0.77 (measured in review); the spike rule keeps them where version 1 had them (0.986)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 384)).astype(np.float32)
    x[9, 7] = 1000.0
    got = decode_int8(encode_int8(x), x.shape)
    rest = np.delete(np.arange(384), 7)
    assert _cosines(got[9:10, rest], x[9:10, rest])[0] > 0.98
    assert _cosines(np.delete(got, 9, 0), np.delete(x, 9, 0)).min() > 0.9995  # the other rows keep the coarse step


def test_int8_channel_scale_keeps_both_the_rows_and_a_quiet_channels_precision():
    """One channel 100x louder than the rest (ViT features have such channels): equal steps for every channel cost
    the quiet channels (whitened cosine), steps proportional to each channel's spread cost the rows whose loud
    channel is near its centre (cosine centred on the mean, what PHI-S and so the loss see); the square-root
    channel scale keeps both above 0.998 (measured on a ViT's features: README "Feature codecs")."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((256, 384)).astype(np.float32) * np.linspace(0.5, 2.0, 384).astype(np.float32)
    x[:, 5] *= 100.0
    got = decode_int8(encode_int8(x), x.shape)
    mean, spread = x.mean(axis=0), x.std(axis=0)
    centred = _cosines(got - mean, x - mean)
    whitened = _cosines((got - mean) / spread, (x - mean) / spread)
    assert centred.min() > 0.998 and whitened.min() > 0.998, (centred.min(), whitened.min())
    assert centred.mean() > 0.9998 and whitened.mean() > 0.9997, (centred.mean(), whitened.mean())


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


def test_int8_is_under_half_of_float16s_bytes_and_refuses_other_dtypes(tmp_path):
    """Blosc's bytes of dense rows (a ViT's: no zeros) and of ReLU rows (a CNN's: mostly zeros) at the store's
    defaults (rows of 384 in chunks of 256): int8 under half of float16's, each as the store compresses them."""
    from numcodecs import Blosc

    from storage.codecs import int8_chunk_bytes

    group = zarr.open_group(str(tmp_path / "g"), mode="w")
    opts = feature_array_options("int8")
    with pytest.raises(ValueError, match="encodes float32"):
        create_array(group, "bad", shape=(8, 4), chunks=(8, 4), **{**opts, "dtype": "float16"})
    with pytest.raises(ValueError, match="unknown feature codec"):
        feature_array_options("int4")
    assert len(encode_int8(np.ones((256, 384), np.float32))) == int8_chunk_bytes(256, 384) == 4 + 8 * 384 + 256 * (4 + 384)
    rng = np.random.default_rng(3)
    dense = (rng.standard_normal((4, 256, 384)) * np.linspace(0.2, 3.0, 384) + rng.standard_normal(384)).astype(np.float32)
    for name, rows in {"dense": dense, "relu": np.stack([_relu_rows(256, 384, seed) for seed in range(4)])}.items():
        half = Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE, typesize=2)
        plain = Blosc(cname="zstd", clevel=3, shuffle=Blosc.NOSHUFFLE)
        f16 = sum(len(half.encode(chunk.astype(np.float16))) for chunk in rows)
        int8 = sum(len(plain.encode(np.frombuffer(encode_int8(chunk), np.uint8))) for chunk in rows)
        assert int8 / f16 < 0.5, (name, int8 / f16)

