"""The plumbing the lesion-table readers of :func:`melcore.cohort.load_cohort` share.

==================  ===================================================================
``tables``          CSV reading, column names, the assembled frame, 0/1 coercion
``detect``          which format a header is
``joins``           metadata and clinic tables joined on the image name
``image_files``     matching image files, confining them to the dataset, decode checks
==================  ===================================================================

Each reader (in :mod:`melcore.cohort`) takes the table as read (all columns str) and returns the assembled frame of
:func:`melcore.cohorts.tables.assemble`; the checks every format shares (names, duplicates,
labels, ages) run afterwards in :func:`~melcore.cohort.load_cohort`.
"""
