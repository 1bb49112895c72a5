"""Shared fixtures.

Every test runs with its own ``MELREVIEW_HOME`` (a temporary folder) and the
SQLite store, unless it asks for ``postgres_url``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
PG_BIN = Path(os.environ.get("MELREVIEW_PG_BIN", "/usr/lib/postgresql/15/bin"))


@pytest.fixture(autouse=True)
def melreview_home(tmp_path, monkeypatch):
    """A private data directory for each test; the store defaults to SQLite inside it."""
    home = tmp_path / "melreview-home"
    home.mkdir()
    monkeypatch.setenv("MELREVIEW_HOME", str(home))
    monkeypatch.delenv("MELREVIEW_DB_URL", raising=False)
    return home


def _shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not present: {path} (tests on real data need ../shared beside the project)")
    return path


@pytest.fixture(scope="session")
def isic2020_dir() -> Path:
    """``../shared/data/isic2020`` (the real ISIC 2020 label tables), or skip."""
    return _shared("isic2020")


@pytest.fixture(scope="session")
def derm_real_dir() -> Path:
    """``../shared/data/derm-real-dev`` (1,209 real dermoscopy images), or skip."""
    return _shared("derm-real-dev")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small synthetic demo cohort (labels.csv + images), made once per session."""
    from melcore.demo import make_demo_cohort

    out = tmp_path_factory.mktemp("demo")
    make_demo_cohort(out, n_patients=40, seed=7)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server in a temporary directory, for the session; its URL.

    initdb and pg_ctl refuse to run as root, so as root the server runs as the
    ``postgres`` user through ``runuser``. Skips when the binaries are absent.
    """
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL binaries not found in {PG_BIN}")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed")
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    workdir = Path(tempfile.mkdtemp(prefix="melreview-pg-"))
    if as_root:
        shutil.chown(workdir, "postgres", "postgres")
    datadir = workdir / "data"
    port = _free_port()
    subprocess.run(prefix + [str(PG_BIN / "initdb"), "-D", str(datadir), "-U", "postgres", "-A", "trust",
                             "--no-sync"], check=True, capture_output=True)
    subprocess.run(prefix + [str(PG_BIN / "pg_ctl"), "-D", str(datadir), "-l", str(workdir / "log"), "-w",
                             "-o", f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
                                   "-c max_connections=200", "start"],
                   check=True, capture_output=True)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            ready = subprocess.run(prefix + [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                   capture_output=True)
            if ready.returncode == 0:
                break
            time.sleep(0.2)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(prefix + [str(PG_BIN / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def fresh_postgres_url(postgres_url):
    """A new, empty database on the session's PostgreSQL server."""
    import uuid

    import sqlalchemy as sa

    name = "t_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    yield postgres_url.rsplit("/", 1)[0] + "/" + name
