"""Small fsspec helpers: the store may live on any filesystem (local path or URL)."""

from __future__ import annotations

import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["atomic_write", "filesystem", "join", "du"]


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path.rstrip("/")


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so readers see the old object or the whole new one, never a torn file.

    Local files go through a temp file + rename; object stores replace whole objects on PUT.
    """
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex}.partial"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def du(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """Bytes stored under ``path`` (0 when absent)."""
    if not fs.exists(path):
        return 0
    return int(fs.du(path, total=True))
