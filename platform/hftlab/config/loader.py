"""YAML + dotted overrides -> typed, validated config dataclasses.

One override language everywhere: `align.lr=1e-4` on the CLI is the same key that appears in a
sweep space and as an MLflow param name. Every error names the dotted field and the bad value,
and is raised before any expensive work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from hftlab.config.errors import ConfigError
from hftlab.config.schema import Config

T = TypeVar("T")


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=1e-4` -> ("a.b", 0.0001); the value is parsed as YAML (so `null`, `[1,2]` work)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError("override", item, "must look like dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(key.strip(), raw, f"not a YAML value ({exc.__class__.__name__})") from None
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    return key.strip(), value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each dotted override in a nested dict (unknown keys are caught later, by the schema)."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        key, value = parse_override(item)
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), child, "is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def build(cls: type[T], raw: Any, path: str = "") -> T:
    """Construct dataclass `cls` from a dict, checking keys and types field by field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path or "<root>", raw, f"must be a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            where = f"{path}.{key}" if path else (str(key) or repr(key))
            raise ConfigError(where, raw[key], f"unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name in fields:
        if name in raw:
            where = f"{path}.{name}" if path else name
            kwargs[name] = _coerce(hints[name], raw[name], where)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise (exc.under(path) if path else exc) from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for arg in inner:
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(exc.reason)
        raise ConfigError(where, value, " or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(where, value, f"must be one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(where, value, "must be a list")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, value, "must be a mapping")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, value, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(where, value, "must be an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(where, value, "must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(where, value, "must be a string")
        return value
    if tp is Any:
        return value
    raise TypeError(f"{where}: unsupported schema type {tp!r}")


def load_config(path: str | Path, overrides: list[str] | None = None, cls: type[T] | None = None) -> T:
    """Read a YAML file, apply dotted overrides and validate it into `cls` (default: Config)."""
    raw = read_yaml(path, "config")
    try:
        return build(cls or Config, apply_overrides(raw, overrides or []))
    except ConfigError as exc:  # the field and value first, then which file (or override) it came from
        raise ConfigError(exc.field or "<root>", exc.value, f"{exc.reason} (config {path})") from None


MAX_YAML_VALUES = 100_000  # a config or sweep file holds hundreds; more is an alias bomb ("billion laughs")


def read_yaml(path: str | Path, field: str) -> dict:
    """A YAML mapping through the safe loader (no Python-object tags), or a ConfigError naming `field` and the file:
    missing, not UTF-8, malformed, nested too deep, not a mapping, or aliases that expand past MAX_YAML_VALUES."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, str(path), "no such file")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(field, str(path), f"is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(field, str(path), f"malformed YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(field, str(path), "malformed YAML: nested too deep") from None
    if not isinstance(raw, dict):
        raise ConfigError(field, str(path), f"must be a mapping of fields, not a {type(raw).__name__}")
    _count_values(raw, field, path, [0])
    return raw


def _count_values(node: Any, field: str, path: Path, seen: list[int], depth: int = 0) -> None:
    """Walk the loaded tree as it would expand (aliases repeated), stopping at MAX_YAML_VALUES or 100 levels."""
    seen[0] += 1
    if seen[0] > MAX_YAML_VALUES or depth > 100:
        why = f"expands to over {MAX_YAML_VALUES} values" if depth <= 100 else "nests over 100 levels"
        raise ConfigError(field, str(path), f"{why} (YAML aliases?); a config holds far fewer")
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        _count_values(child, field, path, seen, depth + 1)


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts (what `resolved.yaml` holds)."""
    return dataclasses.asdict(cfg)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"align.lr": 0.0005, ...}: the MLflow param names are the override keys."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _plain(obj: Any) -> Any:
    """Dataclasses anywhere inside -> dicts: json sorts their keys, so no key depends on the order of a dataclass's
    fields (a field moved to a base class leaves every cache key as it was)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def digest(obj: Any, n: int = 12) -> str:
    """A short content hash of any JSON-able object (dataclasses included, at any depth): the stage cache keys."""
    text = json.dumps(_plain(obj), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]
