"""Figure builders of melcore.plots: traces, names, markers and their positions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from melcore.errors import MelcoreError
from melcore.metrics import ThresholdSweep, calibration_table, net_benefit, precision_recall_curve, roc_curve
from melcore.plots import (
    PALETTE,
    bar_figure,
    calibration_figure,
    confusion_figure,
    decision_curve_figure,
    format_ci,
    heatmap_figure,
    pr_figure,
    readers_roc_figure,
    roc_figure,
    threshold_figure,
    training_curves_figure,
)


@pytest.fixture
def two_models():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.2).astype(int)
    good = 1 / (1 + np.exp(-(rng.normal(size=400) + 2.5 * y - 1)))
    weak = 1 / (1 + np.exp(-(rng.normal(size=400) + 0.7 * y - 1)))
    return y, {"good": good, "weak": weak}


def by_name(fig: go.Figure, name: str):
    matches = [t for t in fig.data if t.name == name]
    assert len(matches) == 1, [t.name for t in fig.data]
    return matches[0]


def test_format_ci():
    assert format_ci(0.87123, (0.8, 0.9)) == "0.871 (95% CI 0.800-0.900)"
    assert format_ci(0.5, None) == "0.500"
    assert format_ci(0.5, (np.nan, np.nan)) == "0.500"
    assert format_ci(float("nan"), (0.1, 0.2)) == "n/a"
    assert format_ci(0.87, (0.8, 0.9), digits=2, level=0.9) == "0.87 (90% CI 0.80-0.90)"


def test_roc_figure_names_curves_with_auroc_and_ci_and_places_markers(two_models):
    y, models = two_models
    curves, markers = {}, {}
    for i, (name, p) in enumerate(models.items()):
        fpr, tpr, _ = roc_curve(y, p)
        sweep = ThresholdSweep(y, p)
        curves[name] = (fpr, tpr, sweep.auroc(), (0.61 + i / 10, 0.93))
        m = sweep.at(0.4)
        markers[name] = (1 - m["specificity"], m["sensitivity"])
    fig = roc_figure(curves, markers)
    names = [t.name for t in fig.data]
    assert names[0] == "chance"
    good_auc = ThresholdSweep(y, models["good"]).auroc()
    line = by_name(fig, f"good<br>AUROC {good_auc:.3f} (95% CI 0.610-0.930)")
    assert line.meta == "good"
    np.testing.assert_allclose(line.x, roc_curve(y, models["good"]).fpr)
    assert any(n.startswith("weak<br>AUROC ") and "(95% CI 0.710-0.930)" in n for n in names)
    for name, (x, y_) in markers.items():
        marker = by_name(fig, f"{name} @ threshold")
        assert marker.showlegend is False and marker.mode == "markers"
        assert (marker.x[0], marker.y[0]) == pytest.approx((x, y_))
        # the marker shares its curve's colour
        curve = next(t for t in fig.data if t.meta == name and t.mode == "lines")
        assert marker.marker.color == curve.line.color
    assert by_name(fig, "good @ threshold").marker.color != by_name(fig, "weak @ threshold").marker.color


def test_roc_figure_keeps_colours_by_names_order_and_skips_nan_markers(two_models):
    y, models = two_models
    fpr, tpr, _ = roc_curve(y, models["good"])
    fig = roc_figure({"good": (fpr, tpr, 0.9, None)}, {"good": (np.nan, 0.5)}, names=["weak", "good"])
    assert [t.name for t in fig.data] == ["chance", "good<br>AUROC 0.900"]
    assert fig.data[1].line.color == PALETTE[1]
    with pytest.raises(MelcoreError, match="fpr has 2 points but tpr has 3"):
        roc_figure({"bad": ([0, 1], [0, 0.5, 1], 0.5, None)})


def test_roc_figure_with_thresholds_makes_every_vertex_a_clickable_threshold(two_models):
    y, models = two_models
    fpr, tpr, thresholds = roc_curve(y, models["good"])
    assert np.isinf(thresholds[0])  # the (0, 0) corner: nothing flagged
    fig = roc_figure({"good": (fpr, tpr, 0.9, None, thresholds)})
    line = next(t for t in fig.data if t.meta == "good")
    assert line.mode == "lines+markers"  # plotly reports clicks on markers only
    assert line.customdata[0] == 1.0
    np.testing.assert_array_equal(line.customdata[1:], thresholds[1:])
    assert line.marker.opacity == 0 and line.unselected.marker.opacity == 0  # clickable, not drawn
    assert "threshold %{customdata:.3f}" in line.hovertemplate
    with pytest.raises(MelcoreError, match="3 points but 2 thresholds"):
        roc_figure({"bad": ([0, 0.5, 1], [0, 0.5, 1], 0.5, None, [1.0, 0.5])})


def test_threshold_figure_points_carry_their_threshold_and_the_axis_follows_x_range(two_models):
    y, models = two_models
    curve = ThresholdSweep(y, models["good"]).curve(max_points=50)
    fig = threshold_figure({"good": curve}, x_range=(0.42, 0.58))
    for metric in ("sensitivity", "specificity"):
        trace = by_name(fig, f"good {metric}")
        np.testing.assert_array_equal(trace.customdata, trace.x)
        assert "markers" in trace.mode
    assert tuple(fig.layout.xaxis.range) == (0.42, 0.58)
    assert tuple(threshold_figure({"good": curve}).layout.xaxis.range) == (0.0, 1.0)


def test_threshold_figure_has_sensitivity_and_specificity_per_model_and_markers_at_threshold(two_models):
    y, models = two_models
    curves = {name: ThresholdSweep(y, p).curve(max_points=100) for name, p in models.items()}
    markers = {
        name: (ThresholdSweep(y, p).at(0.3)["sensitivity"], ThresholdSweep(y, p).at(0.3)["specificity"])
        for name, p in models.items()
    }
    fig = threshold_figure(curves, 0.3, markers)
    for name in models:
        sens = by_name(fig, f"{name} sensitivity")
        spec = by_name(fig, f"{name} specificity")
        assert spec.line.dash == "dash" and sens.line.color == spec.line.color
        assert max(sens.x) <= 1.0
        np.testing.assert_allclose(sens.y, curves[name]["sensitivity"])
        for metric, value in zip(("sensitivity", "specificity"), markers[name]):
            marker = by_name(fig, f"{name} {metric} @ threshold")
            assert (marker.x[0], marker.y[0]) == pytest.approx((0.3, value))
    assert [s.x0 for s in fig.layout.shapes] == [0.3]
    with pytest.raises(MelcoreError, match="lacks columns"):
        threshold_figure({"x": pd.DataFrame({"threshold": [0.1]})})
    assert not threshold_figure(curves).layout.shapes  # no threshold, no line


def test_threshold_figure_marks_a_run_at_its_own_saved_threshold_with_it_in_the_hover(two_models):
    y, models = two_models
    curves = {name: ThresholdSweep(y, p).curve(max_points=100) for name, p in models.items()}
    good, weak = (ThresholdSweep(y, models[n]) for n in ("good", "weak"))
    markers = {
        "good": (good.at(0.3)["sensitivity"], good.at(0.3)["specificity"]),  # at the slider's threshold
        "weak": (weak.at(0.62)["sensitivity"], weak.at(0.62)["specificity"], 0.62),
    }  # at its saved one
    fig = threshold_figure(curves, 0.3, markers, marker_notes={"weak": "threshold 0.620 (saved)"})
    for metric, value in zip(("sensitivity", "specificity"), markers["weak"]):
        marker = by_name(fig, f"weak {metric} @ threshold")
        assert (marker.x[0], marker.y[0]) == pytest.approx((0.62, value))
        assert "threshold 0.620 (saved)" in marker.hovertemplate
        shared = by_name(fig, f"good {metric} @ threshold")
        assert shared.x[0] == pytest.approx(0.3) and "threshold 0.300" in shared.hovertemplate
    # a run at its own threshold is marked even without a shared threshold line; a two-value marker is not
    alone = threshold_figure(curves, None, markers)
    assert by_name(alone, "weak sensitivity @ threshold").x[0] == pytest.approx(0.62)
    assert "threshold 0.62" in by_name(alone, "weak sensitivity @ threshold").hovertemplate
    assert not [t for t in alone.data if t.name == "good sensitivity @ threshold"]
    # notes are escaped (a run name can hold markup)
    escaped = threshold_figure(curves, 0.3, markers, marker_notes={"weak": "<b>x</b>"})
    assert "&lt;b&gt;x&lt;/b&gt;" in by_name(escaped, "weak specificity @ threshold").hovertemplate


def test_pr_figure_names_average_precision_and_draws_prevalence(two_models):
    y, models = two_models
    precision, recall, _ = precision_recall_curve(y, models["good"])
    fig = pr_figure({"good": (precision, recall, 0.6789)}, {"good": (0.8, 0.55)}, prevalence=0.2)
    assert fig.data[0].name == "no skill (prevalence 0.200)" and list(fig.data[0].y) == [0.2, 0.2]
    line = by_name(fig, "good<br>AP 0.679")
    np.testing.assert_allclose(line.x, recall)
    np.testing.assert_allclose(line.y, precision)
    marker = by_name(fig, "good @ threshold")
    assert (marker.x[0], marker.y[0]) == (0.8, 0.55)
    # nothing flagged: PPV is nan, so no marker
    fig = pr_figure({"good": (precision, recall, 0.6789)}, {"good": (0.0, np.nan)})
    assert [t.name for t in fig.data] == ["good<br>AP 0.679"]


def test_calibration_figure_shows_brier_and_skips_empty_bins(two_models):
    y, models = two_models
    table = calibration_table(y, models["good"], n_bins=10)
    table.loc[table.index[-1], ["n", "mean_predicted", "fraction_malignant"]] = [0, np.nan, np.nan]
    fig = calibration_figure({"good": (table, 0.08123)}, threshold=0.42)
    assert fig.data[0].name == "perfect calibration"
    trace = by_name(fig, "good<br>Brier 0.0812")
    non_empty = table[table["n"] > 0]
    np.testing.assert_allclose(trace.x, non_empty["mean_predicted"])
    np.testing.assert_allclose(trace.customdata, non_empty["n"])
    assert [s.x0 for s in fig.layout.shapes] == [0.42]
    assert fig.layout.yaxis.title.text == "observed melanoma fraction" and "melanoma fraction" in trace.hovertemplate
    from melcore.classes import MALIGNANT

    malignant = calibration_figure({"good": (table, 0.08123)}, classes=MALIGNANT)
    assert malignant.layout.yaxis.title.text == "observed malignant fraction"


def test_heatmap_figure_annotates_values_and_counts():
    fig = heatmap_figure([[0.9, 0.71], [None, 0.88]], ["A", "B"], n=[[100, 50], [0, 80]])
    (trace,) = fig.data
    assert isinstance(trace, go.Heatmap)
    assert list(trace.x) == ["A", "B"] and list(trace.y) == ["A", "B"]
    assert trace.z[0][0] == 0.9 and trace.z[1][0] is None
    assert trace.text[0][1] == "0.710<br>n=50"
    assert trace.text[1][0].startswith("n/a")
    assert fig.layout.xaxis.title.text == "scored on clinic" and fig.layout.yaxis.title.text == "trained on clinic"
    with pytest.raises(MelcoreError, match="shape"):
        heatmap_figure([[0.9, 0.8]], ["A", "B"])
    with pytest.raises(MelcoreError, match="counts"):
        heatmap_figure([[0.9]], ["A"], n=[[1, 2]])
    rect = heatmap_figure(np.array([[0.6, 0.7, 0.8]]), ["model"], column_labels=["A", "B", "C"])
    assert list(rect.data[0].x) == ["A", "B", "C"]


def test_confusion_figure_layout():
    fig = confusion_figure(tp=8, fp=30, tn=150, fn=2)
    (trace,) = fig.data
    np.testing.assert_allclose(np.asarray(trace.z, dtype=float), [[0.8, 0.2], [30 / 180, 150 / 180]])  # row shares
    assert confusion_figure(0, 5, 5, 0).data[0].z[0][0] is None  # no malignant image: no share
    assert list(trace.y) == ["melanoma", "not melanoma"]  # the default words
    from melcore.classes import MALIGNANT

    assert list(confusion_figure(8, 30, 150, 2, classes=MALIGNANT).data[0].y) == ["malignant", "benign"]
    assert trace.text[0][0] == "TP<br>8" and trace.text[1][1] == "TN<br>150"


def test_bar_figure_groups_series_with_interval_error_bars():
    fig = bar_figure(
        ["A", "B", "C"],
        {"m1": [0.8, 0.7, np.nan], "m2": [0.9, 0.6, 0.75]},
        errors={"m1": ([0.7, 0.6, np.nan], [0.85, 0.8, np.nan])},
        y_range=(0, 1),
    )
    m1, m2 = fig.data
    assert (m1.name, m2.name) == ("m1", "m2") and fig.layout.barmode == "group"
    assert list(m1.y) == [0.8, 0.7, None]
    np.testing.assert_allclose(m1.error_y.array, [0.05, 0.1, 0.0])
    np.testing.assert_allclose(m1.error_y.arrayminus, [0.1, 0.1, 0.0])
    assert m2.error_y.array is None
    assert list(fig.layout.yaxis.range) == [0, 1]
    horizontal = bar_figure(["A"], {"m": [0.5]}, horizontal=True)
    assert horizontal.data[0].orientation == "h" and list(horizontal.data[0].y) == ["A"]
    with pytest.raises(MelcoreError, match="2 values for 3 categories"):
        bar_figure(["A", "B", "C"], {"m": [0.1, 0.2]})


def test_training_curves_figure_pairs_training_and_validation():
    history = [
        {"epoch": 1, "loss": 0.6, "val_loss": 0.7, "val_auc": 0.7, "note": "warm-up"},
        {"epoch": 2, "loss": 0.4, "val_loss": 0.5, "val_auc": 0.8, "note": ""},
        {"epoch": 3, "loss": 0.3, "val_loss": None, "val_auc": 0.85, "note": ""},
    ]
    fig = training_curves_figure(history)
    assert [t.name for t in fig.data] == ["loss", "val_loss", "val_auc"]  # text column ignored
    loss, val_loss, val_auc = fig.data
    assert list(loss.x) == [1, 2, 3]
    assert loss.line.color == val_loss.line.color and val_loss.line.dash == "dash" and loss.line.dash == "solid"
    assert loss.yaxis == "y" and val_auc.yaxis == "y2"
    assert np.isnan(val_loss.y[2])
    only = training_curves_figure(pd.DataFrame(history), metrics=["val_auc"])
    assert [t.name for t in only.data] == ["val_auc"]
    stepwise = training_curves_figure([{"loss": 1.0}, {"loss": 0.5}])
    assert list(stepwise.data[0].x) == [1, 2]
    empty = training_curves_figure([])
    assert not empty.data and empty.layout.annotations[0].text == "no epochs yet"
    with pytest.raises(MelcoreError, match="no \\['auc'\\]"):
        training_curves_figure(history, metrics=["auc"])


def test_readers_roc_figure_places_each_reader_with_both_intervals_and_escapes_names(two_models):
    y, scores = two_models
    fpr, tpr, _ = roc_curve(y, scores["good"])
    readers = pd.DataFrame(
        {
            "reviewer": ["Dr A", "<b>Dr B</b>"],
            "mode": ["unaided", "aided"],
            "n": [400, 400],
            "sensitivity": [0.8, 0.6],
            "sensitivity_low": [0.7, 0.5],
            "sensitivity_high": [0.88, 0.7],
            "specificity": [0.75, 0.9],
            "specificity_low": [0.7, 0.86],
            "specificity_high": [0.8, 0.93],
        }
    )
    fig = readers_roc_figure(
        fpr, tpr, 0.9, (0.85, 0.94), readers, model_name="run-1", mean_reader={"unaided": (0.75, 0.8)}
    )
    point = by_name(fig, "Dr A (unaided)")
    assert point.x[0] == pytest.approx(0.25) and point.y[0] == 0.8 and point.marker.symbol == "diamond"
    assert point.error_y.array[0] == pytest.approx(0.08) and point.error_y.arrayminus[0] == pytest.approx(0.1)
    assert point.error_x.array[0] == pytest.approx(0.05) and point.error_x.arrayminus[0] == pytest.approx(0.05)
    escaped = by_name(fig, "&lt;b&gt;Dr B&lt;/b&gt; (aided)")
    assert "<b>" not in escaped.hovertemplate and escaped.marker.symbol == "circle"
    assert by_name(fig, "mean reader (unaided)").x[0] == pytest.approx(0.25)
    assert by_name(fig, "run-1<br>AUROC 0.900 (95% CI 0.850-0.940)").meta == "run-1"


def test_decision_curve_figure_draws_both_references_and_marks_the_threshold(two_models):
    y, scores = two_models
    grid = np.round(np.arange(1, 51) / 100, 2)
    curves = {name: net_benefit(y, p, grid) for name, p in scores.items()}
    fig = decision_curve_figure(curves, 0.2, names=["good", "weak"])
    assert by_name(fig, "biopsy none").y.tolist() == [0.0] * 50
    assert np.allclose(by_name(fig, "biopsy all").y, curves["good"]["treat_all"])  # same images: one line
    marker = by_name(fig, "good @ threshold")
    assert marker.x[0] == 0.2 and marker.y[0] == pytest.approx(
        curves["good"].set_index("threshold").loc[0.2, "net_benefit"]
    )
    assert fig.layout.shapes[0].x0 == 0.2
    other = {"good": curves["good"], "half": net_benefit(y[:200], scores["weak"][:200], grid)}
    names = [t.name for t in decision_curve_figure(other).data]
    assert "biopsy all (good)" in names and "biopsy all (half)" in names


def test_a_chance_level_auroc_curve_keeps_the_half_to_one_axis_instead_of_zooming_into_a_peak():
    history = [{"epoch": e, "select_loss": 0.7, "select_auroc": a} for e, a in enumerate([0.498, 0.516, 0.503], 1)]
    fig = training_curves_figure(history)
    assert tuple(fig.layout.yaxis2.range) == (0.5, 1.0)
    below = training_curves_figure([{"epoch": 1, "select_auroc": 0.43}])
    assert tuple(below.layout.yaxis2.range) == (0.4, 1.0)
    mixed = training_curves_figure([{"epoch": 1, "select_auroc": 0.6, "learning_rate": 1e-3}])
    assert mixed.layout.yaxis2.range is None  # not an AUROC-only axis: left to autorange


def test_run_colours_are_keyed_by_run_id_and_legends_are_shortened_with_the_full_name_in_the_hover():
    from melcore.plots import LEGEND_CHARS, PALETTE, run_color, short_label

    assert run_color(3) == run_color(3) and run_color(3) != run_color(4) and run_color(3) in PALETTE
    long = "#12 colour/shape SVM (cnn-bn for Grad-CAM) · clinic A · trained from scratch (chosen)"
    short = short_label(long)
    assert len(short) <= LEGEND_CHARS and short.endswith("…") and short.startswith("#12 colour/shape SVM")
    assert short_label("#2 basic-cnn · all clinics") == "#2 basic-cnn · all clinics"
    parts = short_label("#2 basic-cnn · all clinics · few-images · trained from scratch (chosen)")
    assert parts == "#2 basic-cnn · all clinics …"
    fpr, tpr = np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.8, 1.0])
    fig = roc_figure({long: (fpr, tpr, 0.8, (0.7, 0.9)), "b": (fpr, tpr, 0.8, None)}, colors={long: "#123456"})
    line = next(t for t in fig.data if t.meta == long)
    assert line.name.startswith(short + "<br>AUROC") and line.line.color == "#123456"
    assert long in line.hovertemplate and fig.layout.hoverlabel.namelength == -1
    other = next(t for t in fig.data if t.meta == "b")
    assert other.line.color == PALETTE[1]  # no colour given: by position
