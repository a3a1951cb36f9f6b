"""Fingerprints: canonical JSON digests that say exactly what produced a store or a teacher group."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

__all__ = ["ADDED_FIELDS", "POLICY_FIELDS", "canonical_json", "digest", "digest_strings", "diff", "diff_but_policy",
           "with_added_fields"]

# Fields added to fingerprints after stores existed, with the meaning of their absence: everything
# written before ``compute_dtype`` was computed in float32. Comparisons fill them in on both sides,
# so an old store resumes under the value it was made with and refuses any other.
ADDED_FIELDS: dict[str, Any] = {"compute_dtype": "float32"}


def with_added_fields(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    return {**ADDED_FIELDS, **fingerprint}


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def digest(data: Any) -> str:
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def digest_strings(items: list[str]) -> str:
    """sha256 of a list of strings in order (NUL-separated): the identity of an image list."""
    h = hashlib.sha256()
    for item in items:
        h.update(item.encode())
        h.update(b"\0")
    return h.hexdigest()


def diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two fingerprints (for error messages)."""
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            keys += diff(va, vb, prefix=f"{name}.")
        elif canonical_json(va) != canonical_json(vb):
            keys.append(f"{name}: {va!r} != {vb!r}")
    return keys


# A teacher cached under another image policy (a stage-2 store at a larger --max-tokens), or stored with
# another codec ("dtype": float16, bfloat16, int8, ...), is the same teacher: its targets live in the same
# space, only the images' sizes or the precision on disk differ.
POLICY_FIELDS = ("image_policy", "dtype")


def diff_but_policy(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """``diff`` of two teacher fingerprints, the image policy and codec left out (and missing fields filled in)."""
    def strip(fp: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in with_added_fields(fp).items() if k not in POLICY_FIELDS}
    return diff(strip(a), strip(b))
