"""Short human-readable text for durations, metric values, thresholds and risks; JSON-safe values.

Every function accepts anything (None, strings, NaN) and answers ``"--"`` for what
is not a finite number, so callers can pass raw progress/metrics values.

Thresholds and risks shown side by side must never contradict the decision: a
threshold saved from a curve point (0.50512) is not shown as "0.505", and a risk
just below it is not shown as "0.51" beside a red/green flag that says otherwise.

:func:`json_safe` is the one rule for writing numbers as JSON (``metrics.json``, the store's
JSON columns, the CLI's ``--json``, job progress): what is not a finite number is null.
"""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

__all__ = [
    "as_finite",
    "format_duration",
    "format_number",
    "format_risk",
    "format_threshold",
    "first_few",
    "json_safe",
    "SHOWN",
]

MAX_DECIMALS = 6
SHOWN = 5  # how many names, rows or values a message lists


def as_finite(value) -> float | None:
    """``value`` as a float, or None when it is not a finite number (None, text, NaN, inf)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def format_duration(seconds) -> str:
    """``"42s"``, ``"3m07s"`` or ``"1h05m"`` for a number of seconds (rounded); ``"--"`` when unknown or negative."""
    seconds = as_finite(seconds)
    if seconds is None or seconds < 0:
        return "--"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_number(value, fmt: str = ".4f") -> str:
    """``value`` formatted with ``fmt`` (a :func:`format` spec); ``"--"`` when not a finite number."""
    value = as_finite(value)
    return "--" if value is None else format(value, fmt)


def format_threshold(threshold, min_decimals: int = 3) -> str:
    """A decision threshold with the decimals it needs: ``0.5`` -> ``"0.500"``, ``0.50512`` -> ``"0.50512"``.

    At least ``min_decimals``, more while rounding would change the value (at most 6).
    """
    value = as_finite(threshold)
    if value is None:
        return "--"
    for decimals in range(min_decimals, MAX_DECIMALS):
        if abs(round(value, decimals) - value) < 0.5 * 10.0**-MAX_DECIMALS:
            return f"{value:.{decimals}f}"
    return f"{value:.{MAX_DECIMALS}f}"


def format_risk(risk, threshold=None, min_decimals: int = 2) -> str:
    """A predicted probability with enough decimals to compare with the shown threshold as the exact values do.

    ``format_risk(0.5051, 0.50512)`` is ``"0.505"`` (below ``"0.50512"``; ``"0.51"`` would read as above
    it); ``format_risk(0.73, 0.505)`` is ``"0.73"``. Decimals go from ``min_decimals`` up to 6; the
    threshold is compared as :func:`format_threshold` shows it. Without a threshold: ``min_decimals``.
    """
    value = as_finite(risk)
    if value is None:
        return "--"
    limit = as_finite(threshold)
    if limit is None:
        return f"{value:.{min_decimals}f}"
    shown_limit = float(format_threshold(limit))
    flagged = value >= limit
    for decimals in range(min_decimals, MAX_DECIMALS + 1):
        text = f"{value:.{decimals}f}"
        if (float(text) >= shown_limit) == flagged:
            return text
    return f"{value:.{MAX_DECIMALS}f}"


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON data that every reader and database accepts (strict JSON, no NaN).

    Parameters
    ----------
    value : any
        Nested dicts, lists and tuples of numbers, str, bool, None, numpy scalars and arrays,
        paths.

    Returns
    -------
    The same structure with dict keys as str, tuples and arrays as lists, numpy scalars as
    Python numbers and bools, paths as str, and NaN / inf as None (an undefined ratio, a
    biopsies-per-melanoma with no melanoma found). Anything else is returned as it is (callers
    pass ``default=str`` to :func:`json.dumps` for it).
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, PurePath):
        return str(value)
    return value


def first_few(values, n: int = SHOWN, *, total: int | None = None, sep: str = ", ") -> str:
    """The first ``n`` of ``values`` for a message, then how many more: ``"a, b, c, ... (+4 more)"``.

    Parameters
    ----------
    values : iterable
        The items (any type, shown with ``str``), or only the first of them when ``total`` is given.
    n : int
        How many to show (:data:`SHOWN`).
    total : int, optional
        How many items there are in all (default: ``len(values)``).
    sep : str
        Between items and before the ``... (+k more)`` tail.
    """
    values = list(values)
    shown = [str(v) for v in values[:n]]
    extra = (len(values) if total is None else int(total)) - len(shown)
    return sep.join(shown) + (f"{sep}... (+{extra:,} more)" if extra > 0 else "")
