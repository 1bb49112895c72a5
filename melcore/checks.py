"""Value checkers for configs: one rule and one message per kind of value.

Each checker takes the field's name (as the message should say it) and the value, and
returns the value in canonical form or raises :class:`melcore.errors.ConfigError` with a
message that names the field, the bad value and what a valid one looks like::

    check_int("epochs", 0, minimum=1)        # ConfigError: epochs must be positive, got 0
    check_choice("optimizer", "Adam", ("sgd", "adam", "adamw"))   # -> "adam"

:class:`melcore.training.config.TrainConfig` and :mod:`melcore.registry` use them; nothing
here imports more than NumPy.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from melcore.errors import ConfigError

__all__ = ["canonical_name", "check_int", "check_float", "check_fraction", "check_bool", "check_choice"]


def canonical_name(value: Any) -> str:
    """``value`` as a registry key: stripped, lower case, ``_`` written ``-`` (``""`` for None)."""
    return str(value).strip().lower().replace("_", "-") if value is not None else ""


def check_int(name: str, value: Any, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """An integer (a float with an integer value is accepted; a bool is not), at least ``minimum``.

    Raises
    ------
    ConfigError
        Not an integer, or below ``minimum`` ("must be positive" when ``minimum`` is 1).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ConfigError(f"{name} must be {what}, got {value}")
    return int(value)


def check_float(name: str, value: Any) -> float:
    """A finite number (not a bool) as a float.

    Raises
    ------
    ConfigError
        Not a number, or NaN / infinite.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    return value


def check_fraction(name: str, value: Any, meaning: str = "") -> float:
    """A number strictly between 0 and 1; ``meaning`` (e.g. "share of ...") is put after the name.

    Raises
    ------
    ConfigError
        Not a finite number, or outside (0, 1).
    """
    value = check_float(name, value)
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{name}{f' ({meaning})' if meaning else ''} must be between 0 and 1 (e.g. 0.2), got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (NumPy bools too; no 0/1, no strings).

    Raises
    ------
    ConfigError
        Anything else.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def check_choice(name: str, value: Any, valid: Iterable[str]) -> str:
    """The :func:`canonical_name` of ``value`` when it is one of ``valid``.

    Raises
    ------
    ConfigError
        Not one of ``valid``; the message lists them ("unknown optimizer 'x'; valid optimizers: ...").
    """
    valid = tuple(valid)
    key = canonical_name(value)
    if key not in valid:
        raise ConfigError(f"unknown {name} {value!r}; valid {name}s: {', '.join(valid)}")
    return key
