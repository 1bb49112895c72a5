"""melcore.formatting: durations, numbers, and thresholds/risks that never contradict the decision."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from melcore.formatting import format_duration, format_number, format_risk, format_threshold


def test_durations_and_numbers():
    assert [format_duration(s) for s in (0, 42.4, 187, 3900, -1, None, "x", float("nan"))] == [
        "0s",
        "42s",
        "3m07s",
        "1h05m",
        "--",
        "--",
        "--",
        "--",
    ]
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


def test_json_safe_writes_what_is_not_a_finite_number_as_null_and_numpy_as_python():
    import json
    from pathlib import Path

    import numpy as np

    from melcore.formatting import json_safe

    value = {
        "auroc": float("nan"),
        "ppv": np.float32(np.inf),
        3: [np.int64(2), np.array([0.5, np.nan])],
        "flags": (np.bool_(True), False),
        "path": Path("/runs/a"),
        "name": "x",
        "none": None,
    }
    safe = json_safe(value)
    assert safe == {
        "auroc": None,
        "ppv": None,
        "3": [2, [0.5, None]],
        "flags": [True, False],
        "path": "/runs/a",
        "name": "x",
        "none": None,
    }
    assert type(safe["3"][0]) is int and type(safe["flags"][0]) is bool
    json.dumps(safe, allow_nan=False)


def test_one_json_cleaner_in_the_code():
    """NaN/inf -> null lives in melcore.formatting.json_safe only."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    copies = [
        f"{path.relative_to(root)}:{i}"
        for folder in ("melcore", "pages", "trainers")
        for path in sorted((root / folder).rglob("*.py"))
        if path.name != "formatting.py"
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.match(r"\s*def _?(json_?safe|jsonable|clean_floats|json_default)\s*\(", line)
    ]
    assert copies == []


def test_first_few_shows_the_first_and_counts_the_rest():
    from melcore.formatting import SHOWN, first_few

    assert first_few(["a", "b"]) == "a, b"
    assert first_few(range(8)) == "0, 1, 2, 3, 4, ... (+3 more)" and SHOWN == 5
    assert first_few(["x (bad)", "y (bad)"], total=1502, sep="; ") == "x (bad); y (bad); ... (+1,500 more)"
    assert first_few([], total=0) == ""
