"""How the project creates every Zarr array it writes: checksummed, and with every chunk on disk.

* A crc32c checksum (zarr v3's ``crc32c`` codec) closes every chunk's codec chain, so flipped or
  truncated bytes fail the read with a checksum error instead of being read as data.
* ``write_empty_chunks`` is on, so a chunk that was written exists even when it holds only the fill
  value: a missing chunk (or shard) of a committed unit is damage, never a valid all-zero block
  (``storage.verify`` relies on that). Zarr keeps that setting per process, not in the array's
  metadata, and the writers are other processes (Ray tasks and actors) that reopen the arrays, so
  importing this module turns it on for the whole process; every writer imports it through
  ``storage.store``.
"""

from __future__ import annotations

from typing import Any

import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

__all__ = ["create_array"]

zarr.config.set({"array.write_empty_chunks": True})


def create_array(group: zarr.Group, name: str, *, compressor: Any = "zstd", **kwargs: Any) -> zarr.Array:
    """``group.create_array(name, ...)`` with ``compressor`` (a codec, ``"zstd"`` or None) then crc32c.

    Teacher features take their keywords (dtype, serializer, compressor) from ``storage.codecs``.

    ``overwrite`` defaults to True: callers own the names they create (a rerun recreates its arrays).
    """
    codecs = [] if compressor is None else [ZstdCodec(level=3) if compressor == "zstd" else compressor]
    kwargs.setdefault("overwrite", True)
    return group.create_array(name, compressors=[*codecs, Crc32cCodec()], **kwargs)
