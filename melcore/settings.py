"""Where melreview keeps its data.

``MELREVIEW_HOME`` (default ``~/.melreview``) holds the SQLite store, run
directories, image and feature caches and the demo cohort.
``MELREVIEW_DB_URL`` overrides the store (e.g. ``postgresql+psycopg://...``).
``MELREVIEW_DATA_ROOTS`` lists the folders datasets may be registered from.
``MELREVIEW_WARM_UP=0`` stops the pages loading a run's model in the background.
``MELREVIEW_GROUP_TIMEOUT`` (seconds) bounds how long the workers of one run trained across
machines wait on a sibling that stopped (:func:`group_timeout`); ``MELREVIEW_COLLECTIVE_TIMEOUT``
(seconds, unset: none) is TensorFlow's own timeout of every collective op (:func:`collective_timeout`).
"""

from __future__ import annotations

import os
from pathlib import Path

from melcore.errors import ConfigError


def home() -> Path:
    """The data directory, created on first use; ConfigError when it cannot be a folder."""
    path = Path(os.environ.get("MELREVIEW_HOME", "~/.melreview")).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "is a file, not a folder" if path.exists() else f"cannot be created ({exc.strerror or exc})"
        raise ConfigError(f"MELREVIEW_HOME={path} {what}; set MELREVIEW_HOME to a folder this user can write") from None
    return path


def db_url() -> str:
    """SQLAlchemy URL of the store: ``MELREVIEW_DB_URL`` or a SQLite file under :func:`home`."""
    url = os.environ.get("MELREVIEW_DB_URL")
    if url:
        return url
    return f"sqlite:///{home() / 'melreview.db'}"


def subdir(name: str) -> Path:
    """A named folder under :func:`home` (``runs``, ``cache/images``, ``demo``...), created on first use."""
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_roots() -> list[Path]:
    """Folders whose files may be registered as datasets (tables, metadata, image folders).

    ``MELREVIEW_DATA_ROOTS`` holds them separated by ``os.pathsep`` (``:`` on Linux);
    unset or empty, they are the user's home folder. The demo cohort's folder
    (``MELREVIEW_HOME/demo``) is always allowed.
    """
    raw = os.environ.get("MELREVIEW_DATA_ROOTS", "")
    roots = [Path(part).expanduser() for part in raw.split(os.pathsep) if part.strip()]
    if not roots:
        roots = [Path.home()]
    return roots + [home() / "demo"]


def warm_up_enabled() -> bool:
    """Whether pages warm a run's model in the background (``MELREVIEW_WARM_UP``, on unless ``0``/``false``/``no``)."""
    return os.environ.get("MELREVIEW_WARM_UP", "1").strip().lower() not in ("0", "false", "no", "off")


GROUP_TIMEOUT_VARIABLE = "MELREVIEW_GROUP_TIMEOUT"
DEFAULT_GROUP_TIMEOUT = 30.0


COLLECTIVE_TIMEOUT_VARIABLE = "MELREVIEW_COLLECTIVE_TIMEOUT"


def _positive_seconds(variable: str, raw: str) -> float:
    """``raw`` (the value of ``variable``) as a positive finite number of seconds, else ConfigError."""
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{variable}={raw!r} is not a positive number of seconds; set it to e.g. 30 or unset it")
    return value


def collective_timeout() -> float | None:
    """``MELREVIEW_COLLECTIVE_TIMEOUT`` in seconds, or None when unset (TensorFlow's default: no timeout).

    Passed to ``tf.distribute.experimental.CommunicationOptions(timeout_seconds=...)`` by
    :func:`melcore.distributed.multi_worker_strategy`: a collective op (one gradient all-reduce)
    that waits longer fails, which ends a ``train --worker-hosts`` worker whose sibling died.
    It applies to every collective, including the first, which waits for the slowest worker
    to load its data and trace its graph: set it well above that.
    """
    raw = os.environ.get(COLLECTIVE_TIMEOUT_VARIABLE, "").strip()
    return _positive_seconds(COLLECTIVE_TIMEOUT_VARIABLE, raw) if raw else None


def group_timeout() -> float:
    """Seconds the workers of one run trained across machines wait on a sibling that stopped.

    ``MELREVIEW_GROUP_TIMEOUT`` (default 30): a sibling job without a heartbeat for this long
    counts as dead (:func:`melcore.jobs.group_failure`), and a training process still running
    this long after its stop is ended (:func:`melcore.jobs.run_placed_job`). ConfigError naming
    the value when it is not a positive number.
    """
    raw = os.environ.get(GROUP_TIMEOUT_VARIABLE, "").strip()
    return _positive_seconds(GROUP_TIMEOUT_VARIABLE, raw) if raw else DEFAULT_GROUP_TIMEOUT
