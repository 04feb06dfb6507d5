"""Plain values ⇄ the config dataclasses, by their type hints: YAML mappings and Flower's flat run-config.

A value is checked against its field's type (``X | None``, ``Literal``, tuples, mappings of names, nested
sections) and refused with the key, the value and the rule. The Flower run-config form is flat
(``"privacy.noise_multiplier" = 1.0``) because Flower accepts scalars only; lists, mappings and absent optional
values travel as JSON text and are decoded by field type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

from fedchurn.shared.config_schema import FedChurnConfig
from fedchurn.shared.errors import ConfigError


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    base, optional = _strip_optional(tp)
    origin = get_origin(base)
    if origin is Literal:
        name = "one of " + ", ".join(repr(a) for a in get_args(base))
    elif origin is tuple:
        name = f"a list of {_type_name(get_args(base)[0])}"
    elif origin is dict:
        name = f"a mapping of name to {_type_name(get_args(base)[1])}"
    elif dataclasses.is_dataclass(base):
        name = "a mapping"
    else:
        name = {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(base, str(base))
    return name + (" or null" if optional else "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp`` and return it in the dataclass's own form."""
    base, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(key, value, f"must be {_type_name(tp)}")
    origin = get_origin(base)
    if dataclasses.is_dataclass(base):
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, "must be a mapping of keys to values")
        return _build(base, value, key)  # type: ignore[arg-type]
    if origin is Literal:
        if value not in get_args(base):
            raise ConfigError(key, value, f"must be {_type_name(base)}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, f"must be {_type_name(base)}")
        item_type = get_args(base)[0]
        return tuple(_coerce(item_type, item, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, f"must be {_type_name(base)}")
        value_type = get_args(base)[1]
        out: dict[str, Any] = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise ConfigError(key, name, "mapping keys must be text (quote them in YAML)")
            out[name] = _coerce(value_type, item, f"{key}.{name}")
        return out
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = None
            if isinstance(value, str) and looks_like_float(value):
                hint = "YAML reads 1e-5 as text: write 1.0e-5"
            raise ConfigError(key, value, "must be a number", hint)
        if not math.isfinite(value):
            raise ConfigError(key, value, "must be a finite number")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be text (quote it in YAML)")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a schema bug, not a user error


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(key, values[unknown[0]], "unknown key", f"known keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in values:
            kwargs[name] = _coerce(hints[name], values[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    """Dataclass -> nested dicts, lists and scalars (YAML- and JSON-safe)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_from_dict(values: Mapping[str, Any]) -> FedChurnConfig:
    """Build and validate a config from nested plain values (parsed YAML)."""
    if not isinstance(values, Mapping):
        raise ConfigError("(top level)", values, "a config file must be a mapping of keys to values")
    return _build(FedChurnConfig, values, "")  # type: ignore[no-any-return]


def config_to_dict(config: FedChurnConfig) -> dict[str, Any]:
    """The nested plain form; ``config_from_dict(config_to_dict(c)) == c``."""
    return _plain(config)  # type: ignore[no-any-return]


def looks_like_float(text: str) -> bool:
    if text.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return False
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- Flower run-config: flat keys, scalar values --------------------------------------------------

RunConfig = dict[str, bool | int | float | str]


def config_to_run_config(config: FedChurnConfig) -> RunConfig:
    """Flatten to Flower's run-config: dotted keys, scalars; lists/mappings/None as JSON text."""
    flat: RunConfig = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            elif isinstance(value, (bool, int, float, str)):
                flat[key] = value
            else:  # tuple, dict, None, or an optional section that is absent
                flat[key] = json.dumps(_plain(value))

    walk(config, "")
    return flat


def config_from_run_config(run_config: Mapping[str, Any]) -> FedChurnConfig:
    """Inverse of ``config_to_run_config``. Unknown keys are refused, as Flower refuses them."""
    nested: dict[str, Any] = {}
    for key, value in run_config.items():
        tp = _field_type(key)
        base, _ = _strip_optional(tp)
        if isinstance(value, str) and not (base is str or get_origin(base) is Literal):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(key, value, f"must be {_type_name(tp)} (as JSON text in the run-config)") from None
        elif isinstance(value, str) and value == "null" and tp is not base:
            value = None  # an optional text field that was absent
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config_from_dict(nested)


def _field_type(dotted: str) -> Any:
    cls: Any = FedChurnConfig
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        hints = _hints(cls) if isinstance(cls, type) and dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            raise ConfigError(dotted, None, "unknown run-config key", "see the embedded default: fedchurn config show")
        tp = hints[part]
        if depth < len(parts) - 1:
            cls, _ = _strip_optional(tp)
        else:
            return tp
    return None
