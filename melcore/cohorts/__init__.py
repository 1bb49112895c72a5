"""One reader per lesion-table format, and the plumbing they share; :func:`melcore.cohort.load_cohort`
dispatches to them and owns the cohort (:class:`melcore.cohort.Cohort`).

==================  ===================================================================
``tables``          CSV reading, column names, the assembled frame, 0/1 coercion
``detect``          which format a header is
``isic2020``        ISIC 2020 (Kaggle SIIM-ISIC) and generic near-canonical tables
``isic2019``        the ISIC 2019 one-hot ground truth
``ham10000``        the HAM10000 metadata table
``folders``         one folder per class
``mapping``         any CSV through an explicit column mapping
``joins``           metadata and clinic tables joined on the image name
``image_files``     matching image files, confining them to the dataset, decode checks
==================  ===================================================================

Each reader takes the table as read (all columns str) and returns the assembled frame of
:func:`melcore.cohorts.tables.assemble`; the checks every format shares (names, duplicates,
labels, ages) run afterwards in :func:`~melcore.cohort.load_cohort`.
"""
