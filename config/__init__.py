"""The config base every layer's typed config builds on: a strict pydantic model, TOML + overrides, dumping.

Each layer keeps its own config next to the code it parameterizes (``stages/config.py``,
``train/config.py``); this small module below them all holds only what is generic. Every config
forbids unknown keys, so a typo in a TOML file or a ``--set`` override fails loudly with the dotted
key path instead of being silently ignored.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigError", "StrictConfig", "dump_toml", "load_cli_config", "load_config", "parse_overrides"]

C = TypeVar("C", bound="StrictConfig")


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


class StrictConfig(BaseModel):
    """Base for run configs: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _parse_value(text: str) -> Any:
    """Read an override value with TOML syntax (numbers, booleans, arrays); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=3", "name=x"]`` into a nested dict; a malformed item raises ConfigError."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = _parse_value(value.strip())
    return out


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        elif err["type"] == "value_error" and isinstance(err.get("input"), Mapping):  # a check across fields
            lines.append(str(err["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"bad value for '{key}': {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


def load_config(
    model: type[C],
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> C:
    """Build ``model`` from defaults, then the TOML file at ``path``, then ``overrides``.

    ``overrides`` is a nested mapping (CLI flags that were given) or ``key=value`` strings.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    if overrides:
        if not isinstance(overrides, Mapping):
            overrides = parse_overrides(list(overrides))
        data = _deep_merge(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid {model.__name__}{where}: {_describe(exc)}") from None


def load_cli_config(model: type[C], path: str | Path | None, flags: Mapping[str, Any], sets: Sequence[str] | None
                    ) -> C:
    """A command's config: defaults < TOML file < the flags that were given < ``--set key=value`` items.

    ``flags`` maps dotted field names to flag values; None means the flag was not given.
    """
    given: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None:
            continue
        node = given
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return load_config(model, path, _deep_merge(given, parse_overrides(list(sets or []))))


def dump_toml(config: BaseModel) -> str:
    """Serialize a resolved config as TOML (None values are left out, as TOML has no null)."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def tables(value: Any) -> bool:  # a non-empty list of mappings: an array of tables ([[a.b]])
        return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) for v in value)

    def emit(prefix: str, mapping: Mapping[str, Any], header: str = "[{}]") -> list[str]:
        flat = [f"{k} = {fmt(v)}" for k, v in mapping.items()
                if v is not None and not isinstance(v, Mapping) and not tables(v)]
        lines = ([header.format(prefix)] if prefix and (flat or header != "[{}]") else []) + flat
        for k, v in mapping.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, Mapping):
                lines += ([""] if lines else []) + emit(name, v)
            elif tables(v):
                for item in v:
                    lines += ([""] if lines else []) + emit(name, item, "[[{}]]")
        return lines

    return "\n".join(emit("", config.model_dump(mode="json"))) + "\n"
