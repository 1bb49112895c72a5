"""A throwaway PostgreSQL server for tests and benchmarks.

Used by the ``postgres_url`` fixture in ``tests/conftest.py`` and by
``bench/queue.py``; the app never starts a server of its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from melcore.devtools.ports import free_port

__all__ = ["pg_bin", "temporary_server"]


def pg_bin() -> Path:
    """The folder holding initdb, pg_ctl and pg_isready: ``$MELREVIEW_PG_BIN``, else PostgreSQL 15's."""
    return Path(os.environ.get("MELREVIEW_PG_BIN", "/usr/lib/postgresql/15/bin"))


@contextlib.contextmanager
def temporary_server(
    *, max_connections: int = 200, prefix: str = "melreview-pg-", ready_timeout: float = 30.0
) -> Iterator[str]:
    """Start a PostgreSQL server in a temporary folder; yield its SQLAlchemy URL; stop and delete it.

    The server listens on 127.0.0.1 on a free port, trusts every local
    connection as user ``postgres`` and runs with ``fsync=off`` (data are
    thrown away). initdb and pg_ctl refuse to run as root, so as root the
    server runs as the ``postgres`` user through ``runuser``.

    Parameters
    ----------
    max_connections : int
        The server's ``max_connections``.
    prefix : str
        Prefix of the temporary folder's name (data directory, socket, log).
    ready_timeout : float
        Seconds to wait for ``pg_isready`` after start-up.

    Yields
    ------
    str
        ``postgresql+psycopg://postgres@127.0.0.1:<port>/postgres``.

    Raises
    ------
    FileNotFoundError
        When initdb is not in :func:`pg_bin` (set ``MELREVIEW_PG_BIN``).
    subprocess.CalledProcessError
        When initdb or pg_ctl fails.
    """
    bin_dir = pg_bin()
    if not (bin_dir / "initdb").exists():
        raise FileNotFoundError(f"PostgreSQL binaries not found in {bin_dir} (set MELREVIEW_PG_BIN)")
    as_root = os.geteuid() == 0
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    if as_root:
        shutil.chown(workdir, "postgres", "postgres")
    datadir = workdir / "data"
    port = free_port()
    try:
        subprocess.run(
            run_as + [str(bin_dir / "initdb"), "-D", str(datadir), "-U", "postgres", "-A", "trust", "--no-sync"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            run_as
            + [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(datadir),
                "-l",
                str(workdir / "log"),
                "-w",
                "-o",
                f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
                f"-c max_connections={max_connections}",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        deadline = time.time() + ready_timeout
        while time.time() < deadline:
            ready = subprocess.run(
                run_as + [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True
            )
            if ready.returncode == 0:
                break
            time.sleep(0.2)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            run_as + [str(bin_dir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(workdir, ignore_errors=True)
