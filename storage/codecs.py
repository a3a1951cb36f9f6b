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

``amoe.int8``: per chunk, the rows along the last axis (one token or one image's vector each) are
centred on a per-channel centre μ of the chunk (the writer uses the median of its non-zero rows: an
outlier row does not move it), rotated by the orthonormal DCT-II C along the channels, and each row
quantized to int8 with its own scale s (AMoE/PHI-S motivation: after a rotation that spreads every
channel's energy over all channels, one scale per row suits them):

    y = C (x − μ),   q = round(y / s),   x̂ = Cᵀ (q · s) + μ

The writer picks s = max|y|/127 (nothing is clipped); decoding does not depend on how s was chosen.
(A coarser rule, s = max(max|y|/127, rms(y)/16), saves 1.3 bits a value on isotropic rows but was
measured to cost rows of anisotropic features, where one massive channel, spread by the DCT, sets the
RMS: a whitened cosine of 0.94 at the worst row with one channel 100× the others; not used.)

Why not PHI-S itself (whose rotation is the Hadamard): its mean and PCA basis are estimated from the
stored targets after the job, so they do not exist when a unit is written. The codec keeps PHI-S's
two data-free steps, centring (on the chunk's own centre, stored in the chunk) and a rotation that
spreads outlier channels, and needs nothing outside the chunk to decode. The DCT-II is defined for
every width (Hadamard is not) and is one library call in any language.

A row that is exactly zero (a failed image's, or zarr's padding of the array's last chunk) is stored
with the scale −1 and decodes to exact zeros; μ is the median of the chunk's other rows.

Chunk bytes (little-endian): μ float32 [D], then s float32 [m], then q int8 [m, D], for a chunk of
m rows of width D (m = the product of the chunk's leading axes).

Both codecs encode whole chunks; the store's writers only ever write whole chunks (units own whole
shards, ``storage.shards``). A partial write of an ``amoe.int8`` chunk would re-quantize its other
rows with a new mean and is not something the store does.
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
           "feature_array_options", "fidelity", "merge_fidelity", "round_trip", "summarize_fidelity"]

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


def encode_int8(x: np.ndarray) -> bytes:
    """float32 [..., D] → the chunk bytes of ``amoe.int8`` (module docstring)."""
    d = x.shape[-1]
    rows = np.asarray(x, np.float32).reshape(-1, d)
    zero = ~rows.any(axis=1)
    kept = rows[~zero]
    # the centre: the per-channel median, not the mean, so that one outlier row (a ViT's high-norm token) does not
    # shift every other row of the chunk far from its own values (the decoder adds back whatever centre is stored)
    mean = (np.median(kept, axis=0) if len(kept) else np.zeros(d)).astype(np.float32)
    y = fft.dct(rows - mean, type=2, norm="ortho", axis=-1)
    scale = (np.abs(y).max(axis=-1) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(y / safe[:, None]), -127, 127).astype(np.int8)
    q[zero], scale[zero] = 0, -1.0
    return mean.astype("<f4").tobytes() + scale.astype("<f4").tobytes() + q.tobytes()


def decode_int8(data: bytes | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    d = shape[-1]
    m = int(np.prod(shape[:-1], dtype=np.int64))
    raw = np.frombuffer(data, np.uint8)
    expected = 4 * d + 4 * m + m * d
    if raw.size != expected:
        raise ValueError(f"amoe.int8 chunk of shape {shape} must hold {expected} bytes, got {raw.size}")
    mean = raw[: 4 * d].view("<f4")
    scale = raw[4 * d: 4 * d + 4 * m].view("<f4")
    q = raw[4 * d + 4 * m:].view(np.int8).reshape(m, d)
    y = q.astype(np.float32) * np.maximum(scale, 0)[:, None]
    x = (fft.idct(y, type=2, norm="ortho", axis=-1) + mean).astype(np.float32)
    x[scale < 0] = 0.0
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
    """``amoe.int8``: centred, DCT-rotated rows with one int8 scale each (module docstring)."""

    codec_name = INT8

    def _encode_array(self, values: np.ndarray) -> np.ndarray:
        return np.frombuffer(encode_int8(values), np.uint8)

    def _decode_array(self, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return decode_int8(raw, shape)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: "ArraySpec") -> int:
        d = int(chunk_spec.shape[-1])
        m = input_byte_length // 4 // d
        return 4 * d + 4 * m + m * d


CODECS = {BFLOAT16: BFloat16Codec, INT8: Int8RowCodec}
for _name, _cls in CODECS.items():
    register_codec(_name, _cls)


# --------------------------------------------------------------------------- the store's feature arrays

def feature_array_options(codec: str) -> dict:
    """``create_array`` keywords of a teacher feature array stored with ``codec`` (a FEATURE_CODECS name).

    Blosc+zstd with byte shuffle over the stored words' size: shuffling groups the high bytes of 16/32-bit
    floats, which compress well; int8 words have nothing to shuffle.
    """
    from zarr.codecs import BloscCodec, BloscShuffle

    if codec in ("float16", "float32"):
        return {"dtype": codec, "compressor": BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle,
                                                         typesize=np.dtype(codec).itemsize)}
    if codec == "bfloat16":
        return {"dtype": "float32", "serializer": BFloat16Codec(),
                "compressor": BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle, typesize=2)}
    if codec == "int8":
        return {"dtype": "float32", "serializer": Int8RowCodec(),
                "compressor": BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.noshuffle, typesize=1)}
    raise ValueError(f"unknown feature codec {codec!r}; expected one of {', '.join(FEATURE_CODECS)}")


def as_stored(codec: str, chunk: np.ndarray) -> np.ndarray:
    """float32 values of ``chunk`` (one whole zarr chunk) as a read of a store with ``codec`` returns them."""
    chunk = np.asarray(chunk, np.float32)
    if codec == "float32":
        return chunk
    if codec == "float16":
        return chunk.astype(np.float16).astype(np.float32)
    return round_trip({"bfloat16": BFLOAT16, "int8": INT8}[codec], chunk)


STORED_DTYPE = {"float16": "float16", "float32": "float32", "bfloat16": "float32", "int8": "float32"}
WORD_BYTES = {"float16": 2, "float32": 4, "bfloat16": 2, "int8": 1}  # bytes a value takes before compression
_SUMS = ("cosine", "centred")  # cosine to the values, and to the values centred on their chunk's mean


def fidelity(codec: str, values: np.ndarray, chunk_rows: int) -> dict:
    """What a store with ``codec`` keeps of ``values``: per stored vector (last axis), its cosine to the value
    written, and the same cosine with both centred on the chunk's mean (non-zero rows). PHI-S rotates and
    scales isotropically, so the distillation loss sees the cosine of vectors centred on the global mean;
    the chunk's mean is the writer's stand-in for it, and the raw cosine alone hides errors under a large
    shared mean. ``values`` are cut into the array's chunks of ``chunk_rows`` along axis 0 (the rows start
    on a chunk boundary and end on one or at the array's end, as a unit's do).

    Returns ``{"rows", "cosine_sum", "cosine_min", "centred_sum", "centred_min"}`` over the non-zero vectors
    (a failed image's are zero); a NaN cosine counts as −1.
    """
    values = np.asarray(values, np.float32)
    d = values.shape[-1]
    out = {"rows": 0, **{f"{k}_sum": 0.0 for k in _SUMS}, **{f"{k}_min": 1.0 for k in _SUMS}}
    for start in range(0, len(values), max(int(chunk_rows), 1)):
        block = values[start: start + chunk_rows]
        got = as_stored(codec, _padded(block, chunk_rows))[: len(block)].reshape(-1, d).astype(np.float64)
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
