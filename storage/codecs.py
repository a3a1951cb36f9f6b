"""Teacher-feature codecs beyond float16, as registered zarr v3 codecs that decode to float32.

An array written with one of these has data type float32 and the codec as its serializer (the
array-to-bytes step), followed by Blosc and crc32c like every feature array. Plain zarr reads it
as float32 once the codec is registered: the project registers them under zarr's ``zarr.codecs``
entry points (pyproject.toml), so any Python process with the project installed needs no import,
and importing this module (``storage.store`` does) registers them too. Every name below is part of the store contract
(docs/store-format.md): a reader in another language implements the decoding described there.

``amoe.bfloat16``: each float32 value rounded to nearest-even on its upper 16 bits (bfloat16's bit
pattern), stored as little-endian 16-bit words. Decoding shifts the word back into the upper half of
a float32. Same bytes as float16, float32's range, 8 bits of mantissa instead of 11.

``amoe.int8`` (version 2, what writers write; configuration ``{"version": 2, "steps_per_rms": n}``, n the
writer's step rule below, which decoding ignores): per chunk, the rows along
the last axis (one token or one image's vector each) are quantized to int8 with one step s per row after one
of two transforms, chosen per chunk and recorded in it:

    dense chunk (transform 1):   z = (x − μ) / a,  y = C z,  q = round(y / s),  x̂ = a ⊙ Cᵀ(q · s) + μ
    sparse chunk (transform 0):  y = x,                     q = round(y / s),  x̂ = q · s

μ is a per-channel centre of the chunk (the writer takes the median of its non-zero rows, so an outlier row
does not move it), a a per-channel scale and C the orthonormal DCT-II along the channels. The DCT spreads
an outlier channel's energy over all channels so that one step per row suits every channel (the reason
PHI-S rotates by a Hadamard matrix: AMoE's "Teacher-loss balancing via PHI-S" paragraph). The writer's
choices (decoding depends on none):

- the step: ``s = max(max|y|/127, rms(y)/n)``, rms over the row's values that are not exact zeros, n = 16 for
  token arrays (patches, layers). Nothing is clipped; on a typical row the step is 1/16 of the RMS (a cosine
  of about 1 − 1/(2·12·16²) ≈ 0.9998 to the written row), and q spans about ±50 instead of ±127, which is
  what brings a chunk under half of float16's bytes after Blosc. Two kinds of rows keep the finest step,
  max|y|/127: those of per-image arrays (summary, registers: n = 0; under 1% of a teacher's bytes, and the
  summary is what a student's CLS is distilled from), and a dense row whose largest |z| exceeds 8× its RMS (a
  ViT's high-norm token: the DCT spreads its spike over every coefficient, so rms(y)/16 would cost its
  other channels 5.6× coarser steps: their cosine fell from 0.986 to 0.77 at a spike 1000× the rest).
- the channel scale: ``a_c = √(σ_c / min σ)``, σ_c a robust spread of channel c over the chunk's non-zero
  rows (1.4826 × its median absolute deviation from μ: an outlier row moves it no more than it moves μ; the
  RMS deviation where that is 0; a = 1 for a channel that is constant over the chunk), the ratio capped at
  10⁶. Steps uniform across channels (a = 1) keep the
  error small relative to the row (what PHI-S's isotropic space, and so the loss, sees) but cost a channel
  100× quieter than another its own precision (a whitened cosine of 0.956 at the worst row of a ViT's
  features with one channel scaled 100×); steps proportional to each channel's spread (a = σ) do the reverse
  (a centred cosine of 0.922). The square root splits the difference: ≥ 0.996 on both measures there.
- the transform: a chunk whose non-zero rows are more than half exact zeros (ReLU features:
  EfficientNet-Lite's are 94% zeros) is stored sparse, untransformed, so its zeros stay zero bytes that
  Blosc removes; centring and the DCT would turn them into noise (version 1 stored Lite0 at 3× float16).

A row that is exactly zero (a failed image's, or zarr's padding of the array's last chunk) is stored
with the step −1 and decodes to exact zeros; μ and a come from the chunk's other rows.

Chunk bytes (little-endian), for a chunk of m rows of width D (m = the product of the chunk's leading axes):
transform uint32, μ float32 [D], a float32 [D], s float32 [m], q int8 [m, D].

Version 1 (no configuration; arrays created before version 2, still read and, when a job resumes
one, still written): always dense with a = 1, s = max|y|/127, and the bytes μ float32 [D], s float32 [m],
q int8 [m, D]. A codec of a version this module does not know is refused rather than decoded as another.

Why not PHI-S itself (whose rotation is the Hadamard): its mean and PCA basis are estimated from the
stored targets after the job, so they do not exist when a unit is written. The codec keeps PHI-S's
two data-free steps, centring (on the chunk's own centre, stored in the chunk) and a rotation that
spreads outlier channels, and needs nothing outside the chunk to decode. The DCT-II is defined for
every width (Hadamard is not) and is one library call in any language.

Both codecs encode whole chunks; the store's writers only ever write whole chunks (units own whole
shards, ``storage.shards``). A partial write of an ``amoe.int8`` chunk would re-quantize its other
rows with a new centre and is not something the store does.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import fft
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.registry import register_codec

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec

__all__ = ["BFLOAT16", "CODECS", "FEATURE_CODECS", "INT8", "BFloat16Codec", "Int8RowCodec", "as_stored",
           "STORED_DTYPE", "WORD_BYTES", "decode_bfloat16", "decode_int8", "encode_bfloat16", "encode_int8",
           "feature_array_options", "fidelity", "int8_chunk_bytes", "INT8_VERSION", "merge_fidelity", "round_trip", "summarize_fidelity"]

BFLOAT16 = "amoe.bfloat16"
INT8 = "amoe.int8"
FEATURE_CODECS = ("float16", "float32", "bfloat16", "int8")  # the --codec choices; the first two are plain dtypes
BFLOAT16_MAX = float(np.frombuffer(np.uint32(0x7F7F0000).tobytes(), np.float32)[0])  # largest finite bfloat16


# --------------------------------------------------------------------------- pure numpy (the definition)

def encode_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 → uint16 bfloat16 words, round to nearest, ties to even; NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(x, dtype="<f4").view("<u4")
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    words = (rounded >> np.uint32(16)).astype("<u2")
    nan = np.isnan(np.asarray(x, np.float32))
    if nan.any():  # rounding a NaN's payload could carry into the sign bit and give ±0
        words[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype("<u2")
    return words


def decode_bfloat16(words: np.ndarray) -> np.ndarray:
    return (np.asarray(words, dtype="<u2").astype("<u4") << np.uint32(16)).view("<f4")


INT8_VERSION = 2  # the amoe.int8 layout writers write (module docstring); 1 is read only
STEP_PER_RMS = 16  # the int8 step of token rows is at most 1/16 of the row's RMS (module docstring)
SPIKE = 8.0  # a dense row whose largest centred, scaled value exceeds 8x its RMS keeps the finest step
SPARSE_ZEROS = 0.5  # a chunk whose non-zero rows are more than this share exact zeros is stored untransformed
MAX_SPREAD_RATIO = 1e6  # between the chunk's loudest and quietest channel, for the channel scale


def encode_int8(x: np.ndarray, version: int = INT8_VERSION, steps_per_rms: int = STEP_PER_RMS) -> bytes:
    """float32 [..., D] → the chunk bytes of ``amoe.int8`` (module docstring); version 1 only to resume a
    store begun with it (an array's codec is fixed when it is created). ``steps_per_rms`` 0: every row gets
    the finest step, max|y|/127."""
    if version == 1:
        return _encode_int8_v1(x)
    d = x.shape[-1]
    rows = np.asarray(x, np.float32).reshape(-1, d)
    zero = ~rows.any(axis=1)
    kept = rows[~zero].astype(np.float64)
    sparse = kept.size > 0 and float((kept == 0).mean()) > SPARSE_ZEROS
    centre, scale = np.zeros(d, np.float32), np.ones(d, np.float32)
    if sparse:
        y = rows.astype(np.float64)
    else:
        if len(kept):
            centre = np.median(kept, axis=0).astype(np.float32)
            scale = _channel_scale(kept - centre)
        z = (rows.astype(np.float64) - centre) / scale
        y = fft.dct(z, type=2, norm="ortho", axis=-1)
    nonzero = np.maximum((y != 0).sum(axis=-1), 1)
    rms = np.sqrt((y * y).sum(axis=-1) / nonzero)  # over the values that are not exact zeros (a sparse row's)
    finest = np.abs(y).max(axis=-1) / 127.0
    coarse = rms / steps_per_rms if steps_per_rms else finest
    if not sparse:  # a spike (a ViT's massive activation): the DCT spreads it over the row and would set the RMS
        coarse = np.where(np.abs(z).max(axis=-1) > SPIKE * np.sqrt((z * z).mean(axis=-1)), finest, coarse)
    step = np.maximum(finest, coarse).astype(np.float32)
    safe = np.where(step > 0, step, 1.0).astype(np.float64)
    q = np.clip(np.rint(y / safe[:, None]), -127, 127).astype(np.int8)
    q[zero], step[zero] = 0, -1.0
    return (np.uint32(0 if sparse else 1).astype("<u4").tobytes() + centre.astype("<f4").tobytes()
            + scale.astype("<f4").tobytes() + step.astype("<f4").tobytes() + q.tobytes())


def _encode_int8_v1(x: np.ndarray) -> bytes:
    d = x.shape[-1]
    rows = np.asarray(x, np.float32).reshape(-1, d)
    zero = ~rows.any(axis=1)
    kept = rows[~zero]
    centre = (np.median(kept, axis=0) if len(kept) else np.zeros(d)).astype(np.float32)
    y = fft.dct(rows - centre, type=2, norm="ortho", axis=-1)
    step = (np.abs(y).max(axis=-1) / 127.0).astype(np.float32)
    safe = np.where(step > 0, step, 1.0).astype(np.float32)
    q = np.clip(np.rint(y / safe[:, None]), -127, 127).astype(np.int8)
    q[zero], step[zero] = 0, -1.0
    return centre.astype("<f4").tobytes() + step.astype("<f4").tobytes() + q.tobytes()


def _channel_scale(deviations: np.ndarray) -> np.ndarray:
    """a_c = √(σ_c / min σ) (module docstring), σ_c a robust spread of channel c: 1.4826 × the median absolute
    deviation (an outlier row does not move it, as it does not move the median), the RMS deviation where more
    than half the values sit on the centre; 1 for a constant channel."""
    spread = 1.4826 * np.median(np.abs(deviations), axis=0)
    flat = spread == 0
    spread[flat] = np.sqrt((deviations[:, flat] ** 2).mean(axis=0))
    varying = spread > 0
    if not varying.any():
        return np.ones(deviations.shape[-1], np.float32)
    floor = max(float(spread[varying].min()), float(spread.max()) / MAX_SPREAD_RATIO)
    return np.sqrt(np.maximum(spread, floor) / floor).astype(np.float32)


def int8_chunk_bytes(rows: int, width: int, version: int = INT8_VERSION) -> int:
    """Bytes of an ``amoe.int8`` chunk of ``rows`` rows of ``width`` before compression."""
    header = 4 * width if version == 1 else 4 + 8 * width
    return header + 4 * rows + rows * width


def decode_int8(data: bytes | np.ndarray, shape: tuple[int, ...], version: int = INT8_VERSION) -> np.ndarray:
    d = shape[-1]
    m = int(np.prod(shape[:-1], dtype=np.int64))
    raw = np.frombuffer(data, np.uint8)
    expected = int8_chunk_bytes(m, d, version)
    if raw.size != expected:
        raise ValueError(f"amoe.int8 version {version} chunk of shape {shape} must hold {expected} bytes, got {raw.size}")
    if version == 1:
        transform, at = 1, 0
        scale = np.ones(d, np.float32)
    else:
        transform, at = int(raw[:4].view("<u4")[0]), 4
        if transform not in (0, 1):
            raise ValueError(f"amoe.int8 chunk names transform {transform}; only 0 (none) and 1 (DCT-II) exist")
    centre = raw[at: at + 4 * d].view("<f4")
    at += 4 * d
    if version != 1:
        scale = raw[at: at + 4 * d].view("<f4")
        at += 4 * d
    step = raw[at: at + 4 * m].view("<f4")
    q = raw[at + 4 * m:].view(np.int8).reshape(m, d)
    y = q.astype(np.float32) * np.maximum(step, 0)[:, None]
    x = (fft.idct(y, type=2, norm="ortho", axis=-1) if transform else y) * scale + centre
    x = x.astype(np.float32)
    x[step < 0] = 0.0
    return x.reshape(shape)


def round_trip(codec: str, x: np.ndarray) -> np.ndarray:
    """What a store with ``codec`` returns for ``x`` written as one chunk (float32)."""
    x = np.asarray(x, np.float32)
    if codec == BFLOAT16:
        return decode_bfloat16(encode_bfloat16(x)).reshape(x.shape)
    if codec == INT8:
        return decode_int8(encode_int8(x), x.shape)
    raise ValueError(f"unknown codec {codec!r}")


# --------------------------------------------------------------------------- zarr codecs

class _FloatRowCodec(ArrayBytesCodec):
    """Shared zarr plumbing: float32 arrays only, no configuration; the encoded size is a function of the
    chunk's shape (``compute_encoded_size``)."""

    is_fixed_size = True
    codec_name = ""

    @classmethod
    def from_dict(cls, data: dict) -> "_FloatRowCodec":
        if data.get("name") != cls.codec_name:
            raise ValueError(f"expected codec {cls.codec_name!r}, got {data.get('name')!r}")
        if data.get("configuration"):  # a later version with parameters must not be decoded as this one
            raise ValueError(f"codec {cls.codec_name} has no configuration; got {data['configuration']!r}")
        return cls()

    def to_dict(self) -> dict:
        return {"name": self.codec_name}

    def validate(self, *, shape, dtype, chunk_grid) -> None:
        if dtype.to_native_dtype() != np.dtype(np.float32):
            raise ValueError(f"codec {self.codec_name} encodes float32 arrays, not {dtype}")

    def _encode_array(self, values: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _decode_array(self, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: "ArraySpec") -> Buffer | None:
        encoded = self._encode_array(np.asarray(chunk_array.as_numpy_array(), np.float32))
        return chunk_spec.prototype.buffer.from_array_like(encoded.view(np.uint8).ravel())

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: "ArraySpec") -> NDBuffer:
        values = self._decode_array(chunk_bytes.as_numpy_array().view(np.uint8), tuple(chunk_spec.shape))
        return chunk_spec.prototype.nd_buffer.from_numpy_array(values)

    # in threads, as zarr's Blosc and Zstd do: the chunks of one selection decode in parallel (numpy and
    # scipy release the GIL) instead of one after another on zarr's event loop
    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: "ArraySpec") -> Buffer | None:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: "ArraySpec") -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)


