"""Starting a detached background worker when none is alive (used by the app and the CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from melcore import settings
from melcore.store import Store

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def ensure_worker(store: Store, *, within: float = 30.0) -> int | None:
    """Start ``python -m trainers.worker`` detached unless a worker beat in the last ``within`` seconds.

    The worker outlives the calling process (its own session), uses the same store
    URL, and logs to ``$MELREVIEW_HOME/logs/worker.log``. Returns the new process id,
    or None when a live worker exists already.

    The URL (which may hold the database password) reaches the worker through its
    environment (``MELREVIEW_DB_URL``), readable by the same user only, never through its
    command line, which every user of the machine sees in ``ps`` and ``/proc/*/cmdline``.
    """
    if store.live_workers(within=within):
        return None
    logs = settings.subdir("logs")
    env = dict(os.environ, MELREVIEW_DB_URL=store.url, PYTHONPATH=str(PROJECT_ROOT))
    with open(logs / "worker.log", "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "trainers.worker"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    # Beat on its behalf at once so a second page load does not start another one.
    store.worker_beat(f"{os.uname().nodename}:{process.pid}:starting")
    return process.pid
