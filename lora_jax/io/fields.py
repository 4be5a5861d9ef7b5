"""Strict reading of JSON config files (``adapter_config.json``, ``config.json``, shard indexes).

Every field is checked for its type and range before use, so that a damaged
file fails with a :class:`ConfigFieldError` naming the file, the field and the
value, instead of being coerced (``r: 4.9`` -> 4, ``"false"`` -> True) or
failing later with an unrelated error.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from typing import Any

_MISSING = object()


class ConfigFieldError(ValueError):
    """A JSON config file that is unreadable, or whose field has the wrong type or range."""


def _no_duplicates(path: str):
    def hook(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ConfigFieldError(f"{path}: key {key!r} appears twice in one JSON object")
            seen[key] = value
        return seen
    return hook


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``; refuses invalid JSON, duplicate keys, deep nesting and non-objects.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = open(os.path.join(d, "c.json"), "w").write("[1, 2]")
    ...     read_json(os.path.join(d, "c.json"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lora_jax.io.fields.ConfigFieldError: ...c.json: expected a JSON object at the top level, got a list
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=_no_duplicates(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigFieldError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise ConfigFieldError(f"{path}: JSON nested too deeply to be a config file") from None
    if not isinstance(data, dict):
        raise ConfigFieldError(f"{path}: expected a JSON object at the top level, got a {type(data).__name__}")
    return data


def _fail(where: str, key: str, expected: str, value) -> ConfigFieldError:
    return ConfigFieldError(f"{where}: field {key!r} must be {expected}, got {value!r}")


def get_int(cfg: Mapping, key: str, where: str, default=_MISSING, *, minimum: int = 1) -> Any:
    """``cfg[key]`` as an int ``>= minimum`` (bools and floats such as 4.9 refused); ``default`` if absent or null.

    >>> get_int({"r": 4}, "r", "adapter_config.json")
    4
    >>> get_int({"r": 4.9}, "r", "adapter_config.json")
    Traceback (most recent call last):
    ...
    lora_jax.io.fields.ConfigFieldError: adapter_config.json: field 'r' must be an int >= 1, got 4.9
    """
    value = cfg.get(key)
    if value is None and default is not _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise _fail(where, key, f"an int >= {minimum}", value)
    return int(value)


def get_number(cfg: Mapping, key: str, where: str, default=_MISSING, *, low: float = 0.0,
               low_inclusive: bool = False, high: float = math.inf) -> Any:
    """``cfg[key]`` as a finite float in ``(low, high)`` (``[low, high)`` with ``low_inclusive``).

    >>> get_number({"lora_alpha": 16}, "lora_alpha", "adapter_config.json")
    16.0
    >>> get_number({"lora_alpha": True}, "lora_alpha", "adapter_config.json")
    Traceback (most recent call last):
    ...
    lora_jax.io.fields.ConfigFieldError: adapter_config.json: field 'lora_alpha' must be a finite number > 0.0, got True
    """
    value = cfg.get(key)
    if value is None and default is not _MISSING:
        return default
    in_range = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
                and (value >= low if low_inclusive else value > low) and value < high)
    if not in_range:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and < {high}" if math.isfinite(high) else "")
        raise _fail(where, key, f"a finite number {bound}", value)
    return float(value)


def get_bool(cfg: Mapping, key: str, where: str, default: bool = False) -> bool:
    """``cfg[key]`` if it is a JSON boolean; ``default`` if absent. Strings such as ``"false"`` are refused.

    >>> get_bool({"use_rslora": "false"}, "use_rslora", "adapter_config.json")
    Traceback (most recent call last):
    ...
    lora_jax.io.fields.ConfigFieldError: adapter_config.json: field 'use_rslora' must be true or false, got 'false'
    """
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise _fail(where, key, "true or false", value)
    return value


def check_regex(pattern: str, where: str, key: str) -> str:
    """``pattern`` if it compiles as a Python regex; else a :class:`ConfigFieldError` naming ``key``."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigFieldError(f"{where}: field {key!r} holds an invalid regex {pattern!r} ({err})") from None
    return pattern
