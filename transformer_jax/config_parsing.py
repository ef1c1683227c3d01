"""Reading configs: a YAML file into raw sections, `section.key=value` overrides set in them, and raw
sections into the typed dataclasses of transformer_jax.config (known keys, values of their
types). A mistake raises `ConfigError` with one line naming the key; transformer_jax.config
validates what comes out."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user's config mistake: the message is one line naming the key."""


def _check_value(key: str, tp: Any, value: Any) -> Any:
    """Coerce `value` to the annotated type `tp` or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _check_value(key, next(a for a in args if a is not type(None)), value)
    if origin is Literal:
        if isinstance(value, bool) and "on" in args and "off" in args:  # YAML 1.1 reads on / off as booleans
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_check_value(key, args[0], v) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{path}: unknown key{hint}")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a section (mapping), got {value!r}")
            kwargs[key] = _from_dict(tp, value, path + ".")
        else:
            kwargs[key] = _check_value(path, tp, value)
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
        tree = node
    tree[last] = value


def parse_override(override: str) -> tuple[str, Any]:
    """'model.num_layers=4' -> ('model.num_layers', 4); the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"{override}: an override is key=value, e.g. model.num_layers=4")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A copy of raw config sections with `key=value` overrides set in it (unvalidated)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    for override in overrides:
        _set(data, *parse_override(override))
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    """A config file's raw sections, named after the file unless it names itself."""
    if not os.path.exists(path):
        raise ConfigError(f"--config: no such file {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return data
