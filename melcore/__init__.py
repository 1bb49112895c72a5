"""melcore: the library behind the melreview dashboard.

Everything here works without Streamlit (notebooks, the CLI ``python -m melcore``,
the background trainer). TensorFlow is imported lazily, only by the modules that
build, train or explain models, so importing ``melcore`` itself is cheap.

Modules, one concept each:
    settings  where data lives (MELREVIEW_HOME, MELREVIEW_DB_URL)
    cohort    reading lesion tables into the canonical cohort form, validation
    images    fast JPEG decode to working size, on-disk resize cache, thumbnails
    splits    patient-grouped, stratified, seeded splits and the leakage check
    demo      the synthetic ISIC 2020-style demo cohort
    store     SQLAlchemy store: datasets, runs, jobs, predictions, reviews
    augment   albumentations presets
    models    registry of model builders (raw RGB in, melanoma probability out)
    train     ``fit(config, cohort) -> Run``
    predict   batch scoring with optional test-time augmentation
    metrics   ROC, AUROC with CI, DeLong, operating points, per-group metrics
    explain   Grad-CAM / Grad-CAM++ overlays
    dashboard finding the installed app.py and starting it (the `melreview` command)
"""

__version__ = "0.1.0"
