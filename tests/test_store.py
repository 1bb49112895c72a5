"""Store round trips, migrations, job claims and the review audit trail, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest
import sqlalchemy as sa

from melcore import store as store_module
from melcore.errors import MelcoreError
from melcore.store import Store


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    yield s
    s.close()


def test_default_store_is_sqlite_in_wal_mode_under_home(melreview_home):
    s = Store()
    assert s.is_sqlite
    assert (melreview_home / "melreview.db").exists()
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_db_url_environment_selects_the_database(monkeypatch, tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MELREVIEW_DB_URL", url)
    s = Store()
    assert s.url == url
    assert (tmp_path / "elsewhere.db").exists()


def test_dataset_round_trip(store, tmp_path):
    dataset_id = store.add_dataset(
        "isic",
        tmp_path / "train.csv",
        tmp_path / "jpeg",
        format="isic2020",
        clinic_column="clinic",
        summary={"n_images": 3, "clinics": {"a": 2, "b": 1}},
    )
    found = store.get_dataset("isic")
    assert found["id"] == dataset_id
    assert found["summary"] == {"n_images": 3, "clinics": {"a": 2, "b": 1}}
    assert store.get_dataset(dataset_id)["images_dir"] == str(tmp_path / "jpeg")
    with pytest.raises(MelcoreError, match="already exists"):
        store.add_dataset("isic", tmp_path / "other.csv")
    with pytest.raises(MelcoreError, match="known datasets: isic"):
        store.get_dataset("nope")


def test_runs_predictions_and_threshold(store, tmp_path):
    dataset_id = store.add_dataset("d", tmp_path / "t.csv")
    run_id = store.add_run(
        "cnn on d",
        tmp_path / "run",
        dataset_id=dataset_id,
        model="basic-cnn",
        clinic="north",
        config={"epochs": 2},
        metrics={"val_auroc": 0.8},
        from_scratch=True,
    )
    frame = pd.DataFrame(
        {
            "image_name": ["a", "b", "c"],
            "patient_id": ["p1", "p1", None],
            "clinic": ["north"] * 3,
            "target": pd.array([1, 0, None], dtype="Int8"),
            "prediction": [0.9, 0.2, 0.5],
        }
    )
    assert store.add_predictions(run_id, frame) == 3
    back = store.get_predictions(run_id)
    assert back["image_name"].tolist() == ["a", "b", "c"]
    assert back["target"].isna().tolist() == [False, False, True]
    assert back["prediction"].tolist() == pytest.approx([0.9, 0.2, 0.5])
    store.add_predictions(run_id, frame.iloc[:1])  # replaces the same split
    assert len(store.get_predictions(run_id, split="val")) == 1
    store.set_threshold(run_id, 0.3)
    run = store.get_run(run_id)
    assert run["threshold"] == pytest.approx(0.3) and run["from_scratch"] is True
    assert run["metrics"] == {"val_auroc": 0.8}
    assert [r["id"] for r in store.list_runs(clinic="north")] == [run_id]
    assert store.list_runs(clinic="south") == []
    with pytest.raises(MelcoreError, match=r"\[0, 1\]"):
        store.set_threshold(run_id, 1.5)
    with pytest.raises(MelcoreError, match="columns"):
        store.add_predictions(run_id, pd.DataFrame({"image_name": ["x"]}))


def test_a_run_and_its_predictions_are_recorded_together_or_not_at_all(store, tmp_path):
    good = pd.DataFrame({"image_name": ["a", "b"], "target": [1, 0], "prediction": [0.7, 0.1]})
    run_id = store.add_run("r", tmp_path, threshold=0.25, predictions={"val": good, "oof": good.iloc[:1]})
    assert store.get_run(run_id)["threshold"] == pytest.approx(0.25)
    assert store.get_predictions(run_id).groupby("split").size().to_dict() == {"oof": 1, "val": 2}
    overlong = pd.DataFrame({"image_name": ["x" * 5000], "prediction": [0.5]})
    for predictions, message in (
        ({"val": good, "oof": overlong}, "predictions not stored: the image name is 5,000"),
        ({"val": good.drop(columns="prediction")}, "predictions need columns"),
    ):
        with pytest.raises(MelcoreError, match=message):
            store.add_run("half", tmp_path, predictions=predictions)
    with pytest.raises(MelcoreError, match=r"a threshold must lie in \[0, 1\], got 2"):
        store.add_run("bad threshold", tmp_path, threshold=2)
    assert [r["id"] for r in store.list_runs(archived=None)] == [run_id]
    assert len(store.get_predictions(run_id + 1)) == 0


def test_job_lifecycle_claim_progress_cancel_finish(store):
    first = store.submit_job({"model": "basic-cnn"})
    second = store.submit_job({"model": "cnn-bn"})
    job = store.claim_job("w1")
    assert job["id"] == first and job["state"] == "running" and job["attempts"] == 1
    assert store.heartbeat(first, job["claim_token"], progress={"epoch": 1}, history_point={"loss": 0.5}) is False
    assert store.request_cancel(first) == "running"
    assert store.heartbeat(first, job["claim_token"]) is True
    assert store.finish_job(first, job["claim_token"], "cancelled")
    assert store.get_job(first)["history"] == [{"loss": 0.5}]
    assert store.request_cancel(second) == "cancelled"  # queued: cancelled at once
    assert store.claim_job("w1") is None
    with pytest.raises(MelcoreError, match="done, cancelled or failed"):
        store.finish_job(first, job["claim_token"], "exploded")


def _placed(index: int, group: str | None, workers=("a.example:2222", "b.example:2222", "c.example:2222")) -> dict:
    placement = {"workers": list(workers), "index": index, **({store_module.GROUP: group} if group else {})}
    return {"model": "basic-cnn", "placement": placement}


def test_cancelling_one_job_of_a_group_cancels_its_siblings_and_no_other_job(store):
    siblings = [store.submit_job(_placed(i, "g1")) for i in range(3)]
    other_group = store.submit_job(_placed(0, "g2"))
    plain = store.submit_job({"model": "basic-cnn"})
    ungrouped = store.submit_job(_placed(1, None))  # queued before groups existed: acts alone
    chief = store.claim_job("w1")
    assert chief["id"] == siblings[0]
    assert [j["id"] for j in store.group_jobs(siblings[2])] == siblings
    assert [j["id"] for j in store.group_jobs(plain)] == [plain]
    assert store.request_cancel(siblings[2]) == "cancelled"
    states = {i: store.get_job(i) for i in siblings}
    assert (states[siblings[0]]["state"], states[siblings[0]]["cancel_requested"]) == ("running", True)
    assert [states[i]["state"] for i in siblings[1:]] == ["cancelled", "cancelled"]
    assert store.heartbeat(chief["id"], chief["claim_token"]) is True  # the running worker hears it
    assert {store.get_job(i)["state"] for i in (other_group, plain, ungrouped)} == {"queued"}
    assert store.request_cancel(ungrouped) == "cancelled"
    assert store.get_job(other_group)["state"] == "queued"
    with pytest.raises(MelcoreError, match="no job with id 999"):
        store.group_jobs(999)


def test_stale_jobs_are_requeued_then_failed(store):
    job_id = store.submit_job({"model": "basic-cnn"}, max_attempts=2)
    for attempt in (1, 2):
        job = store.claim_job(f"w{attempt}")
        assert job["attempts"] == attempt
        store.update_job(job_id, heartbeat_at=0.0)  # the worker died long ago
        acted = store.requeue_stale(stale_after=30)
        assert acted == [{"id": job_id, "state": "queued" if attempt == 1 else "failed"}]
        with pytest.raises(MelcoreError, match="no longer held"):
            store.heartbeat(job_id, job["claim_token"])
    final = store.get_job(job_id)
    assert final["state"] == "failed" and "stopped responding" in final["error"]


def test_concurrent_claims_never_share_a_job(store):
    ids = [store.submit_job({"i": i}) for i in range(40)]
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name):
        while (job := store.claim_job(name)) is not None:
            with lock:
                claimed.append(job["id"])

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == ids


def test_reviews_append_and_latest(store, tmp_path):
    run_id = store.add_run("r", tmp_path)
    store.add_review(run_id, "img1", "Dr A", "agree", "looks benign")
    store.add_review(run_id, "img1", "Dr A", "biopsy", "changed my mind")
    store.add_review(run_id, "img2", "Dr B", "unsure")
    history = store.review_history(run_id, "img1")
    assert history["decision"].tolist() == ["agree", "biopsy"]
    latest = store.latest_reviews(run_id).set_index("image_name")
    assert latest.loc["img1", "decision"] == "biopsy" and latest.loc["img2", "reviewer"] == "Dr B"
    with pytest.raises(MelcoreError, match="reviewer"):
        store.add_review(run_id, "img1", "  ", "agree")
    with pytest.raises(MelcoreError, match="choose one of agree"):
        store.add_review(run_id, "img1", "Dr A", "maybe")


def test_eight_reviewers_writing_at_once_lose_nothing(db_url, tmp_path):
    setup = Store(db_url)
    run_id = setup.add_run("r", tmp_path)
    per_reviewer = 500
    errors: list[BaseException] = []

    def reviewer(index):
        try:
            s = Store(db_url)
            for k in range(per_reviewer):
                s.add_review(run_id, f"img{k % 50}", f"reviewer {index}", "agree", f"note {k}")
            s.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=reviewer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    history = setup.review_history(run_id)
    assert len(history) == 8 * per_reviewer
    assert history.groupby("reviewer").size().eq(per_reviewer).all()


def test_migration_from_an_older_schema_keeps_data(db_url, tmp_path, monkeypatch):
    old = Store(db_url)
    dataset_id = old.add_dataset("kept", tmp_path / "t.csv")
    old.add_run("kept run", tmp_path, dataset_id=dataset_id)
    old.close()

    def add_tags(conn):
        conn.execute(sa.text("ALTER TABLE runs ADD COLUMN tags TEXT"))

    future = store_module.SCHEMA_VERSION + 1
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", future)
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS + [(future, "runs.tags", add_tags)])
    upgraded = Store(db_url)
    assert upgraded.version() == future
    assert upgraded.get_dataset("kept")["id"] == dataset_id
    with upgraded.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT name, tags FROM runs")).all() == [("kept run", None)]
    upgraded.close()
    assert Store(db_url).version() == future  # re-opening applies nothing twice


def test_a_newer_database_is_refused(db_url, monkeypatch):
    Store(db_url).close()
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 0)
    with pytest.raises(MelcoreError, match="newer than this melreview"):
        Store(db_url)


def test_json_columns_store_nan_and_numpy_values_as_plain_json(store, tmp_path):
    import numpy as np

    metrics = {
        "auroc": float("nan"),
        "ppv": float("inf"),
        "n": np.int64(3),
        "curve": np.array([0.5, 1.0]),
        "nested": [{"x": float("nan")}],
    }
    run_id = store.add_run("r", tmp_path, metrics=metrics)
    assert store.get_run(run_id)["metrics"] == {
        "auroc": None,
        "ppv": None,
        "n": 3,
        "curve": [0.5, 1.0],
        "nested": [{"x": None}],
    }


def _drop_jobs_group_id(conn) -> None:
    """The jobs table as melreview before schema version 4 made it: no group_id column, no index on it."""
    conn.execute(sa.text("DROP INDEX ix_jobs_group_id"))
    conn.execute(sa.text("ALTER TABLE jobs DROP COLUMN group_id"))


def _group_ids(store: Store) -> dict[int, str | None]:
    with store.engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT id, group_id FROM jobs ORDER BY id")).all())


def _has_group_index(store: Store) -> bool:
    with store.engine.connect() as conn:
        return any(ix["column_names"] == ["group_id"] for ix in sa.inspect(conn).get_indexes("jobs"))


def test_siblings_are_one_group_by_the_indexed_column_however_far_apart_they_were_queued(store):
    assert _has_group_index(store)
    year = 365 * 86400.0
    first, second = store.submit_job(_placed(0, "g1")), store.submit_job(_placed(1, "g1"))
    store.update_job(first, created_at=time.time() - 3 * year)  # queued long before its siblings
    store.update_job(second, created_at=time.time() + year)
    other = store.submit_job(_placed(0, "g2"))
    filed = store.submit_job({"model": "basic-cnn"})
    store.update_job(filed, group_id="g1")  # the column, not the config, makes a job a sibling
    assert _group_ids(store) == {first: "g1", second: "g1", other: "g2", filed: "g1"}
    assert [j["id"] for j in store.group_jobs(second)] == [first, second, filed]
    assert [j["id"] for j in store.group_jobs(other)] == [other]
    chief = store.claim_job("w1")
    assert chief["id"] == first
    assert store.request_cancel(filed) == "cancelled"
    assert store.get_job(first)["state"] == "running" and store.heartbeat(first, chief["claim_token"]) is True
    assert [store.get_job(i)["state"] for i in (second, other)] == ["cancelled", "queued"]
    with pytest.raises(MelcoreError, match="job not queued: the group id is 65 characters long, more than the 64"):
        store.submit_job(_placed(0, "x" * 65))
    assert len(store.list_jobs()) == 4


def test_version_3_jobs_join_the_group_their_placement_names_and_still_cancel_together(db_url):
    old = Store(db_url)
    jobs = store_module.jobs
    with old.engine.begin() as conn:  # the jobs as melreview with schema version 3 queued them
        _drop_jobs_group_id(conn)
        conn.execute(sa.text("UPDATE schema_version SET version = 3"))
        common = dict(kind="train", cancel_requested=False, attempts=0, max_attempts=3, progress={}, history=[])
        configs = [
            (_placed(0, "old"), 1000.0, "running"),
            (_placed(1, "old"), 1000.0 + 90 * 86400, "queued"),  # months after its sibling
            (_placed(0, "other"), 1100.0, "queued"),
            ({"model": "basic-cnn"}, 1200.0, "queued"),
            ({"model": "basic-cnn", "placement": "not a mapping"}, 1300.0, "queued"),
        ]
        ids = [
            conn.execute(
                sa.insert(jobs).values(config=config, created_at=created, state=state, **common)
            ).inserted_primary_key[0]
            for config, created, state in configs
        ]
        conn.execute(
            sa.update(jobs).where(jobs.c.id == ids[0]).values(worker_id="w1", claim_token="t1", heartbeat_at=2000.0)
        )
    old.close()
    upgraded = Store(db_url)
    assert upgraded.version() == store_module.SCHEMA_VERSION >= 4
    assert _has_group_index(upgraded)
    assert _group_ids(upgraded) == dict(zip(ids, ["old", "old", "other", None, None]))
    assert [j["id"] for j in upgraded.group_jobs(ids[1])] == ids[:2]
    assert [j["id"] for j in upgraded.group_jobs(ids[4])] == [ids[4]]
    assert upgraded.request_cancel(ids[1]) == "cancelled"
    assert upgraded.heartbeat(ids[0], "t1") is True  # the running sibling hears the cancel
    assert [upgraded.get_job(i)["state"] for i in ids] == ["running", "cancelled", "queued", "queued", "queued"]
    assert upgraded.get_job(ids[0])["config"] == configs[0][0]
    upgraded.close()


def test_version_1_databases_gain_run_archiving_and_keep_their_runs(db_url, tmp_path):
    old = Store(db_url)
    run_id = old.add_run("kept run", tmp_path, threshold=0.3)
    old.add_review(run_id, "img1", "Dr A", "agree")
    with old.engine.begin() as conn:  # the database as melreview with schema version 1 left it
        conn.execute(sa.text("ALTER TABLE runs DROP COLUMN archived_at"))
        conn.execute(sa.text("ALTER TABLE reviews DROP COLUMN aided"))
        conn.execute(sa.text("ALTER TABLE reviews DROP COLUMN confidence"))
        _drop_jobs_group_id(conn)
        conn.execute(sa.text("DELETE FROM schema_version WHERE version > 1"))
    old.close()
    upgraded = Store(db_url)
    assert upgraded.version() == store_module.SCHEMA_VERSION >= 2
    assert [r["id"] for r in upgraded.list_runs()] == [run_id]
    assert upgraded.get_run(run_id)["threshold"] == 0.3 and len(upgraded.review_history(run_id)) == 1


def test_version_2_reviews_become_aided_reads_without_confidence_and_none_is_lost(db_url, tmp_path):
    old = Store(db_url)
    run_id = old.add_run("kept run", tmp_path)
    with old.engine.begin() as conn:  # the reviews table as melreview with schema version 2 made it
        conn.execute(sa.text("DROP TABLE reviews"))
        _drop_jobs_group_id(conn)
        conn.execute(sa.text("UPDATE schema_version SET version = 2"))
        key = "INTEGER PRIMARY KEY" if old.is_sqlite else "SERIAL PRIMARY KEY"
        conn.execute(
            sa.text(
                f"CREATE TABLE reviews (id {key}, run_id INTEGER NOT NULL REFERENCES runs (id), "
                "image_name VARCHAR(300) NOT NULL, reviewer VARCHAR(200) NOT NULL, decision VARCHAR(20) NOT NULL, "
                "note TEXT NOT NULL, created_at FLOAT NOT NULL)"
            )
        )
        for k, (image, reviewer, decision) in enumerate(
            [("img1", "Dr A", "agree"), ("img1", "Dr B", "biopsy"), ("img2", "Dr A", "unsure")], start=1
        ):
            conn.execute(
                sa.text(
                    "INSERT INTO reviews (run_id, image_name, reviewer, decision, note, created_at) "
                    "VALUES (:run, :image, :reviewer, :decision, 'n', :t)"
                ),
                dict(run=run_id, image=image, reviewer=reviewer, decision=decision, t=100.0 + k),
            )
    old.close()
    upgraded = Store(db_url)
    assert upgraded.version() == store_module.SCHEMA_VERSION >= 3
    history = upgraded.review_history(run_id)
    assert history["id"].tolist() == [1, 2, 3]
    assert history["decision"].tolist() == ["agree", "biopsy", "unsure"]
    assert history["aided"].tolist() == [True, True, True]
    assert history["confidence"].isna().all()
    assert upgraded.add_review(run_id, "img2", "Dr B", "reassure", aided=False, confidence=5) == 4
    assert upgraded.review_history(run_id)["aided"].tolist() == [True, True, True, False]
    upgraded.close()


def test_blinded_reads_and_confidences_are_stored_and_checked(store, tmp_path):
    run_id = store.add_run("r", tmp_path)
    store.add_review(run_id, "img1", "Dr A", "reassure", aided=False, confidence=15)
    store.add_review(run_id, "img1", "Dr A", "biopsy", confidence=80.0)
    store.add_review(run_id, "img2", "Dr A", "follow-up", aided=False)
    history = store.review_history(run_id)
    assert history["aided"].tolist() == [False, True, False]
    assert history["confidence"].tolist()[:2] == [15, 80] and pd.isna(history["confidence"].iloc[2])
    for bad in (-1, 101, 50.5, "high", float("inf")):
        with pytest.raises(MelcoreError, match="confidence"):
            store.add_review(run_id, "img1", "Dr A", "biopsy", confidence=bad)
    assert len(store.review_history(run_id)) == 3


def test_archived_runs_leave_the_lists_but_keep_everything(store, tmp_path):
    import pandas as pd

    kept, hidden = store.add_run("kept", tmp_path), store.add_run("hidden", tmp_path, threshold=0.4)
    store.add_predictions(hidden, pd.DataFrame({"image_name": ["a"], "prediction": [0.7]}))
    store.add_review(hidden, "a", "Dr A", "biopsy")
    store.archive_run(hidden)
    assert [r["id"] for r in store.list_runs()] == [kept]
    assert [r["id"] for r in store.list_runs(archived=True)] == [hidden]
    assert [r["id"] for r in store.list_runs(archived=None)] == [hidden, kept]
    run = store.get_run(hidden)
    assert run["archived_at"] is not None and run["threshold"] == 0.4
    assert len(store.get_predictions(hidden)) == 1 and len(store.review_history(hidden)) == 1
    store.archive_run(hidden, archived=False)
    assert [r["id"] for r in store.list_runs()] == [hidden, kept]
    with pytest.raises(MelcoreError, match="no run with id 999"):
        store.archive_run(999)