@dataclass(frozen=True)
class BFloat16Codec(_FloatRowCodec):
    """``amoe.bfloat16``: float32 stored as bfloat16 words (2 bytes a value)."""

    codec_name = BFLOAT16

    def _encode_array(self, values: np.ndarray) -> np.ndarray:
        return encode_bfloat16(values)

    def _decode_array(self, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        expected = 2 * int(np.prod(shape, dtype=np.int64))
        if raw.size != expected:
            raise ValueError(f"amoe.bfloat16 chunk of shape {shape} must hold {expected} bytes, got {raw.size}")
        return decode_bfloat16(raw.view("<u2")).reshape(shape)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: "ArraySpec") -> int:
        return input_byte_length // 2


@dataclass(frozen=True)
class Int8RowCodec(_FloatRowCodec):
    """``amoe.int8``: rows quantized to int8 with one step each (module docstring); ``version`` is the chunk
    layout, named in the array's metadata (none for version 1)."""

    codec_name = INT8
    version: int = INT8_VERSION
    steps_per_rms: int = STEP_PER_RMS  # the writer's step rule (module docstring); decoding ignores it

    @classmethod
    def from_dict(cls, data: dict) -> "Int8RowCodec":
        if data.get("name") != INT8:
            raise ValueError(f"expected codec {INT8!r}, got {data.get('name')!r}")
        config = dict(data.get("configuration") or {})
        if not config:
            return cls(version=1)
        steps = config.pop("steps_per_rms", STEP_PER_RMS)
        if config != {"version": INT8_VERSION} or not isinstance(steps, int) or steps < 0:
            # a later version must not be decoded as this one
            raise ValueError(f"codec {INT8} configuration {data.get('configuration')!r} is not one this version "
                             f"reads (none, or {{'version': {INT8_VERSION}, 'steps_per_rms': n >= 0}}); upgrade the "
                             "project")
        return cls(version=INT8_VERSION, steps_per_rms=steps)

    def to_dict(self) -> dict:
        if self.version == 1:
            return {"name": INT8}
        return {"name": INT8, "configuration": {"version": self.version, "steps_per_rms": self.steps_per_rms}}

    def encode_chunk(self, values: np.ndarray) -> bytes:
        """One whole chunk's bytes, as this array's codec writes them."""
        return encode_int8(values, self.version, self.steps_per_rms)

    def _encode_array(self, values: np.ndarray) -> np.ndarray:
        return np.frombuffer(self.encode_chunk(values), np.uint8)

    def _decode_array(self, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return decode_int8(raw, shape, self.version)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: "ArraySpec") -> int:
        d = int(chunk_spec.shape[-1])
        return int8_chunk_bytes(input_byte_length // 4 // d, d, self.version)


CODECS = {BFLOAT16: BFloat16Codec, INT8: Int8RowCodec}
for _name, _cls in CODECS.items():
    register_codec(_name, _cls)


# --------------------------------------------------------------------------- the store's feature arrays

def feature_array_options(codec: str, per_image: bool = False) -> dict:
    """``create_array`` keywords of a teacher feature array stored with ``codec`` (a FEATURE_CODECS name).

    Blosc+zstd with byte shuffle over the stored words' size: shuffling groups the high bytes of 16/32-bit
    floats, which compress well; int8 words have nothing to shuffle. ``per_image`` (summary, registers: one
    row an image, under 1% of a teacher's bytes): int8 writes them with the finest step, max|y|/127.
    """
    from zarr.codecs import BloscCodec, BloscShuffle

    if codec in ("float16", "float32"):
        return {"dtype": codec, "compressor": BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle,
                                                         typesize=np.dtype(codec).itemsize)}
    if codec == "bfloat16":
        return {"dtype": "float32", "serializer": BFloat16Codec(),
                "compressor": BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle, typesize=2)}
    if codec == "int8":
        return {"dtype": "float32", "serializer": Int8RowCodec(steps_per_rms=0 if per_image else STEP_PER_RMS),
                "compressor": BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.noshuffle, typesize=1)}
    raise ValueError(f"unknown feature codec {codec!r}; expected one of {', '.join(FEATURE_CODECS)}")


