"""Short human-readable text for durations and metric values (CLI lines, page tables, logs).

Both functions accept anything (None, strings, NaN) and answer ``"--"`` for what
is not a finite number, so callers can pass raw progress/metrics values.
"""

from __future__ import annotations

import math

__all__ = ["format_duration", "format_number"]


def format_duration(seconds) -> str:
    """``"42s"``, ``"3m07s"`` or ``"1h05m"`` for a number of seconds (rounded); ``"--"`` when unknown or negative."""
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return "--"
    if not math.isfinite(seconds) or seconds < 0:
        return "--"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_number(value, fmt: str = ".4f") -> str:
    """``value`` formatted with ``fmt`` (a :func:`format` spec); ``"--"`` when not a finite number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "--"
    return format(value, fmt) if math.isfinite(value) else "--"
