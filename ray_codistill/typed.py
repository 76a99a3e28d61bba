"""Plain data (YAML, `--set key=value`) into typed dataclasses: each value checked against its
field's type, unknown keys refused by name, dotted keys set in nested mappings."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from ray_codistill.errors import ConfigError


def check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def choice(value: Any, key: str, allowed: tuple) -> None:
    check(value in allowed, key, f"got {value!r}, allowed values: {', '.join(map(str, allowed))}")


def build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed keys: {', '.join(prefix + n for n in names)}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        key, value, hint = prefix + name, raw[name], hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, value, key + ".")
        else:
            kwargs[name] = coerce(value, hint, key)
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - guarded by the unknown-key check above
        raise ConfigError(f"{where}: {err}") from err


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a field's type; ints are accepted for floats."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        choice(value, key, args)
        return value
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if origin is list:
        check(isinstance(value, list), key, f"got {value!r}, expected a list")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        check(isinstance(value, dict), key, f"got {value!r}, expected a mapping")
        return {coerce(k, args[0], key): coerce(v, args[1], key) for k, v in value.items()}
    if hint is bool:
        check(isinstance(value, bool), key, f"got {value!r}, expected true or false")
        return value
    if hint is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, f"got {value!r}, expected an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"got {value!r}, expected a number")
        return float(value)
    if hint is str:
        check(isinstance(value, str), key, f"got {value!r}, expected a string")
        return value
    return value  # pragma: no cover


def set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})  # an unknown section is refused, by name, when built
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: '{part}' is not a config section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML (so 0.1 is a float, true a bool, [1, 2] a list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        return key, yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot read value {value!r}: {err}") from err
