"""One settings object per stage: a dataclass, built from the mapping (or JSON text) the DAG passes.

A knob is written where its dataclass defines it and where its stage uses it; the DAG, the
CLI and the tests hand the stage a mapping, and unknown keys fail naming the known ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """Settings that do not fit their dataclass; the message names the key and the choices."""


def parse_settings(cls: type[T], value: Any = None, source: str = "settings") -> T:
    """``cls`` from ``value``: an instance of it, a mapping, JSON text of a mapping, or None/""
    (the defaults). Every value is checked against its field's type (``typed``): lists become
    tuples where the field is a tuple, whole floats ints where it is an int (KFP's Struct makes
    every number a float); anything else of the wrong type, or a non-finite float, fails naming
    the key."""
    if isinstance(value, cls):
        return value
    if value in (None, ""):
        value = {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as e:
            raise SettingsError(f"{source}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise SettingsError(f"{source}: expected a mapping of settings, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise SettingsError(f"{source}: unknown setting(s) {', '.join(unknown)}{close_to(unknown[0], fields)}; "
                            f"known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: typed(v, hints[k], f"{source}: {k}") for k, v in value.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise SettingsError(f"{source}: {e}") from None


def close_to(name: str, known) -> str:
    """" (did you mean X?)" when a known name is close to ``name``."""
    import difflib

    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text", tuple: "a list",
          dict: "a mapping", list: "a list"}


def typed(value, hint, where: str):
    """``value`` as the type ``hint`` asks for (see ``parse_settings``), or ``SettingsError``."""
    options = [a for a in typing.get_args(hint)] if typing.get_origin(hint) in (typing.Union, types.UnionType) \
        else [hint]
    if value is None and type(None) in options:
        return None
    errors = []
    for option in options:
        base = typing.get_origin(option) or option
        if base is type(None):
            continue
        if base is bool:
            if isinstance(value, bool):
                return value
        elif base is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif base is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise SettingsError(f"{where} must be a finite number, not {value!r}")
                return float(value)
        elif base is str:
            if isinstance(value, str):
                return value
        elif base in (tuple, list):
            if isinstance(value, (list, tuple)):
                return tuple(value) if base is tuple else list(value)
        elif base is dict:
            if isinstance(value, dict):
                return value
        else:   # a type this check does not know: the dataclass decides
            return value
        errors.append(_KINDS.get(base, getattr(base, "__name__", str(base))))
    raise SettingsError(f"{where} must be {' or '.join(errors)}, not {value!r}")


def settings_dict(obj) -> dict:
    """A settings object as plain JSON data (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))
