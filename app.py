"""melreview: the dermatology review dashboard. Run with ``streamlit run app.py`` (or ``melreview``).

The entry point: the page config, the Home page (datasets) and the navigation over the pages
in ``pages/`` (:mod:`ui.navigation`: the page table and the one ``st.navigation`` call).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from melcore.audit import audit_table
from melcore.classes import dataset_classes
from melcore.cohort import grouping_unit
from melcore.datasets import register_dataset
from melcore.errors import MelcoreError
from melcore.safety import escape_markdown
from ui import navigation
from ui.common import ensure_first_dataset, page_start, show_error

# Served by this server: a ":material/..." page icon makes every browser fetch it from a font CDN.
PAGE_ICON = Path(__file__).parent / "assets" / "page-icon.png"
FORMATS = ["auto", "isic2020", "isic2019", "ham10000", "folders", "generic"]


def _clinic_chart(summary: dict):
    import plotly.graph_objects as go

    clinics = summary.get("clinics") or {}
    names = sorted(clinics, key=clinics.get, reverse=True)
    fig = go.Figure(go.Bar(x=names, y=[clinics[n] for n in names], marker_color="#8c564b"))
    fig.update_layout(height=220, margin=dict(l=10, r=10, t=30, b=10), title="Images per clinic", yaxis_title="images")
    return fig


def _dataset_card(dataset: dict) -> None:
    summary = dataset.get("summary") or {}
    n_images = summary.get("n_images", 0)
    n_malignant = summary.get("n_malignant", 0)
    classes = dataset_classes(dataset)
    with st.container(border=True):
        title = escape_markdown(dataset["name"]) + ("  ·  demo (synthetic)" if dataset.get("is_demo") else "")
        st.subheader(title)
        st.caption(escape_markdown(f"{dataset.get('format') or 'auto'} · {dataset['csv_path']}"))
        cols = st.columns(4)
        unit = grouping_unit(summary.get("grouping"))
        cols[0].metric("Lesion images", f"{n_images:,}")
        cols[1].metric(
            unit[:1].upper() + unit[1:],
            f"{summary.get('n_patients', 0):,}",
            help=None
            if unit == "patients"
            else "The table has no patient ids: images are grouped by lesion id where known, else counted one by one.",
        )
        cols[2].metric(classes.positive_title, f"{n_malignant:,}")
        cols[3].metric(
            f"{classes.positive_title} rate",
            f"{(n_malignant / n_images if n_images else 0):.1%}",
            help=f"Target 1 means {classes.positive}, 0 {classes.negative}: {classes.why}.",
        )
        if summary.get("clinics"):
            st.plotly_chart(_clinic_chart(summary), width="stretch", key=f"clinics-{dataset['id']}")
        if summary.get("grouping"):
            st.caption(f"Patient grouping: {escape_markdown(summary['grouping'])}")
        _shortcut_audit(summary.get("shortcut_audit") or [], key=f"audit-{dataset['id']}")
        warnings = summary.get("warnings") or []
        if warnings:
            with st.expander(f"{len(warnings)} warning(s)"):
                for warning in warnings:
                    st.warning(escape_markdown(warning))


def _register_form(store) -> None:
    with st.form("register"):
        st.markdown("**Register a dataset**: a label table (CSV) and its image folder on this machine.")
        name = st.text_input("Name", placeholder="e.g. isic2020-mskcc", key="reg_name")
        csv_path = st.text_input(
            "Label table (CSV) or class-folder root", placeholder="/data/isic2020/train.csv", key="reg_csv"
        )
        images_dir = st.text_input(
            "Image folder or ISIC-layout root (optional for ISIC layouts)",
            placeholder="/data/isic2020 or /data/isic2020/jpeg/train",
            key="reg_images",
        )
        cols = st.columns(3)
        fmt = cols[0].selectbox("Format", FORMATS, key="reg_format")
        clinic_column = cols[1].text_input(
            "Clinic column (optional)", placeholder="clinic, attribution, source", key="reg_clinic"
        )
        metadata = cols[2].text_input("Metadata CSV (ISIC 2019, optional)", key="reg_metadata")
        submitted = st.form_submit_button("Inspect and register")
    if not submitted:
        return
    try:
        with st.spinner("Reading the table and checking the images..."):
            result = register_dataset(
                store, name, csv_path, images_dir, format=fmt, clinic_column=clinic_column, metadata_path=metadata
            )
    except (MelcoreError, OSError) as exc:
        show_error(exc, "Not registered")
        return
    summary = result.dataset["summary"]
    classes = dataset_classes(result.dataset)
    st.success(
        f"Registered {escape_markdown(repr(result.dataset['name']))}: {summary['n_images']:,} images, "
        f"{summary['n_patients']:,} {grouping_unit(summary.get('grouping'))}, {summary['n_malignant']:,} "
        f"{classes.positive_plural} ({summary['n_benign']:,} {classes.negative})."
    )
    for note in result.notes:
        st.info(escape_markdown(note[0].upper() + note[1:] + "."))
    _shortcut_audit(result.shortcut_audit, key="home_shortcut_audit_new")
    for warning in result.warnings:
        st.warning(escape_markdown(warning[0].upper() + warning[1:]))


def _shortcut_audit(rows: list[dict], key: str) -> None:
    if not rows:
        return
    st.markdown(
        "**Shortcut audit**: patient-grouped out-of-fold AUROC of each acquisition attribute alone "
        "(0.5 = it says nothing about the label)."
    )
    st.dataframe(audit_table(rows), hide_index=True, width="stretch", key=key)


def home() -> None:
    store = page_start(
        "melreview",
        "Melanoma classification review: browse patients, train clinic-specific models in the "
        "background, compare them on ROC curves, tune the threshold, review with Grad-CAM.",
    )
    try:
        ensure_first_dataset(store)
    except Exception as exc:  # the app must still start and say why
        show_error(exc, "The demo cohort could not be prepared")
    st.header("Datasets")
    listing = st.container()  # filled after the form, so a dataset registered in this run is listed
    st.header("Add a dataset")
    _register_form(store)
    with listing:
        datasets = store.list_datasets()
        if not datasets:
            st.info("No dataset registered yet.")
        for dataset in datasets:
            _dataset_card(dataset)


st.set_page_config(page_title="melreview", page_icon=str(PAGE_ICON), layout="wide")
navigation.run(home)
