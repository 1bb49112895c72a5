"""Registering, describing and removing datasets: what the Home page and ``python -m melcore datasets`` share.

A dataset is a lesion table (and its image folder) registered by name in the store. Registration
reads the table with :func:`melcore.cohort.load_cohort`, runs the shortcut audit and stores the
summary (:meth:`melcore.store.Store.register_dataset`); the checks (a name and a table given, the
name free, every path inside :func:`melcore.settings.data_roots`, a readable table) and the warnings
(missing or unreadable images, dropped rows, shortcut attributes) are the same whoever registers.
An ISIC-layout root (a folder holding ``jpeg/train/`` or ``train/``) is accepted as the image folder;
the folder actually used is stored and named in :attr:`Registration.notes`.

Removing a dataset only unregisters it: images, tables and runs stay (see
:meth:`melcore.store.Store.remove_dataset`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from melcore.errors import MelcoreError

DEMO_NAME = "demo"
"""The name the synthetic demo cohort is registered under."""

RECORD_FIELDS = (
    "id",
    "name",
    "csv_path",
    "images_dir",
    "format",
    "clinic_column",
    "metadata_path",
    "is_demo",
    "created_at",
    "n_images",
    "n_lesions",
    "n_patients",
    "n_malignant",
    "n_benign",
    "n_unlabelled",
    "n_missing_images",
    "n_unreadable_images",
    "grouping",
    "clinics",
    "warnings",
    "runs",
    "jobs",
)
"""Fields of :func:`dataset_record` (the JSON of ``datasets list`` and ``datasets show``), in order."""


@dataclass
class Registration:
    """What registering a dataset did.

    Attributes
    ----------
    dataset : dict
        The stored dataset row (``summary`` holds the counts, warnings and shortcut audit).
    cohort : melcore.cohort.Cohort
        The table as read.
    warnings : list of str
        Every warning, to be shown: the table's (missing, unreadable images, dropped rows...)
        followed by the shortcut audit's.
    notes : list of str
        What was chosen without being a problem (e.g. the image folder used inside an ISIC-layout root).
    created : bool
        False when the dataset was already registered (only :func:`register_demo`).
    """

    dataset: dict
    cohort: object = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    created: bool = True

    @property
    def shortcut_audit(self) -> list[dict]:
        return (self.dataset.get("summary") or {}).get("shortcut_audit") or []


def _text(value) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


def register_dataset(
    store,
    name: str,
    csv_path,
    images_dir=None,
    *,
    format: str | None = None,
    clinic_column: str | None = None,
    metadata_path=None,
    is_demo: bool = False,
) -> Registration:
    """Check, read and register a dataset; MelcoreError (nothing registered) when any check fails.

    Parameters
    ----------
    store : melcore.store.Store
    name : str
        Name to register under (surrounding spaces are dropped); must be free.
    csv_path : path
        The label table, or with ``format="folders"`` the folder of class folders.
    images_dir : path, optional
        The image folder, or an ISIC-layout root holding ``jpeg/train/`` or ``train/``; default: looked up
        beside the table.
    format : str, optional
        A :data:`melcore.cohort.FORMATS` name; None or ``"auto"``: detected from the header.
    clinic_column, metadata_path : optional
        Column naming the clinic; a second table joined on the image name.
    """
    name, csv_path = _text(name), _text(csv_path)
    if name is None or csv_path is None:
        raise MelcoreError("give the dataset a name and the path of its label table")
    format = _text(format)
    dataset_id, cohort = store.register_dataset(
        name,
        csv_path,
        _text(images_dir),
        format=None if format == "auto" else format,
        clinic_column=_text(clinic_column),
        metadata_path=_text(metadata_path),
        is_demo=is_demo,
    )
    dataset = store.get_dataset(dataset_id)
    return Registration(
        dataset=dataset,
        cohort=cohort,
        warnings=list(dataset["summary"].get("warnings") or []),
        notes=list(cohort.report.notes),
    )


def register_demo(store, folder=None, name: str = DEMO_NAME) -> Registration:
    """Register the synthetic demo cohort under ``name`` unless a demo dataset of that folder is registered.

    ``folder`` is a demo cohort written by :func:`melcore.demo.make_demo_cohort` (default: the shared
    demo under ``MELREVIEW_HOME``, made on first use, as the app does on a fresh install).
    """
    from melcore.demo import ensure_demo

    folder = Path(folder).expanduser().resolve() if folder is not None else ensure_demo()
    csv_path = folder / "labels.csv"
    existing = store.find_dataset(name)
    if existing is not None:
        if existing.get("is_demo") and Path(existing["csv_path"]) == csv_path:
            return Registration(
                dataset=existing, warnings=list((existing.get("summary") or {}).get("warnings") or []), created=False
            )
        raise MelcoreError(
            f"a dataset named {name!r} already exists (table {existing['csv_path']}); choose "
            "another name, or remove it first (`python -m melcore datasets remove "
            f"{name}`)"
        )
    try:
        return register_dataset(store, name, csv_path, folder / "jpeg" / "train", is_demo=True)
    except MelcoreError:
        again = store.find_dataset(name)  # another process registered it between the check and the insert
        if again is None or not again.get("is_demo"):
            raise
        return Registration(dataset=again, created=False)


def ensure_first_dataset(store) -> Registration | None:
    """On a fresh install (no dataset registered), make and register the demo cohort; None otherwise."""
    if store.list_datasets():
        return None
    return register_demo(store)


def find_or_register_demo(store, id_or_name) -> dict:
    """The dataset ``id_or_name`` (a name, or an id when all digits); the demo name registers the demo when absent.

    So ``jobs submit --dataset demo`` works on a fresh home as the app does. MelcoreError naming the
    registered datasets for any other unknown name.
    """
    value = str(id_or_name)
    key = int(value) if value.isdigit() else value
    found = store.find_dataset(key)
    if found is None and key == DEMO_NAME:
        return register_demo(store).dataset
    return store.get_dataset(key)


def remove_dataset(store, id_or_name) -> dict:
    """Unregister a dataset (:meth:`melcore.store.Store.remove_dataset`); returns what was kept.

    Never deletes images, tables or runs; refused while a job on it is queued or running.
    """
    value = str(id_or_name)
    return store.remove_dataset(int(value) if value.isdigit() else value)


def dataset_record(store, dataset: dict, *, detail: bool = False) -> dict:
    """A dataset as plain JSON values: :data:`RECORD_FIELDS` (plus ``options``, ``notes`` and
    ``shortcut_audit`` when ``detail``).

    ``runs`` counts its recorded runs (archived included); ``jobs`` counts its jobs by state.
    """
    summary = dataset.get("summary") or {}
    jobs: dict[str, int] = {}
    for job in store.list_jobs():
        if job.get("dataset_id") == dataset["id"]:
            jobs[job["state"]] = jobs.get(job["state"], 0) + 1
    record = {
        **{key: dataset.get(key) for key in RECORD_FIELDS[:9]},
        **{key: summary.get(key) for key in RECORD_FIELDS[9:20]},
        "runs": len(store.list_runs(dataset_id=dataset["id"], archived=None)),
        "jobs": jobs,
    }
    record["is_demo"] = bool(record["is_demo"])
    record["warnings"] = list(record["warnings"] or [])
    record["clinics"] = dict(record["clinics"] or {})
    if detail:
        record.update(
            options=dataset.get("options") or {},
            notes=list(summary.get("notes") or []),
            shortcut_audit=summary.get("shortcut_audit") or [],
        )
    return record
