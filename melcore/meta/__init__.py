"""The metadata and patient-context model: features known at the visit, the model, fusion with images, jobs.

Modules, each one concept, imported in this order (a module imports only those above it)::

    features  metadata and patient-context ("ugly duckling") features, computed from the table, never a label
    model     MetaModel (gradient-boosted trees on the features) and its patient-grouped cross-validation
    fusion    image and meta scores stacked by a logistic regression, cross-validated on the same folds
    jobs      train_meta_run (the run directory), the ``meta`` job's config, missingness warnings

Import each name from its module::

    from melcore.meta.model import cross_validate_meta
    result = cross_validate_meta(cohort, n_folds=5)
"""
