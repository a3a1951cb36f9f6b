"""Teacher SPEC strings: ``library:MODEL[,key=value...]`` (values parsed as int/float/bool/str)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["TeacherSpec", "parse_spec"]

LIBRARIES = ("timm", "open_clip")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class TeacherSpec:
    library: str
    model: str
    kwargs: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        extra = "".join(f",{k}={v}" for k, v in self.kwargs.items())
        return f"{self.library}:{self.model}{extra}"


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null", ""):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> TeacherSpec:
    library, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError(f"teacher SPEC {spec!r} must look like timm:MODEL or open_clip:MODEL")
    if library not in LIBRARIES:
        raise ValueError(f"unknown teacher library {library!r} in {spec!r} (known: {', '.join(LIBRARIES)})")
    model, *pairs = rest.split(",")
    if not model.strip():
        raise ValueError(f"teacher SPEC {spec!r} names no model")
    kwargs = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or not _KEY.match(key):
            raise ValueError(f"bad model override {pair!r} in {spec!r}: expected key=value")
        kwargs[key] = _value(value.strip())
    return TeacherSpec(library, model.strip(), kwargs)
