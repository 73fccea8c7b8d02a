"""How values read from TOML and JSON files are checked and shown in error messages."""

from __future__ import annotations

from typing import Any


def is_number(value: Any) -> bool:
    """An int or a float: bool is an int to Python, but `true` is no number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shown(value: Any) -> str:
    """`value` as an error message quotes it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
