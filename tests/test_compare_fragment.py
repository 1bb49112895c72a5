"""Compare's threshold fragment holds only what depends on the threshold.

A threshold change (slider, preset, curve click) reruns the ``st.fragment`` alone, so whatever
the fragment draws is re-sent to the browser at every step. ``st.fragment`` and the figure
builders are wrapped to record whether each builder call ran inside a fragment's body: the
threshold-free figures must be drawn once per script run and never inside it, the
operating-point figures inside it.
"""

from __future__ import annotations

import functools

import pytest
import streamlit as st
from page_helpers import open_page  # tests/ is on sys.path (pytest rootdir-relative import)
from test_compare_page import seeded  # noqa: F401  (the fixture)

import melcore.plots

THRESHOLD_FREE = ("pr_figure", "calibration_figure", "decision_curve_figure")
THRESHOLD_BOUND = ("roc_figure", "threshold_figure", "confusion_figure")


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, bool]]:
    """(builder name, called inside a fragment) for every call of the wrapped figure builders."""
    seen: list[tuple[str, bool]] = []
    depth = [0]
    real_fragment = st.fragment

    def fragment(func=None, **options):
        def decorate(body):
            @functools.wraps(body)
            def counted(*args, **kwargs):
                depth[0] += 1
                try:
                    return body(*args, **kwargs)
                finally:
                    depth[0] -= 1

            return real_fragment(counted, **options)

        return decorate(func) if func is not None else decorate

    monkeypatch.setattr(st, "fragment", fragment)
    for name in THRESHOLD_FREE + THRESHOLD_BOUND:
        original = getattr(melcore.plots, name)

        def wrapped(*args, _name=name, _original=original, **kwargs):
            seen.append((_name, depth[0] > 0))
            return _original(*args, **kwargs)

        monkeypatch.setattr(melcore.plots, name, wrapped)
    return seen


def test_a_threshold_change_redraws_only_the_threshold_dependent_parts(seeded, calls):  # noqa: F811
    at = open_page("compare.py", timeout=90)
    inside = {name for name, in_fragment in calls if in_fragment}
    assert inside == set(THRESHOLD_BOUND), calls  # the operating-point figures are the fragment's
    assert not inside & set(THRESHOLD_FREE)
    assert sorted(name for name, _ in calls if name in THRESHOLD_FREE) == sorted(THRESHOLD_FREE)  # once each

    # the per-clinic AUROC table is outside the fragment; the at-threshold one is in it
    clinic = next(df for df in at.dataframe if "AUROC" in df.value.columns and "Clinic" in df.value.columns)
    assert "Sensitivity" not in clinic.value.columns
    at_clinic = next(df for df in at.dataframe if "Sensitivity" in df.value.columns and "Clinic" in df.value.columns)
    assert "AUROC" not in at_clinic.value.columns

    for change in (
        lambda: at.slider(key="compare_threshold").set_value(0.2),
        at.button(key="compare_preset_youden").click,
    ):
        calls.clear()
        change()
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert not [name for name, in_fragment in calls if in_fragment and name in THRESHOLD_FREE], calls
        assert {name for name, in_fragment in calls if in_fragment} == set(THRESHOLD_BOUND), calls
    # the threshold-free figures carry no operating-point marker that a threshold change would leave stale
    for chart in at.get("plotly_chart"):
        if chart.proto.id and any(
            k in chart.proto.id for k in ("compare_pr", "compare_calibration", "compare_decision")
        ):
            assert "@ threshold" not in chart.proto.spec
