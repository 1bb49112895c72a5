"""The melreview store: datasets, runs, jobs, predictions and reviews.

One SQLAlchemy Core schema serves SQLite (the default, a WAL-mode file under
``MELREVIEW_HOME``) and PostgreSQL (``MELREVIEW_DB_URL=postgresql+psycopg://...``).

Schema changes are versioned: :data:`MIGRATIONS` lists every step since version 1
and :meth:`Store.migrate` (run on open) applies the missing ones in order inside a
transaction, so an upgrade adds columns and tables but never drops data. A new
database is created directly at the latest version.

Times are stored as UNIX seconds (float, UTC). JSON columns hold plain Python
objects. Rows come back as ``dict``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import sqlalchemy as sa

from melcore import settings
from melcore.audit import audit_images, audit_warnings, shortcut_audit
from melcore.cohort import load_cohort
from melcore.errors import MelcoreError
from melcore.formatting import json_safe
from melcore.safety import inside

SCHEMA_VERSION = 4

JOB_STATES = ("queued", "running", "done", "cancelled", "failed")
REVIEW_DECISIONS = ("agree", "disagree", "biopsy", "follow-up", "unsure")
STUDY_DECISIONS = ("biopsy", "follow-up", "reassure")
"""Management decisions of a reader study (:mod:`melcore.readers`: "biopsy" is the positive call)."""
DECISIONS = tuple(dict.fromkeys(REVIEW_DECISIONS + STUDY_DECISIONS))
"""Every decision the store accepts."""

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)

datasets = sa.Table(
    "datasets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("csv_path", sa.Text, nullable=False),
    sa.Column("images_dir", sa.Text),
    sa.Column("format", sa.String(40)),
    sa.Column("clinic_column", sa.String(200)),
    sa.Column("metadata_path", sa.Text),
    sa.Column("options", sa.JSON),
    sa.Column("summary", sa.JSON),
    sa.Column("is_demo", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(300), nullable=False),
    sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id")),
    sa.Column("job_id", sa.Integer),
    sa.Column("kind", sa.String(40), nullable=False, default="image"),
    sa.Column("model", sa.String(100)),
    sa.Column("clinic", sa.String(200)),
    sa.Column("run_dir", sa.Text),
    sa.Column("config", sa.JSON),
    sa.Column("metrics", sa.JSON),
    sa.Column("threshold", sa.Float),
    sa.Column("from_scratch", sa.Boolean, nullable=False, default=False),
    sa.Column("notes", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("archived_at", sa.Float),  # set: hidden from the pages' run lists; nothing of the run is deleted
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(40), nullable=False, default="train"),
    sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id")),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("state", sa.String(20), nullable=False, default="queued"),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("worker_id", sa.String(200)),
    sa.Column("claim_token", sa.String(64)),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("max_attempts", sa.Integer, nullable=False, default=3),
    sa.Column("heartbeat_at", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("progress", sa.JSON),
    sa.Column("history", sa.JSON),
    sa.Column("run_id", sa.Integer),
    sa.Column("error", sa.Text),
    sa.Column("log", sa.Text),
    # the sibling group of a run trained across workers (config["placement"]["group"]); None for a lone job
    sa.Column("group_id", sa.String(64)),
    sa.Index("ix_jobs_state", "state"),
    sa.Index("ix_jobs_group_id", "group_id"),
)

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
    sa.Column("split", sa.String(20), nullable=False, default="val"),
    sa.Column("image_name", sa.String(300), nullable=False),
    sa.Column("patient_id", sa.String(200)),
    sa.Column("clinic", sa.String(200)),
    sa.Column("target", sa.Integer),
    sa.Column("prediction", sa.Float, nullable=False),
    sa.Index("ix_predictions_run_split", "run_id", "split"),
    sa.Index("ix_predictions_image", "image_name"),
)

reviews = sa.Table(
    "reviews",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
    sa.Column("image_name", sa.String(300), nullable=False),
    sa.Column("reviewer", sa.String(200), nullable=False),
    sa.Column("decision", sa.String(20), nullable=False),
    sa.Column("note", sa.Text, nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    # aided: the reader saw the model's risk (and Grad-CAM); False for a blinded (unaided) read
    sa.Column("aided", sa.Boolean, nullable=False, default=True, server_default=sa.true()),
    sa.Column("confidence", sa.Integer),  # the reader's malignancy confidence, 0-100, when given
    sa.Index("ix_reviews_run_image", "run_id", "image_name"),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("worker_id", sa.String(200), primary_key=True),
    sa.Column("host", sa.String(200)),
    sa.Column("pid", sa.Integer),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("beat_at", sa.Float, nullable=False),
    sa.Column("job_id", sa.Integer),
)


# Steps from version N-1 to N, each a function of an open connection inside a
# transaction. Append only; never edit a released step. Example of a future step:
#   (2, "runs.tags", lambda conn: conn.execute(sa.text("ALTER TABLE runs ADD COLUMN tags TEXT"))),
def _reviews_aided_and_confidence(conn: sa.Connection) -> None:
    # Every decision recorded before version 3 was made on the Review page with the model's
    # risk on screen, so existing rows are aided reads.
    true = "1" if conn.dialect.name == "sqlite" else "TRUE"
    conn.execute(sa.text(f"ALTER TABLE reviews ADD COLUMN aided BOOLEAN NOT NULL DEFAULT {true}"))
    conn.execute(sa.text("ALTER TABLE reviews ADD COLUMN confidence INTEGER"))


def _jobs_group_id(conn: sa.Connection) -> None:
    # The group of a job queued before version 4 is the one its config's placement names, so jobs
    # already queued or running cancel and fail together after the upgrade too.
    conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN group_id VARCHAR(64)"))
    conn.execute(sa.text("CREATE INDEX ix_jobs_group_id ON jobs (group_id)"))
    grouped = []
    for job_id, config in conn.execute(sa.text("SELECT id, config FROM jobs")):
        if isinstance(config, (str, bytes)):
            try:
                config = json.loads(config)
            except ValueError:
                continue  # unreadable config: the job stays alone, as it was
        group = job_group_id(config)
        if group is not None:
            grouped.append({"id": job_id, "group": group[:64]})  # the column keeps 64 characters (submit_jobs makes 16)
    if grouped:
        conn.execute(sa.text("UPDATE jobs SET group_id = :group WHERE id = :id"), grouped)


MIGRATIONS: list[tuple[int, str, Callable[[sa.Connection], None]]] = [
    (2, "runs.archived_at", lambda conn: conn.execute(sa.text("ALTER TABLE runs ADD COLUMN archived_at FLOAT"))),
    (3, "reviews.aided, reviews.confidence", _reviews_aided_and_confidence),
    (4, "jobs.group_id (indexed, filled from the jobs' placements)", _jobs_group_id),
]


def _json_dumps(value) -> str:
    # PostgreSQL's json type rejects NaN, which metrics legitimately contain (e.g. an
    # undefined PPV); both backends store null instead.
    return json.dumps(json_safe(value), allow_nan=False, default=str)


def _now() -> float:
    return time.time()


def _row(row) -> dict:
    return dict(row._mapping) if row is not None else None


MIGRATION_LOCK = 0x6D656C72  # PostgreSQL advisory lock key ("melr") held while the schema is created or migrated
REQUEUED = "requeued:"  # how the note of a job put back in the queue after its worker died starts
CLAIM_WINDOW = 200  # queued jobs a worker with an accept filter looks at per claim
GROUP = "group"
"""Key of a job's ``config["placement"]`` naming its sibling group: the jobs of one run trained across
workers (:func:`melcore.jobs.submit_jobs`) share it, :meth:`Store.submit_job` keeps it in the indexed
``jobs.group_id`` column, and :meth:`Store.request_cancel` cancels the jobs of a group together."""
GROUP_FIELDS = ("id", "state", "config", "worker_id", "heartbeat_at", "error", "cancel_requested", "attempts")
"""The fields of each job :meth:`Store.group_jobs` returns."""


def job_group_id(config) -> str | None:
    """The sibling group a job's config names (``config["placement"]["group"]``), or None.

    The value :meth:`Store.submit_job` writes to ``jobs.group_id``.
    """
    placement = (config or {}).get("placement") if isinstance(config, dict) else None
    group = placement.get(GROUP) if isinstance(placement, dict) else None
    return str(group) if group else None


def _shortened(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with an ellipsis (for display names built from parts)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_lengths(table: sa.Table, rows: Iterable[dict], what: str) -> None:
    """MelcoreError naming the field and the limit when a value is longer than its column holds.

    SQLite stores any length, PostgreSQL refuses it with a raw DataError: checking before
    writing gives both backends the same clear message (and a job can be refused when it is
    submitted rather than after it trained). ``rows`` are dicts of column values.
    """
    limits = {
        c.name: c.type.length
        for c in table.columns
        if isinstance(c.type, sa.String) and getattr(c.type, "length", None)
    }
    for row in rows:
        for column, limit in limits.items():
            value = row.get(column)
            if isinstance(value, str) and len(value) > limit:
                field = column.replace("_", " ")
                raise MelcoreError(
                    f"{what}: the {field} is {len(value):,} characters long, more than the "
                    f"{limit} the store keeps; shorten it"
                )


class StoreError(MelcoreError):
    """The store cannot be opened or written (missing folder, read-only file, server down)."""


def _check_data_roots(paths: dict) -> None:
    """MelcoreError unless every given path (``{what: path or None}``) lies inside :func:`settings.data_roots`."""
    roots = settings.data_roots()
    for what, path in paths.items():
        if path is not None and str(path).strip() and inside(path, roots) is None:
            allowed = ", ".join(str(r) for r in roots)
            raise MelcoreError(
                f"{what} {path} is outside the folders datasets may be registered from ({allowed}); "
                "move the data into one of them, or ask the operator to add its folder to "
                "MELREVIEW_DATA_ROOTS"
            )


def _sqlite_pragmas(dbapi_conn, _record):
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()


def _sqlite_begin(conn):
    # Write transactions take the write lock at BEGIN so read-then-write steps
    # (job claims, requeues) cannot interleave; reads stay deferred so they never
    # wait for writers under WAL. pysqlite's own BEGIN handling is switched off.
    immediate = conn.get_execution_options().get("sqlite_immediate", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Store:
    """Access to the melreview database.

    Parameters
    ----------
    url : str, optional
        SQLAlchemy URL. Default :func:`melcore.settings.db_url` (``MELREVIEW_DB_URL`` or
        ``sqlite:///$MELREVIEW_HOME/melreview.db``).
    migrate : bool, default True
        Create the schema or apply pending migrations on open.
    """

    def __init__(self, url: str | None = None, *, migrate: bool = True):
        self.url = url or settings.db_url()
        self.is_sqlite = self.url.startswith("sqlite")
        if self.is_sqlite:
            self.engine = sa.create_engine(
                self.url, connect_args={"timeout": 60, "check_same_thread": False}, json_serializer=_json_dumps
            )
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)

            @sa.event.listens_for(self.engine, "connect")
            def _no_pysqlite_begin(dbapi_conn, _record):
                dbapi_conn.isolation_level = None

            sa.event.listen(self.engine, "begin", _sqlite_begin)
        else:
            self.engine = sa.create_engine(
                self.url, pool_pre_ping=True, pool_size=5, max_overflow=10, json_serializer=_json_dumps
            )
        self._writer = self.engine.execution_options(sqlite_immediate=True)
        if migrate:
            try:
                self.migrate()
            except sa.exc.SQLAlchemyError as exc:
                raise StoreError(self._unusable(exc)) from None

    @contextlib.contextmanager
    def _write(self):
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite); StoreError, in one line, when the database refuses
        it (a read-only file, a folder that is gone, a server that is down)."""
        try:
            with self._writer.begin() as conn:
                yield conn
        except sa.exc.OperationalError as exc:
            raise StoreError(self._unusable(exc)) from None

    def _unusable(self, exc: BaseException) -> str:
        """A one-line message for a store that cannot be opened or written: its URL (password hidden), the reason."""
        reason = getattr(exc, "orig", None) or exc
        reason = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
        where = self.engine.url.render_as_string(hide_password=True)
        hint = (
            "check that its folder exists and that this user may write the file and the folder"
            if self.is_sqlite
            else "check that the server runs and the URL, user and database are right"
        )
        return f"cannot use the store {where}: {reason}; {hint} (MELREVIEW_DB_URL, MELREVIEW_HOME)"

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)!r})"

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ schema
    def version(self) -> int:
        """The schema version of the database (0 when empty)."""
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("schema_version"):
                return 0
            value = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
            return int(value or 0)

    def migrate(self) -> int:
        """Create the schema, or bring an older one up to :data:`SCHEMA_VERSION`; returns the version.

        On PostgreSQL the transaction first takes an advisory lock (:data:`MIGRATION_LOCK`),
        so processes opening one database at the same time (workers on several machines, the
        app) create or migrate the schema one after the other; SQLite's ``BEGIN IMMEDIATE``
        serialises them already.
        """
        with self._write() as conn:
            if not self.is_sqlite:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            if not sa.inspect(conn).has_table("schema_version"):
                metadata.create_all(conn)
                conn.execute(schema_version.insert().values(version=SCHEMA_VERSION, applied_at=_now()))
                return SCHEMA_VERSION
            current = int(conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0)
            if current > SCHEMA_VERSION:
                raise MelcoreError(
                    f"the database at {self.engine.url.render_as_string(hide_password=True)} has schema version "
                    f"{current}, newer than this melreview ({SCHEMA_VERSION}); upgrade melreview"
                )
            for version, _description, step in MIGRATIONS:
                if version > current:
                    step(conn)
                    conn.execute(schema_version.insert().values(version=version, applied_at=_now()))
                    current = version
            return current

    # ---------------------------------------------------------------- datasets
    def add_dataset(
        self,
        name: str,
        csv_path: str | Path,
        images_dir: str | Path | None = None,
        *,
        format: str | None = None,
        clinic_column: str | None = None,
        metadata_path: str | Path | None = None,
        options: dict | None = None,
        summary: dict | None = None,
        is_demo: bool = False,
    ) -> int:
        """Register a dataset by its table (and image folder); returns its id.

        Raises MelcoreError when the name is empty or already taken.
        """
        name = (name or "").strip()
        if not name:
            raise MelcoreError("a dataset needs a name")
        if self.find_dataset(name) is not None:
            raise MelcoreError(f"a dataset named {name!r} already exists; choose another name")
        values = dict(
            name=name,
            csv_path=str(csv_path),
            images_dir=str(images_dir) if images_dir else None,
            format=format,
            clinic_column=clinic_column,
            metadata_path=str(metadata_path) if metadata_path else None,
            options=options or {},
            summary=summary or {},
            is_demo=is_demo,
            created_at=_now(),
        )
        check_lengths(datasets, [values], "dataset not registered")
        with self._write() as conn:
            return int(conn.execute(datasets.insert().values(**values)).inserted_primary_key[0])

    def register_dataset(
        self,
        name: str,
        csv_path: str | Path,
        images_dir: str | Path | None = None,
        *,
        format: str | None = None,
        clinic_column: str | None = None,
        metadata_path: str | Path | None = None,
        is_demo: bool = False,
        **load_options,
    ):
        """Read a dataset with :func:`melcore.cohort.load_cohort` and register it with its summary.

        The stored summary is :meth:`Cohort.summary` plus ``shortcut_audit``
        (:func:`melcore.audit.shortcut_audit`, image attributes read for up to
        :data:`melcore.audit.AUTO_IMAGE_LIMIT` images), whose warnings join ``warnings``.
        Nothing is registered when the table cannot be read (the CohortError propagates).
        Returns ``(dataset_id, cohort)``; the cohort's report holds the loading warnings.
        """
        if self.find_dataset((name or "").strip()) is not None:
            raise MelcoreError(f"a dataset named {name.strip()!r} already exists; choose another name")
        _check_data_roots(
            {
                "label table": csv_path,
                "image folder": images_dir,
                "metadata table": metadata_path,
                "clinic table": load_options.get("clinic_csv"),
            }
        )
        cohort = load_cohort(
            csv_path,
            images_dir,
            format=format,
            clinic_column=clinic_column,
            metadata=metadata_path,
            name=name,
            **load_options,
        )
        # cohort.images_dir is the folder really read: the sub-folder of an ISIC-layout root given as images_dir
        dataset_id = self.add_dataset(
            name,
            Path(csv_path).resolve(),
            cohort.images_dir or (Path(images_dir).resolve() if images_dir else None),
            format=cohort.format,
            clinic_column=clinic_column,
            metadata_path=Path(metadata_path).resolve() if metadata_path else None,
            options=load_options,
            summary=self._summary_with_audit(cohort),
            is_demo=is_demo,
        )
        return dataset_id, cohort

    @staticmethod
    def _summary_with_audit(cohort) -> dict:
        summary = cohort.summary()
        audit = shortcut_audit(cohort, images=bool(audit_images(cohort)))
        return {**summary, "shortcut_audit": audit, "warnings": list(summary["warnings"]) + audit_warnings(audit)}

    def ensure_demo_dataset(self, name: str = "demo") -> int:
        """Register the synthetic demo cohort (made on first use) unless a dataset exists; returns its id."""
        from melcore.demo import ensure_demo

        existing = self.list_datasets()
        if existing:
            demo = [d for d in existing if d["is_demo"]]
            return (demo or existing)[0]["id"]
        folder = ensure_demo()
        try:
            dataset_id, _ = self.register_dataset(name, folder / "labels.csv", folder / "jpeg" / "train", is_demo=True)
        except MelcoreError:
            # Another process registered it between our check and insert.
            return self.get_dataset(name)["id"]
        return dataset_id

    def find_dataset(self, id_or_name: int | str) -> dict | None:
        """The dataset with this id or name, or None."""
        column = datasets.c.id if isinstance(id_or_name, int) else datasets.c.name
        with self.engine.connect() as conn:
            return _row(conn.execute(sa.select(datasets).where(column == id_or_name)).first())

    def get_dataset(self, id_or_name: int | str) -> dict:
        """The dataset with this id or name; MelcoreError naming the known ones otherwise."""
        found = self.find_dataset(id_or_name)
        if found is None:
            known = ", ".join(d["name"] for d in self.list_datasets()) or "none registered"
            raise MelcoreError(f"no dataset {id_or_name!r}; known datasets: {known}")
        return found

    def list_datasets(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(sa.select(datasets).order_by(datasets.c.id))]

    def update_dataset(self, dataset_id: int, **fields) -> None:
        with self._write() as conn:
            conn.execute(datasets.update().where(datasets.c.id == dataset_id).values(**fields))

    def remove_dataset(self, id_or_name: int | str) -> dict:
        """Unregister a dataset; nothing on disk is touched and its runs are kept.

        Refused (MelcoreError naming the jobs) while a job on the dataset is queued or running.
        Its runs (folders, predictions, thresholds, reviews) and finished jobs stay, no longer
        tied to a dataset. Returns ``{"dataset": row, "runs_kept": n, "jobs_kept": n}``.
        """
        dataset = self.get_dataset(id_or_name)
        with self._write() as conn:
            busy = conn.execute(
                sa.select(jobs.c.id, jobs.c.state)
                .where(jobs.c.dataset_id == dataset["id"], jobs.c.state.in_(("queued", "running")))
                .order_by(jobs.c.id)
            ).fetchall()
            if busy:
                listed = ", ".join(f"#{j.id} ({j.state})" for j in busy)
                raise MelcoreError(
                    f"dataset {dataset['name']!r} is not removed: job(s) {listed} are on it; wait "
                    "for them to finish or cancel them (`python -m melcore jobs cancel ID`)"
                )
            runs_kept = conn.execute(
                runs.update().where(runs.c.dataset_id == dataset["id"]).values(dataset_id=None)
            ).rowcount
            jobs_kept = conn.execute(
                jobs.update().where(jobs.c.dataset_id == dataset["id"]).values(dataset_id=None)
            ).rowcount
            conn.execute(datasets.delete().where(datasets.c.id == dataset["id"]))
        return {"dataset": dataset, "runs_kept": int(runs_kept), "jobs_kept": int(jobs_kept)}

    def load_dataset_cohort(self, id_or_name: int | str, **kwargs):
        """Read a registered dataset with :func:`melcore.cohort.load_cohort`."""
        d = self.get_dataset(id_or_name)
        options = dict(d.get("options") or {})
        options.update(kwargs)
        return load_cohort(
            d["csv_path"],
            d["images_dir"],
            format=d["format"],
            clinic_column=d["clinic_column"],
            metadata=d["metadata_path"],
            name=d["name"],
            **options,
        )

    # -------------------------------------------------------------------- runs
    def add_run(
        self,
        name: str,
        run_dir: str | Path | None = None,
        *,
        dataset_id: int | None = None,
        job_id: int | None = None,
        model: str | None = None,
        clinic: str | None = None,
        kind: str = "image",
        config: dict | None = None,
        metrics: dict | None = None,
        threshold: float | None = None,
        from_scratch: bool = False,
        notes: str | None = None,
        predictions: Mapping[str, Any] | None = None,
    ) -> int:
        """Record a finished run; returns its id.

        ``predictions`` ({split: DataFrame}, as :meth:`add_predictions` takes them) are stored in the
        same transaction: the run and its predictions are recorded together or not at all.
        """
        if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
            raise MelcoreError(f"a threshold must lie in [0, 1], got {threshold}")
        values = dict(
            name=name,
            run_dir=str(run_dir) if run_dir else None,
            dataset_id=dataset_id,
            job_id=job_id,
            model=model,
            clinic=clinic,
            kind=kind,
            config=config or {},
            metrics=metrics or {},
            threshold=threshold,
            from_scratch=bool(from_scratch),
            notes=notes,
            created_at=_now(),
        )
        values["name"] = _shortened(name, runs.c.name.type.length)
        check_lengths(runs, [values], "run not recorded")
        rows = {split: _prediction_rows(frame, split) for split, frame in (predictions or {}).items()}
        with self._write() as conn:
            run_id = int(conn.execute(runs.insert().values(**values)).inserted_primary_key[0])
            for split_rows in rows.values():
                _insert_predictions(conn, run_id, split_rows)
            return run_id

    def get_run(self, run_id: int) -> dict:
        with self.engine.connect() as conn:
            found = _row(conn.execute(sa.select(runs).where(runs.c.id == run_id)).first())
        if found is None:
            raise MelcoreError(f"no run with id {run_id}")
        return found

    def list_runs(
        self,
        dataset_id: int | None = None,
        clinic: str | None = None,
        model: str | None = None,
        kind: str | None = None,
        archived: bool | None = False,
    ) -> list[dict]:
        """Runs, newest first, optionally filtered; ``archived``: False (default) the active runs only,
        True the archived ones only, None both."""
        query = sa.select(runs).order_by(runs.c.id.desc())
        for column, value in (
            (runs.c.dataset_id, dataset_id),
            (runs.c.clinic, clinic),
            (runs.c.model, model),
            (runs.c.kind, kind),
        ):
            if value is not None:
                query = query.where(column == value)
        if archived is not None:
            query = query.where(runs.c.archived_at.is_not(None) if archived else runs.c.archived_at.is_(None))
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(query)]

    def update_run(self, run_id: int, **fields) -> None:
        with self._write() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(**fields))

    def archive_run(self, run_id: int, archived: bool = True) -> None:
        """Hide a run from the pages' run lists (``archived=False`` brings it back).

        Nothing is deleted: its folder, predictions, saved threshold and every review stay,
        and :meth:`get_run` still finds it.
        """
        self.get_run(run_id)
        self.update_run(run_id, archived_at=_now() if archived else None)

    def set_threshold(self, run_id: int, value: float) -> None:
        """Save the decision threshold chosen for a run (used by the Review page)."""
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise MelcoreError(f"a threshold must lie in [0, 1], got {value}")
        self.get_run(run_id)
        self.update_run(run_id, threshold=value)

    # ------------------------------------------------------------- predictions
    def add_predictions(self, run_id: int, frame, split: str = "val") -> int:
        """Store a run's predictions; returns the number of rows.

        ``frame`` is a DataFrame with image_name and prediction (probability in
        [0, 1]) and optionally patient_id, clinic, target. Replaces earlier rows of
        the same run and split.
        """
        rows = _prediction_rows(frame, split)
        with self._write() as conn:
            conn.execute(predictions.delete().where(predictions.c.run_id == run_id, predictions.c.split == split))
            _insert_predictions(conn, run_id, rows)
        return len(rows)

    def get_predictions(self, run_id: int, split: str | None = None):
        """A run's predictions as a DataFrame (image_name, patient_id, clinic, target, prediction, split)."""
        import pandas as pd

        query = (
            sa.select(
                predictions.c.image_name,
                predictions.c.patient_id,
                predictions.c.clinic,
                predictions.c.target,
                predictions.c.prediction,
                predictions.c.split,
            )
            .where(predictions.c.run_id == run_id)
            .order_by(predictions.c.id)
        )
        if split is not None:
            query = query.where(predictions.c.split == split)
        with self.engine.connect() as conn:
            result = conn.execute(query)
            frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
        frame["target"] = frame["target"].astype("Int8")
        return frame

    def prediction_counts(self, run_ids: Iterable[int]) -> dict[int, tuple[int, int]]:
        """``{run_id: (number of stored predictions, largest row id)}`` for the runs that have any.

        The pair changes whenever a run's predictions are replaced, so it is a cheap
        cache key for a run's scores.
        """
        ids = sorted({int(r) for r in run_ids})
        if not ids:
            return {}
        query = (
            sa.select(predictions.c.run_id, sa.func.count(), sa.func.max(predictions.c.id))
            .where(predictions.c.run_id.in_(ids))
            .group_by(predictions.c.run_id)
        )
        with self.engine.connect() as conn:
            return {int(run_id): (int(count), int(last)) for run_id, count, last in conn.execute(query)}

    def predictions_for_image(self, image_name: str, run_ids: Iterable[int]):
        """Every stored score of one image by the given runs: DataFrame run_id, split, prediction, image_name."""
        import pandas as pd

        ids = sorted({int(r) for r in run_ids})
        columns = ["run_id", "split", "prediction", "image_name"]
        if not ids:
            return pd.DataFrame(columns=columns)
        query = (
            sa.select(predictions.c.run_id, predictions.c.split, predictions.c.prediction, predictions.c.image_name)
            .where(predictions.c.image_name == str(image_name), predictions.c.run_id.in_(ids))
            .order_by(predictions.c.id)
        )
        with self.engine.connect() as conn:
            return pd.DataFrame(conn.execute(query).fetchall(), columns=columns)

    # -------------------------------------------------------------------- jobs
    def submit_job(
        self, config: dict, dataset_id: int | None = None, kind: str = "train", max_attempts: int = 3
    ) -> int:
        """Queue a job; returns its id.

        A config whose placement names a sibling group (:data:`GROUP`) files the job in that
        group (``jobs.group_id``). MelcoreError when the run it would record cannot be stored
        (a model or clinic name longer than the runs table keeps) or the group id is longer
        than the jobs table keeps, so the job is refused before it trains.
        """
        check_lengths(runs, [{"model": config.get("model"), "clinic": config.get("clinic")}], "job not queued")
        group_id = job_group_id(config)
        check_lengths(jobs, [{"group_id": group_id}], "job not queued")
        with self._write() as conn:
            result = conn.execute(
                jobs.insert().values(
                    kind=kind,
                    dataset_id=dataset_id,
                    config=config,
                    group_id=group_id,
                    state="queued",
                    cancel_requested=False,
                    attempts=0,
                    max_attempts=max_attempts,
                    created_at=_now(),
                    progress={},
                    history=[],
                )
            )
            return int(result.inserted_primary_key[0])

    def claim_job(self, worker_id: str | None = None, accept: Callable[[dict], bool] | None = None) -> dict | None:
        """Atomically take the oldest queued job for this worker; None when the queue is empty.

        PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED``; SQLite: the same select
        and a guarded UPDATE inside a ``BEGIN IMMEDIATE`` transaction. Either way
        two workers can never claim the same job. ``accept({"id", "kind", "config"})``,
        when given, passes over the jobs this worker cannot run (e.g. a job placed on
        another machine); the oldest of the next :data:`CLAIM_WINDOW` queued jobs it accepts is taken.
        """
        worker_id = worker_id or default_worker_id()
        token = uuid.uuid4().hex
        now = _now()
        with self._write() as conn:
            query = (
                sa.select(jobs.c.id, jobs.c.kind, jobs.c.config)
                .where(jobs.c.state == "queued")
                .order_by(jobs.c.id)
                .limit(1 if accept is None else CLAIM_WINDOW)
            )
            if not self.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            job_id = next(
                (
                    row.id
                    for row in conn.execute(query).fetchall()
                    if accept is None or accept({"id": row.id, "kind": row.kind, "config": row.config})
                ),
                None,
            )
            if job_id is None:
                return None
            claimed = conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.state == "queued")
                .values(
                    state="running",
                    worker_id=worker_id,
                    claim_token=token,
                    attempts=jobs.c.attempts + 1,
                    started_at=now,
                    heartbeat_at=now,
                )
            )
            if claimed.rowcount != 1:
                return None
            return _row(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first())

    def heartbeat(
        self, job_id: int, claim_token: str, progress: dict | None = None, history_point: dict | None = None
    ) -> bool:
        """Record that the job's worker is alive (and its progress).

        Returns True when the job was cancelled (the worker should stop), and raises
        MelcoreError when the job no longer belongs to this claim (it was requeued).
        """
        values: dict[str, Any] = {"heartbeat_at": _now()}
        if progress is not None:
            values["progress"] = progress
        with self._write() as conn:
            row = conn.execute(
                sa.select(jobs.c.claim_token, jobs.c.cancel_requested, jobs.c.history).where(jobs.c.id == job_id)
            ).first()
            if row is None or row.claim_token != claim_token:
                raise MelcoreError(f"job {job_id} is no longer held by this worker")
            if history_point is not None:
                values["history"] = list(row.history or []) + [history_point]
            conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.claim_token == claim_token).values(**values))
            return bool(row.cancel_requested)

    def request_cancel(self, job_id: int) -> str:
        """Cancel a job: a queued job is cancelled at once, a running one at its next batch.

        A job of a sibling group (:data:`GROUP`: one run trained across workers) is cancelled
        with every other queued or running job of its group, in the same transaction: the
        workers of a group train together, and none can go on without the others.
        Returns the job's state after the request.
        """
        with self._write() as conn:
            job = conn.execute(sa.select(jobs.c.group_id).where(jobs.c.id == job_id)).first()
            if job is None:
                raise MelcoreError(f"no job with id {job_id}")
            members = _members(job_id, job.group_id)
            conn.execute(
                jobs.update()
                .where(members, jobs.c.state == "queued")
                .values(state="cancelled", cancel_requested=True, finished_at=_now())
            )
            conn.execute(jobs.update().where(members, jobs.c.state == "running").values(cancel_requested=True))
            return conn.execute(sa.select(jobs.c.state).where(jobs.c.id == job_id)).scalar()

    def group_jobs(self, job_id: int) -> list[dict]:
        """The jobs of ``job_id``'s sibling group (:data:`GROUP`), itself included, by id.

        Each is a dict of :data:`GROUP_FIELDS`; a job without a group is its only member.
        MelcoreError when there is no job ``job_id``.
        """
        with self.engine.connect() as conn:
            members = [dict(row._mapping) for row in self._group_rows(conn, job_id)]
        if not members:
            raise MelcoreError(f"no job with id {job_id}")
        return members

    @staticmethod
    def _group_rows(conn: sa.Connection, job_id: int) -> list:
        """Rows (:data:`GROUP_FIELDS`) of ``job_id`` and its siblings, by id; [] when there is no such job."""
        job = conn.execute(sa.select(jobs.c.group_id).where(jobs.c.id == job_id)).first()
        if job is None:
            return []
        columns = [jobs.c[name] for name in GROUP_FIELDS]
        return conn.execute(sa.select(*columns).where(_members(job_id, job.group_id)).order_by(jobs.c.id)).fetchall()

    def is_cancel_requested(self, job_id: int) -> bool:
        with self.engine.connect() as conn:
            return bool(conn.execute(sa.select(jobs.c.cancel_requested).where(jobs.c.id == job_id)).scalar())

    def finish_job(
        self,
        job_id: int,
        claim_token: str,
        state: str,
        *,
        run_id: int | None = None,
        error: str | None = None,
        log: str | None = None,
    ) -> bool:
        """Record a job's ending (done, cancelled or failed); False when the claim was lost.

        Without an ``error``, a note left by :meth:`requeue_stale` stays, so a job that
        succeeded on its second attempt still says its first worker died.
        """
        if state not in ("done", "cancelled", "failed"):
            raise MelcoreError(f"a job ends as done, cancelled or failed, not {state!r}")
        with self._write() as conn:
            result = conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.claim_token == claim_token, jobs.c.state == "running")
                .values(
                    state=state,
                    run_id=run_id,
                    log=log,
                    finished_at=_now(),
                    error=error
                    if error is not None
                    else sa.case((jobs.c.error.like(REQUEUED + "%"), jobs.c.error), else_=None),
                )
            )
            return result.rowcount == 1

    def requeue_stale(self, stale_after: float = 60.0) -> list[dict]:
        """Recover jobs whose worker stopped beating (killed, machine lost).

        A running job whose heartbeat is older than ``stale_after`` seconds goes back
        to the queue while it has attempts left, and otherwise fails with the reason.
        A requeued job starts again from an empty curve (the dead attempt's points and
        progress are dropped) and keeps the "requeued" note when the retry succeeds
        (:meth:`finish_job`); the dead worker's row leaves ``workers``. Returns the jobs
        acted on as dicts with id and the new state.
        """
        cutoff = _now() - stale_after
        acted = []
        with self._write() as conn:
            query = sa.select(
                jobs.c.id,
                jobs.c.attempts,
                jobs.c.max_attempts,
                jobs.c.worker_id,
                jobs.c.cancel_requested,
                jobs.c.claim_token,
            ).where(jobs.c.state == "running", jobs.c.heartbeat_at < cutoff)
            if not self.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            for job in conn.execute(query).fetchall():
                guard = (jobs.c.id == job.id) & (jobs.c.claim_token == job.claim_token)
                if job.cancel_requested:
                    values = dict(
                        state="cancelled",
                        finished_at=_now(),
                        claim_token=None,
                        error=f"worker {job.worker_id} stopped responding after the cancel request",
                    )
                elif job.attempts < job.max_attempts:
                    values = dict(
                        state="queued",
                        worker_id=None,
                        claim_token=None,
                        history=[],
                        progress={},
                        error=f"{REQUEUED} worker {job.worker_id} stopped responding "
                        f"(attempt {job.attempts} of {job.max_attempts})",
                    )
                else:
                    values = dict(
                        state="failed",
                        finished_at=_now(),
                        claim_token=None,
                        error=f"failed: worker {job.worker_id} stopped responding on the last of "
                        f"{job.max_attempts} attempts",
                    )
                if conn.execute(jobs.update().where(guard).values(**values)).rowcount == 1:
                    acted.append({"id": job.id, "state": values["state"]})
                    if job.worker_id:
                        conn.execute(workers.delete().where(workers.c.worker_id == job.worker_id))
        return acted

    def get_job(self, job_id: int) -> dict:
        with self.engine.connect() as conn:
            found = _row(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first())
        if found is None:
            raise MelcoreError(f"no job with id {job_id}")
        return found

    def list_jobs(self, states: Iterable[str] | None = None, limit: int | None = None) -> list[dict]:
        """Jobs, newest first."""
        query = sa.select(jobs).order_by(jobs.c.id.desc())
        if states is not None:
            query = query.where(jobs.c.state.in_(list(states)))
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(query)]

    def update_job(self, job_id: int, **fields) -> None:
        with self._write() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(**fields))

    # ----------------------------------------------------------------- workers
    def worker_beat(self, worker_id: str, job_id: int | None = None) -> None:
        """Record that a worker process is alive (idle or on ``job_id``)."""
        now = _now()
        host, _, rest = worker_id.partition(":")
        pid = int(rest.split(":")[0]) if rest.split(":")[0].isdigit() else None
        with self._write() as conn:
            updated = conn.execute(
                workers.update().where(workers.c.worker_id == worker_id).values(beat_at=now, job_id=job_id)
            ).rowcount
            if not updated:
                conn.execute(
                    workers.insert().values(
                        worker_id=worker_id, host=host, pid=pid, started_at=now, beat_at=now, job_id=job_id
                    )
                )

    def worker_gone(self, worker_id: str) -> None:
        with self._write() as conn:
            conn.execute(workers.delete().where(workers.c.worker_id == worker_id))

    def live_workers(self, within: float = 30.0) -> list[dict]:
        """Workers whose last beat is at most ``within`` seconds old."""
        with self.engine.connect() as conn:
            return [
                _row(r)
                for r in conn.execute(
                    sa.select(workers).where(workers.c.beat_at >= _now() - within).order_by(workers.c.started_at)
                )
            ]

    # ----------------------------------------------------------------- reviews
    def add_review(
        self,
        run_id: int,
        image_name: str,
        reviewer: str,
        decision: str,
        note: str = "",
        *,
        aided: bool = True,
        confidence: int | float | None = None,
    ) -> int:
        """Append a reviewer's decision on a lesion; earlier decisions stay in the history.

        ``aided`` is False for a blinded read (the model's risk, rank and Grad-CAM hidden);
        ``confidence`` is the reader's malignancy confidence, a whole number 0-100, or None.
        """
        reviewer = (reviewer or "").strip()
        if not reviewer:
            raise MelcoreError("a review needs the reviewer's name")
        if decision not in DECISIONS:
            raise MelcoreError(f"unknown decision {decision!r}; choose one of {', '.join(DECISIONS)}")
        values = dict(
            run_id=run_id,
            image_name=str(image_name),
            reviewer=reviewer,
            decision=decision,
            note=note or "",
            created_at=_now(),
            aided=bool(aided),
            confidence=check_confidence(confidence),
        )
        check_lengths(reviews, [values], "decision not saved")
        with self._write() as conn:
            result = conn.execute(reviews.insert().values(**values))
            return int(result.inserted_primary_key[0])

    def review_history(self, run_id: int, image_name: str | None = None):
        """Every review of a run (or of one lesion), oldest first, as a DataFrame."""
        import pandas as pd

        query = sa.select(reviews).where(reviews.c.run_id == run_id).order_by(reviews.c.id)
        if image_name is not None:
            query = query.where(reviews.c.image_name == image_name)
        with self.engine.connect() as conn:
            result = conn.execute(query)
            return pd.DataFrame(result.fetchall(), columns=list(result.keys()))

    def latest_reviews(self, run_id: int):
        """The current decision per lesion of a run (the latest entry of each history)."""
        history = self.review_history(run_id)
        if history.empty:
            return history
        return history.sort_values("id").groupby("image_name", as_index=False).tail(1).reset_index(drop=True)


