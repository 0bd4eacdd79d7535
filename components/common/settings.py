"""One settings object per stage: a dataclass, built from the mapping (or JSON text) the DAG passes.

A knob is written where its dataclass defines it and where its stage uses it; the DAG, the
CLI and the tests hand the stage a mapping, and unknown keys fail naming the known ones.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """Settings that do not fit their dataclass; the message names the key and the choices."""


def parse_settings(cls: type[T], value: Any = None, source: str = "settings") -> T:
    """``cls`` from ``value``: an instance of it, a mapping, JSON text of a mapping, or None/""
    (the defaults). Lists become tuples where the field's default is a tuple."""
    if isinstance(value, cls):
        return value
    if value in (None, ""):
        value = {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise SettingsError(f"{source}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise SettingsError(f"{source}: expected a mapping of settings, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise SettingsError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in value.items():
        default = fields[k].default
        if isinstance(v, list) and isinstance(default, tuple):
            v = tuple(v)
        # KFP passes a mapping as a protobuf Struct, whose numbers are all floats: 300 -> 300.0
        elif isinstance(v, float) and v.is_integer() and int in (hints[k], *typing.get_args(hints[k])):
            v = int(v)
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise SettingsError(f"{source}: {e}") from None


def settings_dict(obj) -> dict:
    """A settings object as plain JSON data (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))
