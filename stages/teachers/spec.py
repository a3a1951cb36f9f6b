"""Teacher SPEC strings: ``library:MODEL[,key=value...]`` (values parsed as int/float/bool/None/str).

Overrides go to the model constructor, so tests and demos build small configurations through the
same code path as the real teacher, e.g. ``timm:vit_small_patch16_dinov3,depth=2,embed_dim=64,num_heads=2``.
Dotted keys address nested config (open_clip ``text_cfg.width=64``, ``trunk.depth=2``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["LIBRARIES", "ModelSpec", "parse_spec"]

LIBRARIES = ("timm", "open_clip")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]*$")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed SPEC: which library builds which model, with which constructor overrides."""

    library: str
    model: str
    kwargs: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        """Canonical SPEC string (same overrides, same order)."""
        extra = "".join(f",{k}={'' if v is None else v}" for k, v in self.kwargs.items())
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


def parse_spec(spec: str) -> ModelSpec:
    library, sep, rest = spec.strip().partition(":")
    if not sep:
        raise ValueError(f"teacher SPEC {spec!r} must look like timm:MODEL or open_clip:MODEL")
    if library not in LIBRARIES:
        raise ValueError(f"unknown teacher library {library!r} in {spec!r} (known: {', '.join(LIBRARIES)})")
    model, *pairs = rest.split(",")
    model = model.strip()
    if not model:
        raise ValueError(f"teacher SPEC {spec!r} names no model")
    if not _MODEL.match(model):
        raise ValueError(f"bad model name {model!r} in {spec!r}")
    kwargs = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or not _KEY.match(key):
            raise ValueError(f"bad model override {pair!r} in {spec!r}: expected key=value")
        if key in kwargs:
            raise ValueError(f"model override {key!r} given twice in {spec!r}")
        kwargs[key] = _value(value.strip())
    return ModelSpec(library, model, kwargs)
