"""Strict readers of the fields of a JSON record (sessions.py's from_json): a value of the wrong type or shape raises
TypeError or ValueError naming the field, so a broken history file is one clear line, never a half-read record."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any


def mapping(d: object, what: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise TypeError(f"{what} must be a JSON object, not {type(d).__name__}")
    return d


def optional_id(value: object, name: str) -> int | None:
    # bool is an int subclass; true/false in a file is junk, not an id.
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer or null")
    if value < 0:
        raise ValueError(f"{name} must not be negative")
    return value


def string(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string")
    return value


def optional_string(value: object, name: str) -> str | None:
    return None if value is None else string(value, name)


def timestamp(value: object, name: str) -> str:
    text = string(value, name)
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"{name} is not an ISO 8601 time: {text!r}") from exc
    if stamp.tzinfo is None:
        raise ValueError(f"{name} has no time zone: {text!r}")
    return text


def choice(value: object, name: str, allowed: frozenset[str]) -> str:
    text = string(value, name)
    if text not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, not {text!r}")
    return text
