"""melcore.formatting: durations, numbers, and thresholds/risks that never contradict the decision."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from melcore.formatting import format_duration, format_number, format_risk, format_threshold


def test_durations_and_numbers():
    assert [format_duration(s) for s in (0, 42.4, 187, 3900, -1, None, "x", float("nan"))] == [
        "0s", "42s", "3m07s", "1h05m", "--", "--", "--", "--"]
    assert format_number(0.123456) == "0.1235" and format_number(3, ".1f") == "3.0"
    assert format_number(float("inf")) == "--" and format_number(None) == "--"


def test_thresholds_show_the_decimals_they_need():
    assert format_threshold(0.5) == "0.500"
    assert format_threshold(0.505) == "0.505"
    assert format_threshold(0.50512) == "0.50512"  # e.g. a threshold clicked on the ROC curve
    assert format_threshold(1 / 3) == "0.333333"
    assert format_threshold(0.25, min_decimals=2) == "0.25"
    assert format_threshold(None) == "--" and format_threshold(float("nan")) == "--"


def test_risks_gain_decimals_only_where_rounding_would_cross_the_threshold():
    assert format_risk(0.73, 0.505) == "0.73"
    assert format_risk(0.5051, 0.50512) == "0.505"  # "0.51" would read as above "0.50512"
    assert format_risk(0.50515, 0.50512) == "0.51"
    assert format_risk(0.4996, 0.5) == "0.4996"  # "0.50" would read as at the threshold
    assert format_risk(0.4996, 0.5, min_decimals=3) == "0.4996"
    assert format_risk(0.2, None) == "0.20" and format_risk(None, 0.5) == "--"


@given(risk=st.floats(0, 1), threshold=st.floats(0, 1))
def test_shown_risk_and_threshold_always_agree_with_the_decision(risk, threshold):
    shown_risk, shown_threshold = float(format_risk(risk, threshold)), float(format_threshold(threshold))
    if abs(risk - threshold) >= 1e-6:  # closer than the 6 decimals shown cannot be told apart in text
        assert (shown_risk >= shown_threshold) == (risk >= threshold), (risk, threshold)