def as_stored(codec: str, chunk: np.ndarray, serializer: ArrayBytesCodec | None = None) -> np.ndarray:
    """float32 values of ``chunk`` (one whole zarr chunk) as a read of a store with ``codec`` returns them;
    ``serializer``: the array's own codec where it has one (an int8 array's version and step rule)."""
    chunk = np.asarray(chunk, np.float32)
    if isinstance(serializer, Int8RowCodec):
        return decode_int8(serializer.encode_chunk(chunk), chunk.shape, serializer.version)
    if codec == "float32":
        return chunk
    if codec == "float16":
        return chunk.astype(np.float16).astype(np.float32)
    return round_trip({"bfloat16": BFLOAT16, "int8": INT8}[codec], chunk)


STORED_DTYPE = {"float16": "float16", "float32": "float32", "bfloat16": "float32", "int8": "float32"}
WORD_BYTES = {"float16": 2, "float32": 4, "bfloat16": 2, "int8": 1}  # bytes a value takes before compression
_SUMS = ("cosine", "centred")  # cosine to the values, and to the values centred on their chunk's mean


def fidelity(codec: str, values: np.ndarray, chunk_rows: int, serializer: ArrayBytesCodec | None = None) -> dict:
    """What a store with ``codec`` keeps of ``values``: per stored vector (last axis), its cosine to the value
    written, and the same cosine with both centred on the chunk's mean (non-zero rows). PHI-S rotates and
    scales isotropically, so the distillation loss sees the cosine of vectors centred on the global mean;
    the chunk's mean is the writer's stand-in for it, and the raw cosine alone hides errors under a large
    shared mean. ``values`` are cut into the array's chunks of ``chunk_rows`` along axis 0 (the rows start
    on a chunk boundary and end on one or at the array's end, as a unit's do).

    Returns ``{"rows", "cosine_sum", "cosine_min", "centred_sum", "centred_min"}`` over the non-zero vectors
    (a failed image's are zero); a NaN cosine counts as −1. ``serializer``: see :func:`as_stored`.
    """
    values = np.asarray(values, np.float32)
    d = values.shape[-1]
    out = {"rows": 0, **{f"{k}_sum": 0.0 for k in _SUMS}, **{f"{k}_min": 1.0 for k in _SUMS}}
    for start in range(0, len(values), max(int(chunk_rows), 1)):
        block = values[start: start + chunk_rows]
        got = as_stored(codec, _padded(block, chunk_rows), serializer)[: len(block)].reshape(-1, d).astype(np.float64)
        want = block.reshape(-1, d).astype(np.float64)
        keep = np.linalg.norm(want, axis=1) > 0
        if not keep.any():
            continue
        got, want = got[keep], want[keep]
        mean = want.mean(axis=0)
        out["rows"] += int(keep.sum())
        for key, (a, b) in {"cosine": (got, want), "centred": (got - mean, want - mean)}.items():
            cos = np.nan_to_num(_row_cosines(a, b), nan=-1.0)
            out[f"{key}_sum"] += float(cos.sum())
            out[f"{key}_min"] = min(out[f"{key}_min"], float(cos.min()))
    return out


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)  # a row equal to the mean
    return np.where(both_zero, 1.0, (a * b).sum(axis=1) / np.where(norms > 0, norms, np.inf))


