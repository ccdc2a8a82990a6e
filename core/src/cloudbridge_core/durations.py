"""Durations as written in config and flags: ``"500ms"``, ``"30s"``, ``"1m30s"``, ``"24h"``.

This is the one way durations are written anywhere in CloudBridge; the config schema's
``$defs/duration`` pattern accepts exactly what :func:`parse_duration` parses.
"""

from __future__ import annotations

import re

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
DURATION_PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h|d))+$"


def parse_duration(text: str) -> float:
    """Return the duration in seconds; raise ``ValueError`` naming the bad text."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(invalid_duration(text))
    return sum(float(amount) * _UNIT_SECONDS[unit] for amount, unit in _PART.findall(text))


def invalid_duration(value: object) -> str:
    """Why ``value`` is not a duration, in words (config errors show this, not the pattern)."""
    message = (
        f"invalid duration {value!r}: write a number with a unit, like 500ms, 30s, 1m30s or 24h"
    )
    negative = (
        value.strip().startswith("-")
        if isinstance(value, str)
        else isinstance(value, int | float) and not isinstance(value, bool) and value < 0
    )
    return f"{message}; durations cannot be negative" if negative else message


def format_duration(seconds: float) -> str:
    """Write ``seconds`` the way config files do (``90.0`` -> ``"1m30s"``)."""
    if seconds < 1 and seconds != 0:
        return f"{round(seconds * 1000)}ms"
    whole = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, whole = divmod(whole, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts) or "0s"