def _members(job_id: int, group_id: str | None) -> sa.ColumnElement[bool]:
    """The condition selecting job ``job_id``'s sibling group (``jobs.group_id``), or the job alone without one."""
    return jobs.c.group_id == group_id if group_id is not None else jobs.c.id == job_id


def _prediction_rows(frame, split: str) -> list[dict]:
    """The rows of a predictions DataFrame as the ``predictions`` table stores them (without run_id), checked."""
    missing = {"image_name", "prediction"} - set(frame.columns)
    if missing:
        raise MelcoreError(f"predictions need columns {sorted(missing)}; found {list(frame.columns)}")
    rows = []
    for rec in frame.to_dict("records"):
        target = rec.get("target")
        rows.append(
            dict(
                split=split,
                image_name=str(rec["image_name"]),
                patient_id=_str_or_none(rec.get("patient_id")),
                clinic=_str_or_none(rec.get("clinic")),
                target=None if _is_missing(target) else int(target),
                prediction=float(rec["prediction"]),
            )
        )
    check_lengths(predictions, rows, "predictions not stored")
    return rows


def _insert_predictions(conn: sa.Connection, run_id: int, rows: list[dict]) -> None:
    for start in range(0, len(rows), 5000):
        conn.execute(predictions.insert(), [{**row, "run_id": run_id} for row in rows[start : start + 5000]])


def check_confidence(value) -> int | None:
    """A malignancy confidence as a whole number 0-100 (None stays None); MelcoreError otherwise."""
    if _is_missing(value):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MelcoreError(f"the confidence must be a number from 0 to 100, got {value!r}") from None
    if not (math.isfinite(number) and 0 <= number <= 100 and number == int(number)):
        raise MelcoreError(
            f"the confidence must be a whole number from 0 (surely benign) to 100 (surely melanoma), got {value!r}"
        )
    return int(number)


def default_worker_id() -> str:
    """``host:pid:thread`` — unique among live workers on every machine sharing the database."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def _is_missing(value) -> bool:
    if value is None:
        return True
    try:
        import pandas as pd

        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _str_or_none(value) -> str | None:
    return None if _is_missing(value) else str(value)
