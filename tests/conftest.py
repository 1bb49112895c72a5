"""Shared fixtures.

Every test runs with its own ``MELREVIEW_HOME`` (a temporary folder) and the
SQLite store, unless it asks for ``postgres_url`` (or ``db_url``, which runs it on both).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def melreview_home(tmp_path, tmp_path_factory, monkeypatch):
    """A private data directory for each test; the store defaults to SQLite inside it.

    Datasets may be registered from the session's temporary folders and ``../shared/data``
    (``MELREVIEW_DATA_ROOTS``), where the tests write and find their tables.
    """
    home = tmp_path / "melreview-home"
    home.mkdir()
    monkeypatch.setenv("MELREVIEW_HOME", str(home))
    monkeypatch.delenv("MELREVIEW_DB_URL", raising=False)
    roots = [str(tmp_path_factory.getbasetemp()), str(SHARED_DATA)]
    monkeypatch.setenv("MELREVIEW_DATA_ROOTS", os.pathsep.join(roots))
    # Pages do not load models in the background unless a test asks for it (test_warm_up_*): a
    # warm-up still running would outlive the test's temporary folder.
    monkeypatch.setenv("MELREVIEW_WARM_UP", "0")
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


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server in a temporary directory, for the session; its URL.

    Started by :func:`melcore.devtools.postgres.temporary_server` (as the
    ``postgres`` user through ``runuser`` when run as root). Skips when the
    binaries are absent.
    """
    from melcore.devtools.postgres import pg_bin, temporary_server

    if not (pg_bin() / "initdb").exists():
        pytest.skip(f"PostgreSQL binaries not found in {pg_bin()}")
    pytest.importorskip("psycopg", reason="psycopg is not installed")
    with temporary_server(max_connections=200, prefix="melreview-pg-") as url:
        yield url


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


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, melreview_home):
    """A store URL, once per backend: a SQLite file under MELREVIEW_HOME, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{melreview_home / 'test.db'}"
    return request.getfixturevalue("fresh_postgres_url")
