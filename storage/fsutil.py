"""Small fsspec helpers: the store may live on any filesystem (local path or URL)."""

from __future__ import annotations

import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["atomic_write", "du", "filesystem", "is_local", "join", "local_or_url", "zarr_options"]


def is_local(url: str) -> bool:
    """A path or ``file://`` URL (anything else is an fsspec URL: ``s3://``, ``gs://``, ``memory://``)."""
    return "://" not in str(url) or str(url).startswith("file://")


def local_or_url(url: str) -> str:
    """``url`` without a trailing slash, a ``file://`` URL as its plain path (what zarr and open() take)."""
    url = str(url).rstrip("/")
    return url[len("file://"):] if url.startswith("file://") else url


def _options(url: str) -> dict:
    # Listings must be fresh: other processes (Ray workers, a second command) add commit markers and
    # staged units that a cached listing of this process would not show.
    return {} if is_local(url) else {"use_listings_cache": False}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` and the path inside it. Credentials and endpoint of an object store
    come from its library's standard environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...)."""
    fs, path = fsspec.core.url_to_fs(str(url), **_options(url))
    return fs, path.rstrip("/")


def zarr_options(url: str) -> dict:
    """Keyword arguments for ``zarr.open_group``/``create_group`` of ``url``: the same filesystem options."""
    return {} if is_local(url) else {"storage_options": _options(url)}


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