def _padded(block: np.ndarray, rows: int) -> np.ndarray:
    """A chunk at the array's end as zarr encodes it: filled up to its full rows with the fill value 0."""
    if len(block) >= rows:
        return block
    return np.concatenate([block, np.zeros((rows - len(block), *block.shape[1:]), block.dtype)])


def merge_fidelity(a: dict | None, b: dict) -> dict:
    """Two measurements as one (markers written before the centred cosine existed lack its keys)."""
    if not a:
        return dict(b)
    out = {"rows": a["rows"] + b["rows"]}
    for key in _SUMS:
        if f"{key}_sum" in a and f"{key}_sum" in b:
            out[f"{key}_sum"] = a[f"{key}_sum"] + b[f"{key}_sum"]
            out[f"{key}_min"] = min(a[f"{key}_min"], b[f"{key}_min"])
    return out


def summarize_fidelity(measured: dict) -> dict:
    """The ``codec_fidelity`` entry of one feature: mean and worst cosines over its measured rows."""
    rows = max(measured["rows"], 1)
    out = {"rows": measured["rows"]}
    for key, name in (("cosine", "cosine"), ("centred", "centred_cosine")):
        if f"{key}_sum" in measured:
            out[f"mean_{name}"] = measured[f"{key}_sum"] / rows
            out[f"min_{name}"] = measured[f"{key}_min"]
    return out
