"""Per-image strings (ids, sources, failure reasons) as UTF-8 bytes laid end to end, with offsets.

Zarr-python's ``string`` data type is its own extension, not part of the zarr v3 core specification,
so other implementations (tensorstore) cannot open such arrays. From format version 3 every string
array is stored like the pixels: ``<name>`` [B] uint8, the UTF-8 bytes of all strings concatenated,
and ``<offsets>`` [N+1] int64, string i being bytes ``offsets[i]:offsets[i+1]``. Stores of versions 1
and 2 hold ``<name>`` [N] as zarr strings; ``read_strings`` reads both.
"""

from __future__ import annotations

import numpy as np
import zarr

__all__ = ["decode_strings", "encode_strings", "is_flat", "read_strings"]


def encode_strings(items) -> tuple[np.ndarray, np.ndarray]:
    """(bytes [B] uint8, sizes [N] int64): the UTF-8 encodings of ``items`` end to end and their lengths.

    ``surrogateescape`` keeps a file name that is not valid UTF-8 (its undecodable bytes, as Python
    holds them) round-trippable instead of failing the write."""
    encoded = [str(s).encode("utf-8", "surrogateescape") for s in items]
    sizes = np.fromiter((len(b) for b in encoded), np.int64, len(encoded))
    return np.frombuffer(b"".join(encoded), np.uint8).copy(), sizes


def decode_strings(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    """Strings from their bytes ``data`` and ``offsets`` [n+1] (absolute: ``data`` starts at ``offsets[0]``)."""
    raw, base = np.asarray(data, np.uint8).tobytes(), int(offsets[0])
    return [raw[int(a) - base:int(b) - base].decode("utf-8", "surrogateescape")
            for a, b in zip(offsets[:-1], offsets[1:])]


def is_flat(array: zarr.Array) -> bool:
    """Whether a string array is stored as flat UTF-8 bytes (format version 3) rather than zarr strings."""
    return array.dtype == np.uint8


def read_strings(group: zarr.Group, name: str, offsets_name: str, rows: slice | None = None) -> list[str]:
    """The strings of ``group[name]`` (rows ``rows``, default all) in either layout."""
    array = group[name]
    rows = rows or slice(None)
    if rows.step not in (None, 1):
        raise ValueError(f"{name}: strings are read in contiguous rows, not with step {rows.step}")
    if not is_flat(array):
        return [str(s) for s in array[rows]]
    start, stop, _ = rows.indices(int(group[offsets_name].shape[0]) - 1)
    stop = max(start, stop)
    offsets = group[offsets_name][start:stop + 1]
    if stop == start:
        return []
    return decode_strings(array[int(offsets[0]):int(offsets[-1])], offsets)
