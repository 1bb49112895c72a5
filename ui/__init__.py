"""Streamlit helpers of the dashboard, shared by ``app.py`` and the pages in ``pages/``.

Layering: pages and ``app.py`` -> ``ui`` -> ``melcore`` (``melcore`` never imports Streamlit or this
package; this package never imports the pages). ``pages/`` holds the pages only.

    navigation  the page table and the one ``st.navigation`` call (app.py), the deep-link reroute
    common      the store, dataset and run choice, cached cohorts, errors in words
    widgets     lesion tiles, a patient's strip, the lesion panel with Grad-CAM
"""
