"""Plotly figure builders for the dashboard (no Streamlit here; pages call these).

Every builder takes plain numbers (numpy arrays, lists, DataFrames) keyed by a
display name, returns a ``plotly.graph_objects.Figure`` and never computes a
metric itself: the numbers come from :mod:`melcore.metrics`. A name keeps the
same colour in every figure when the same ``names`` order is passed, so one model
is one colour across ROC, threshold, precision-recall and calibration plots; ``colors``
(name -> colour, e.g. :func:`run_color` of each run's id) keeps a run's colour when other
runs are added or removed. Legend entries are shortened (:func:`short_label`); hovers show
the full name.

Conventions shared by the builders
    * Curve traces are named after the model (plus its summary, e.g.
      ``"run-3<br>AUROC 0.871 (95% CI 0.842-0.899)"``, two legend lines); the trace's ``legendgroup``
      and ``meta`` hold the bare name, so marker traces (``"<name> @ threshold"``,
      hidden from the legend) can be found by name.
    * Markers show the current operating point: a dict name -> ``(x, y)``; points
      with a NaN coordinate are left out (e.g. PPV when nothing is flagged).
    * Clickable curves (ROC with thresholds, sensitivity/specificity by threshold)
      carry each point's threshold in ``customdata``, so a click on a curve can set
      the operating point (:func:`melcore.compare.threshold_from_points` reads it).
"""

from __future__ import annotations

import html
import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from melcore.classes import MELANOMA, ClassNames
from melcore.errors import MelcoreError
from melcore.formatting import format_threshold

__all__ = [
    "PALETTE",
    "LEGEND_CHARS",
    "run_color",
    "short_label",
    "bar_figure",
    "decision_curve_figure",
    "readers_roc_figure",
    "calibration_figure",
    "color_for",
    "confusion_figure",
    "format_ci",
    "heatmap_figure",
    "pr_figure",
    "roc_figure",
    "threshold_figure",
    "training_curves_figure",
]

#: Colour-blind-friendly qualitative palette (Okabe-Ito, without black/yellow).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#56B4E9", "#E69F00", "#8c564b", "#7f7f7f")
_GUIDE = dict(color="#9a9a9a", dash="dot", width=1)
_MARKER = dict(size=12, symbol="circle", line=dict(color="white", width=2))
# Plotly selects (and so reports clicks on) marker points only, never bare lines; these
# markers make every curve point clickable without drawing it, and stay unchanged
# whether the point is selected or not.
_CLICK_TARGET = dict(
    marker=dict(size=9, opacity=0), selected=dict(marker=dict(opacity=0)), unselected=dict(marker=dict(opacity=0))
)


def color_for(index: int) -> str:
    """The palette colour of the ``index``-th model (cycles after 8)."""
    return PALETTE[index % len(PALETTE)]


def run_color(run_id: int) -> str:
    """The colour of run ``run_id`` on every page and figure, whatever else is shown beside it
    (consecutive runs differ; cycles after 8)."""
    return PALETTE[int(run_id) % len(PALETTE)]


#: Legend entries longer than this many characters are shortened (the full name stays in the hover).
LEGEND_CHARS = 34


def short_label(name: str, limit: int = LEGEND_CHARS) -> str:
    """``name`` for a legend: whole when short, else its leading `` · ``-separated parts that fit, then "…"."""
    name = str(name)
    if len(name) <= limit:
        return name
    parts = name.split(" · ")
    kept = parts[0]
    if len(kept) > limit - 2:
        return kept[: limit - 1].rstrip() + "…"
    for part in parts[1:]:
        if len(kept) + 3 + len(part) > limit - 2:
            break
        kept += " · " + part
    return kept + " …"


def format_ci(value: float, ci: Sequence[float] | None = None, digits: int = 3, level: float = 0.95) -> str:
    """``"0.871 (95% CI 0.842-0.899)"``; ``"n/a"`` for NaN; the interval is omitted when unknown."""
    if value is None or not np.isfinite(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    if ci is not None and len(ci) == 2 and all(c is not None and np.isfinite(c) for c in ci):
        text += f" ({level:.0%} CI {ci[0]:.{digits}f}-{ci[1]:.{digits}f})"
    return text


def _figure(
    traces: list,
    title: str,
    x_title: str,
    y_title: str,
    *,
    height: int = 420,
    square: bool = False,
    xaxis: dict | None = None,
    yaxis: dict | None = None,
    threshold: float | None = None,
    threshold_label: bool = False,
    **layout,
) -> go.Figure:
    """One Figure built in a single pass (update_layout/add_vline calls cost ~10x more per call;
    a threshold slider rebuilds four figures on every move)."""
    xaxis = {"title": {"text": x_title}, **(xaxis or {})}
    yaxis = {"title": {"text": y_title}, **(yaxis or {})}
    if square:
        yaxis.update(scaleanchor="x", scaleratio=1)
    if threshold is not None and np.isfinite(threshold):
        layout["shapes"] = [
            {
                "type": "line",
                "x0": float(threshold),
                "x1": float(threshold),
                "xref": "x",
                "y0": 0,
                "y1": 1,
                "yref": "paper",
                "line": {"color": "#444", "width": 1.5, "dash": "dot"},
            }
        ]
        if threshold_label:
            layout.setdefault("annotations", []).append(
                {
                    "x": float(threshold),
                    "y": 1,
                    "xref": "x",
                    "yref": "paper",
                    "yanchor": "bottom",
                    "showarrow": False,
                    "text": f"threshold {threshold:.3f}",
                }
            )
    return go.Figure(
        data=[t for t in traces if t is not None],
        layout={
            "title": {"text": title, "x": 0.01, "xanchor": "left"},
            "height": height,
            "hovermode": "closest",
            "hoverlabel": {"namelength": -1},
            "margin": {"l": 10, "r": 10, "t": 45, "b": 10},
            "legend": {
                "orientation": "h",
                "yanchor": "top",
                "y": -0.18,
                "xanchor": "left",
                "x": 0,
                "font": {"size": 11},
            },
            "xaxis": xaxis,
            "yaxis": yaxis,
            **layout,
        },
    )


def _marker_trace(name: str, x: float, y: float, color: str, hover: str, label: str | None = None) -> go.Scatter | None:
    if x is None or y is None or not (np.isfinite(x) and np.isfinite(y)):
        return None
    return go.Scatter(
        x=[x],
        y=[y],
        mode="markers",
        name=label or f"{name} @ threshold",
        legendgroup=name,
        meta=name,
        showlegend=False,
        marker=dict(color=color, **_MARKER),
        hovertemplate=hover + "<extra></extra>",
    )


def _color_map(names: Sequence[str] | None, keys, colors: Mapping[str, str] | None = None) -> dict[str, str]:
    """Name -> colour: ``colors`` where given (e.g. :func:`run_color` by run id), else by position in ``names``."""
    order = list(names) if names is not None else []
    order += [k for k in keys if k not in order]
    return {name: (colors or {}).get(name) or color_for(i) for i, name in enumerate(order)}


def _as_array(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).ravel()


# --------------------------------------------------------------------------- ROC


def roc_figure(
    curves: Mapping[str, tuple],
    markers: Mapping[str, tuple[float, float]] | None = None,
    *,
    names: Sequence[str] | None = None,
    title: str = "ROC curves",
    level: float = 0.95,
    height: int = 460,
    marker_notes: Mapping[str, str] | None = None,
    colors: Mapping[str, str] | None = None,
) -> go.Figure:
    """Overlaid ROC curves, one per model, with the AUROC and its CI in the legend.

    Args:
        curves: name -> ``(fpr, tpr, auc, ci)`` or ``(fpr, tpr, auc, ci, thresholds)``:
            fpr, tpr, thresholds float arrays (k,) as from :func:`melcore.metrics.roc_curve`;
            auc float; ci ``(low, high)`` or None. With thresholds every point of the
            curve is clickable and carries its threshold (clipped to [0, 1], the
            leading ``inf`` becoming 1) in ``customdata``.
        markers: name -> ``(fpr, tpr)`` of the current operating point (one marker each).
        names: order of the colours (default: the order of ``curves``).
        level: the CI level written in the legend.
        marker_notes: name -> a line added to the marker's hover (e.g. ``"threshold 0.420 (saved)"``).

    Traces: one line per model named ``"<name><br>AUROC 0.871 (95% CI 0.842-0.899)"``
    (``meta`` = name), the chance diagonal named "chance", then the markers.
    """
    colors = _color_map(names, curves, colors)
    traces = [go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line=_GUIDE, hoverinfo="skip")]
    for name, (fpr, tpr, auc, ci, *rest) in curves.items():
        fpr, tpr = _as_array(fpr), _as_array(tpr)
        if len(fpr) != len(tpr):
            raise MelcoreError(f"ROC curve of {name!r}: fpr has {len(fpr)} points but tpr has {len(tpr)}")
        hover = "1 - specificity %{x:.3f}<br>sensitivity %{y:.3f}"
        clickable = {"mode": "lines"}
        if rest and rest[0] is not None:
            thresholds = np.clip(_as_array(rest[0]), 0.0, 1.0)
            if len(thresholds) != len(fpr):
                raise MelcoreError(f"ROC curve of {name!r}: {len(fpr)} points but {len(thresholds)} thresholds")
            clickable = dict(mode="lines+markers", customdata=thresholds, **_CLICK_TARGET)
            hover += "<br>threshold %{customdata:.3f} (click to use)"
        traces.append(
            go.Scatter(
                **clickable,
                x=fpr,
                y=tpr,
                name=f"{short_label(name)}<br>AUROC {format_ci(auc, ci, level=level)}",
                legendgroup=name,
                meta=name,
                line=dict(color=colors[name], width=2.5),
                hovertemplate=hover + "<extra>" + name + "</extra>",
            )
        )
    for name, (x, y) in (markers or {}).items():
        note = (marker_notes or {}).get(name)
        traces.append(
            _marker_trace(
                name,
                x,
                y,
                colors.get(name, color_for(len(colors))),
                f"{name}<br>sensitivity {y:.3f}<br>specificity {1 - x:.3f}"
                + (f"<br>{html.escape(note)}" if note else ""),
            )
        )
    unit = {"range": [-0.01, 1.01], "constrain": "domain"}
    return _figure(
        traces,
        title,
        "1 - specificity (false positive rate)",
        "sensitivity (true positive rate)",
        height=height,
        square=True,
        xaxis=unit,
        yaxis=dict(unit),
    )


# --------------------------------------------------------------------------- readers

READER_SYMBOLS = {"unaided": "diamond", "aided": "circle"}
"""Marker of a reader's point by reading mode on :func:`readers_roc_figure`."""


def readers_roc_figure(
    fpr,
    tpr,
    auc: float,
    ci: Sequence[float] | None,
    readers: pd.DataFrame,
    *,
    model_name: str = "model",
    mean_reader: Mapping[str, tuple[float, float]] | None = None,
    title: str = "Readers on the model's ROC curve",
    level: float = 0.95,
    height: int = 520,
) -> go.Figure:
    """The model's ROC curve with every reader's operating point and its confidence intervals.

    Args:
        fpr, tpr: the model's ROC curve (k,) on the readers' lesions.
        auc, ci: its AUROC and interval, for the legend.
        readers: one row per point with ``reviewer``, ``mode`` ("unaided"/"aided"),
            ``sensitivity``, ``sensitivity_low``, ``sensitivity_high``, ``specificity``,
            ``specificity_low``, ``specificity_high``, ``n`` (e.g. the eligible rows of
            :func:`melcore.readers.reader_table`).
        mean_reader: mode -> ``(specificity, sensitivity)`` of the mean reader (a star each).

    Traces: the chance diagonal, the model's curve (``meta`` = model name), then one
    marker per reader and mode named ``"<reviewer> (<mode>)"`` with error bars (x: 1 -
    specificity, y: sensitivity; ``meta`` = reviewer), then the mean readers. Reviewer names
    are user text: they are HTML-escaped before Plotly renders them.
    """
    fpr, tpr = _as_array(fpr), _as_array(tpr)
    if len(fpr) != len(tpr):
        raise MelcoreError(f"ROC curve of {model_name!r}: fpr has {len(fpr)} points but tpr has {len(tpr)}")
    model = html.escape(str(model_name))
    traces = [
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line=_GUIDE, hoverinfo="skip"),
        go.Scatter(
            x=fpr,
            y=tpr,
            mode="lines",
            name=f"{model}<br>AUROC {format_ci(auc, ci, level=level)}",
            meta=model,
            line=dict(color=PALETTE[0], width=2.5),
            hovertemplate="1 - specificity %{x:.3f}<br>sensitivity %{y:.3f}<extra>" + model + "</extra>",
        ),
    ]
    names = sorted(set(readers["reviewer"])) if len(readers) else []
    colors = {name: color_for(i + 1) for i, name in enumerate(names)}
    for row in readers.to_dict("records"):
        name = html.escape(str(row["reviewer"]))
        x, y = 1 - row["specificity"], row["sensitivity"]
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        traces.append(
            go.Scatter(
                x=[x],
                y=[y],
                mode="markers",
                name=f"{name} ({row['mode']})",
                meta=name,
                marker=dict(
                    color=colors[row["reviewer"]],
                    size=12,
                    symbol=READER_SYMBOLS.get(row["mode"], "square"),
                    line=dict(color="white", width=1.5),
                ),
                error_x=dict(
                    type="data",
                    symmetric=False,
                    array=[(1 - row["specificity_low"]) - x],
                    arrayminus=[x - (1 - row["specificity_high"])],
                    thickness=1,
                    width=3,
                ),
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=[row["sensitivity_high"] - y],
                    arrayminus=[y - row["sensitivity_low"]],
                    thickness=1,
                    width=3,
                ),
                hovertemplate=(
                    f"{name} ({row['mode']}, {int(row['n'])} lesions)<br>sensitivity {y:.3f} "
                    f"({row['sensitivity_low']:.3f}-{row['sensitivity_high']:.3f})<br>specificity "
                    f"{row['specificity']:.3f} ({row['specificity_low']:.3f}-{row['specificity_high']:.3f})"
                    "<extra></extra>"
                ),
            )
        )
    for mode, (specificity, sensitivity) in (mean_reader or {}).items():
        if np.isfinite(specificity) and np.isfinite(sensitivity):
            traces.append(
                go.Scatter(
                    x=[1 - specificity],
                    y=[sensitivity],
                    mode="markers",
                    name=f"mean reader ({mode})",
                    meta="mean reader",
                    marker=dict(color="#222", size=16, symbol="star"),
                    hovertemplate=f"mean reader ({mode})<br>sensitivity {sensitivity:.3f}<br>specificity "
                    f"{specificity:.3f}<extra></extra>",
                )
            )
    unit = {"range": [-0.01, 1.01], "constrain": "domain"}
    return _figure(
        traces,
        title,
        "1 - specificity (false positive rate)",
        "sensitivity (true positive rate)",
        height=height,
        square=True,
        xaxis=unit,
        yaxis=dict(unit),
    )


# --------------------------------------------------------------------------- decision curves


def decision_curve_figure(
    curves: Mapping[str, pd.DataFrame],
    threshold: float | None = None,
    *,
    names: Sequence[str] | None = None,
    title: str = "Decision curves (net benefit)",
    height: int = 420,
    x_range: tuple[float, float] = (0.0, 0.5),
    colors: Mapping[str, str] | None = None,
) -> go.Figure:
    """Net benefit against the threshold probability, with "biopsy all" and "biopsy none".

    Args:
        curves: name -> :func:`melcore.metrics.net_benefit` table (threshold, net_benefit,
            treat_all, treat_none).
        threshold: the chosen operating point: a vertical line and one marker per model.
        x_range: threshold probabilities shown (clinically, biopsy thresholds are low).

    Traces: "biopsy none", one "biopsy all" per distinct prevalence (named "biopsy all" when
    all runs share their images' prevalence, else ``"biopsy all (<name>)"``), then one line
    per model (``meta`` = name), then the markers ``"<name> @ threshold"``.
    """
    colors = _color_map(names, curves, colors)
    tables = list(curves.items())
    traces = []
    if tables:
        grid = tables[0][1]["threshold"].to_numpy()
        traces.append(
            go.Scatter(
                x=grid,
                y=np.zeros(len(grid)),
                mode="lines",
                name="biopsy none",
                line=dict(color="#444", width=1.5),
                hoverinfo="skip",
            )
        )
    alls: dict = {}
    for name, table in tables:
        key = tuple(np.round(table["treat_all"].to_numpy(), 12))
        alls.setdefault(key, []).append((name, table))
    for members in alls.values():
        name, table = members[0]
        label = "biopsy all" if len(alls) == 1 else f"biopsy all ({name})"
        traces.append(
            go.Scatter(
                x=table["threshold"],
                y=table["treat_all"],
                mode="lines",
                name=label,
                line=dict(color=colors[name] if len(alls) > 1 else "#9a9a9a", dash="dash", width=1.5),
                hovertemplate="threshold %{x:.2f}<br>net benefit %{y:.4f}<extra>" + label + "</extra>",
            )
        )
    lowest = 0.0
    for name, table in tables:
        traces.append(
            go.Scatter(
                x=table["threshold"],
                y=table["net_benefit"],
                mode="lines",
                name=short_label(name),
                meta=name,
                legendgroup=name,
                line=dict(color=colors[name], width=2.5),
                hovertemplate="threshold %{x:.2f}<br>net benefit %{y:.4f}<extra>" + name + "</extra>",
            )
        )
        lowest = min(lowest, float(np.nanmin(table["net_benefit"])))
    if threshold is not None and np.isfinite(threshold) and 0 <= threshold < 1:
        for name, table in tables:
            t = table["threshold"].to_numpy()
            k = int(np.argmin(np.abs(t - threshold)))
            traces.append(
                _marker_trace(
                    name,
                    float(t[k]),
                    float(table["net_benefit"].iloc[k]),
                    colors[name],
                    f"{name}<br>threshold {t[k]:.2f}<br>net benefit {table['net_benefit'].iloc[k]:.4f}",
                )
            )
    top = max([float(np.nanmax(t["treat_all"])) for _, t in tables] + [0.01])
    return _figure(
        traces,
        title,
        "threshold probability (biopsy when risk ≥ this)",
        "net benefit",
        height=height,
        threshold=threshold,
        xaxis={"range": list(x_range)},
        yaxis={"range": [max(lowest, -0.5 * top) - 0.05 * top, top * 1.1]},
    )


# --------------------------------------------------------------------------- threshold


def threshold_figure(
    curves: Mapping[str, pd.DataFrame],
    threshold: float | None = None,
    markers: Mapping[str, tuple[float, ...]] | None = None,
    *,
    names: Sequence[str] | None = None,
    title: str = "Sensitivity and specificity by threshold",
    height: int = 460,
    x_range: tuple[float, float] = (0.0, 1.0),
    colors: Mapping[str, str] | None = None,
    marker_notes: Mapping[str, str] | None = None,
) -> go.Figure:
    """Sensitivity (solid) and specificity (dashed) against the decision threshold.

    Args:
        curves: name -> DataFrame with columns ``threshold``, ``sensitivity``,
            ``specificity`` (e.g. ``ThresholdSweep.curve(max_points=500)``).
        threshold: draws a vertical line there when given.
        markers: name -> ``(sensitivity, specificity)`` at ``threshold``, or
            ``(sensitivity, specificity, run_threshold)`` at the model's own threshold (a run
            shown at its saved threshold); two markers per model, at ``(t, sensitivity)`` and
            ``(t, specificity)``, whose hover gives ``t``. Two-value markers need ``threshold``.
        x_range: the threshold axis shown (e.g. :func:`melcore.compare.threshold_window`).
        marker_notes: name -> a line added to the marker's hover (e.g. ``"threshold 0.420 (saved)"``),
            as on :func:`roc_figure`.

    Traces per model: ``"<name> sensitivity"`` and ``"<name> specificity"`` (``meta`` = name);
    every point is clickable and carries its threshold in ``customdata``.
    """
    colors = _color_map(names, curves, colors)
    traces = []
    for name, table in curves.items():
        missing = {"threshold", "sensitivity", "specificity"} - set(table.columns)
        if missing:
            raise MelcoreError(f"threshold curve of {name!r} lacks columns {sorted(missing)}")
        x = table["threshold"].to_numpy(dtype=float)
        # the last row of a sweep lies just above the top score (can exceed 1 by an ulp)
        x = np.clip(x, 0.0, 1.0)
        for metric, dash in (("sensitivity", "solid"), ("specificity", "dash")):
            traces.append(
                go.Scatter(
                    x=x,
                    y=table[metric].to_numpy(dtype=float),
                    mode="lines+markers",
                    name=f"{short_label(name)} {metric}",
                    legendgroup=name,
                    meta=name,
                    line=dict(color=colors[name], width=2.2, dash=dash, shape="hv"),
                    customdata=x,
                    **_CLICK_TARGET,
                    hovertemplate="threshold %{x:.3f} (click to use)<br>"
                    + metric
                    + " %{y:.3f}<extra>"
                    + name
                    + "</extra>",
                )
            )
    shared = threshold is not None and np.isfinite(threshold)
    for name, marker in (markers or {}).items():
        sensitivity, specificity = marker[0], marker[1]
        own = marker[2] if len(marker) > 2 else None
        at = float(own) if own is not None else (threshold if shared else None)
        if at is None or not np.isfinite(at):
            continue
        color = colors.get(name, color_for(len(colors)))
        note = (marker_notes or {}).get(name) or f"threshold {format_threshold(at)}"
        for metric, value in (("sensitivity", sensitivity), ("specificity", specificity)):
            traces.append(
                _marker_trace(
                    name,
                    at,
                    value,
                    color,
                    f"{name}<br>{metric} {value:.3f}<br>{html.escape(note)}",
                    label=f"{name} {metric} @ threshold",
                )
            )
    return _figure(
        traces,
        title,
        "decision threshold (flag for biopsy when p >= threshold)",
        "rate",
        height=height,
        xaxis={"range": [float(x_range[0]), float(x_range[1])]},
        yaxis={"range": [-0.02, 1.02]},
        threshold=threshold,
        threshold_label=True,
    )


# --------------------------------------------------------------------------- precision-recall


def pr_figure(
    curves: Mapping[str, tuple],
    markers: Mapping[str, tuple[float, float]] | None = None,
    *,
    prevalence: float | None = None,
    names: Sequence[str] | None = None,
    title: str = "Precision-recall",
    height: int = 460,
    colors: Mapping[str, str] | None = None,
) -> go.Figure:
    """Precision (PPV) against recall (sensitivity), one curve per model.

    Args:
        curves: name -> ``(precision, recall, average_precision)`` as from
            :func:`melcore.metrics.precision_recall_curve` plus the AP (float).
        markers: name -> ``(recall, precision)`` at the current threshold.
        prevalence: the malignant fraction, drawn as the no-skill line.

    Traces: ``"<name><br>AP 0.512"`` per model, "no skill" when prevalence is given, then markers.
    """
    colors = _color_map(names, curves, colors)
    traces = []
    if prevalence is not None and np.isfinite(prevalence):
        traces.append(
            go.Scatter(
                x=[0, 1],
                y=[prevalence, prevalence],
                mode="lines",
                name=f"no skill (prevalence {prevalence:.3f})",
                line=_GUIDE,
                hoverinfo="skip",
            )
        )
    for name, (precision, recall, ap) in curves.items():
        precision, recall = _as_array(precision), _as_array(recall)
        traces.append(
            go.Scatter(
                x=recall,
                y=precision,
                mode="lines",
                name=f"{short_label(name)}<br>AP {format_ci(ap)}",
                legendgroup=name,
                meta=name,
                line=dict(color=colors[name], width=2.2, shape="hv"),
                hovertemplate="recall %{x:.3f}<br>precision %{y:.3f}<extra>" + name + "</extra>",
            )
        )
    for name, (recall, precision) in (markers or {}).items():
        traces.append(
            _marker_trace(
                name,
                recall,
                precision,
                colors.get(name, color_for(len(colors))),
                f"{name}<br>sensitivity {recall:.3f}<br>PPV {precision:.3f}",
            )
        )
    return _figure(
        traces,
        title,
        "recall (sensitivity)",
        "precision (PPV)",
        height=height,
        xaxis={"range": [-0.01, 1.01]},
        yaxis={"range": [-0.01, 1.02]},
    )


# --------------------------------------------------------------------------- calibration


def calibration_figure(
    tables: Mapping[str, tuple[pd.DataFrame, float]],
    threshold: float | None = None,
    *,
    names: Sequence[str] | None = None,
    title: str = "Calibration",
    height: int = 460,
    classes: ClassNames | None = None,
    colors: Mapping[str, str] | None = None,
) -> go.Figure:
    """Reliability diagram: observed positive (melanoma / malignant) fraction against mean predicted probability.

    Args:
        tables: name -> ``(calibration_table, brier)`` with the table of
            :func:`melcore.metrics.calibration_table` (columns ``mean_predicted``,
            ``fraction_malignant``, ``n``); empty bins are skipped.
        threshold: vertical line at the decision threshold when given.
        classes: the dataset's class names (:func:`melcore.classes.dataset_classes`; default melanoma /
            not melanoma) for the axis title and hover.

    Traces: "perfect calibration", then ``"<name><br>Brier 0.0410"`` per model
    (markers sized by the bin's image count, hover shows the count).
    """
    colors = _color_map(names, tables, colors)
    positive = (classes or MELANOMA).positive
    traces = [go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration", line=_GUIDE, hoverinfo="skip")]
    for name, (table, brier) in tables.items():
        shown = table[table["n"] > 0]
        counts = shown["n"].to_numpy(dtype=float)
        sizes = 6 + 14 * np.sqrt(counts / counts.max()) if len(counts) else []
        brier_text = f"{brier:.4f}" if brier is not None and np.isfinite(brier) else "n/a"
        traces.append(
            go.Scatter(
                x=shown["mean_predicted"],
                y=shown["fraction_malignant"],
                mode="lines+markers",
                name=f"{short_label(name)}<br>Brier {brier_text}",
                legendgroup=name,
                meta=name,
                line=dict(color=colors[name], width=2),
                marker=dict(size=sizes, color=colors[name]),
                customdata=counts,
                hovertemplate=(
                    "predicted %{x:.3f}<br>observed " + positive + " fraction %{y:.3f}<br>"
                    "%{customdata:,.0f} images"
                    "<extra>" + name + "</extra>"
                ),
            )
        )
    unit = {"range": [-0.01, 1.01], "constrain": "domain"}
    return _figure(
        traces,
        title,
        "mean predicted probability",
        f"observed {positive} fraction",
        height=height,
        square=True,
        xaxis=unit,
        yaxis=dict(unit),
        threshold=threshold,
    )


# --------------------------------------------------------------------------- matrices and bars


def heatmap_figure(
    matrix,
    labels: Sequence[str],
    *,
    column_labels: Sequence[str] | None = None,
    n=None,
    title: str = "Cross-clinic AUROC",
    x_title: str = "scored on clinic",
    y_title: str = "trained on clinic",
    zmin: float = 0.5,
    zmax: float = 1.0,
    value_format: str = ".3f",
    colorscale: str = "Blues",
    height: int | None = None,
) -> go.Figure:
    """Annotated heatmap, row i = ``labels[i]``, column j = ``column_labels[j]`` (default ``labels``).

    Args:
        matrix: (r, c) numbers; None/NaN cells are blank and annotated "n/a".
        n: optional (r, c) counts written under each value ("n=1,234").
        zmin, zmax: colour range (AUROC: 0.5 chance .. 1).

    One trace (``go.Heatmap``) whose ``text`` holds the annotations.
    """
    values = (
        np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=np.float64)
        if not isinstance(matrix, np.ndarray)
        else matrix.astype(np.float64)
    )
    if values.ndim != 2:
        raise MelcoreError(f"a heatmap needs a 2-D matrix; got shape {values.shape}")
    columns = list(column_labels) if column_labels is not None else list(labels)
    if values.shape != (len(labels), len(columns)):
        raise MelcoreError(
            f"heatmap matrix has shape {values.shape} but there are {len(labels)} row labels and "
            f"{len(columns)} column labels"
        )
    counts = None
    if n is not None:
        counts = np.array([[np.nan if v is None else v for v in row] for row in n], dtype=np.float64)
        if counts.shape != values.shape:
            raise MelcoreError(f"heatmap counts have shape {counts.shape}, the matrix {values.shape}")
    text = []
    for i in range(values.shape[0]):
        row = []
        for j in range(values.shape[1]):
            cell = "n/a" if not np.isfinite(values[i, j]) else format(values[i, j], value_format)
            if counts is not None and np.isfinite(counts[i, j]):
                cell += f"<br>n={counts[i, j]:,.0f}"
            row.append(cell)
        text.append(row)
    trace = go.Heatmap(
        z=np.where(np.isfinite(values), values, None),
        x=[str(c) for c in columns],
        y=[str(r) for r in labels],
        text=text,
        texttemplate="%{text}",
        zmin=zmin,
        zmax=zmax,
        colorscale=colorscale,
        hovertemplate=y_title + " %{y}<br>" + x_title + " %{x}<br>%{text}<extra></extra>",
        colorbar=dict(thickness=12),
    )
    return _figure(
        [trace],
        title,
        x_title,
        y_title,
        height=height or max(260, 80 + 60 * len(labels)),
        xaxis={"type": "category", "side": "bottom"},
        yaxis={"type": "category", "autorange": "reversed"},
    )


def confusion_figure(
    tp: int,
    fp: int,
    tn: int,
    fn: int,
    *,
    title: str = "Confusion matrix",
    height: int = 300,
    classes: ClassNames | None = None,
) -> go.Figure:
    """2x2 counts: rows truth (the dataset's positive, negative class: ``classes``, default melanoma /
    not melanoma), columns decision (biopsy, no biopsy).

    Colours are row-normalised (share of each class's lesions), so a rare class still shows
    how it is split; the text gives the counts.
    """
    counts = np.array([[tp, fn], [fp, tn]], dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = counts / counts.sum(axis=1, keepdims=True)
    z = np.where(np.isfinite(shares), shares, None)
    text = [[f"TP<br>{tp:,}", f"FN<br>{fn:,}"], [f"FP<br>{fp:,}", f"TN<br>{tn:,}"]]
    trace = go.Heatmap(
        z=z,
        x=["biopsy", "no biopsy"],
        y=[(classes or MELANOMA).positive, (classes or MELANOMA).negative],
        text=text,
        texttemplate="%{text}",
        colorscale="Blues",
        showscale=False,
        hovertemplate="truth %{y}<br>decision %{x}<br>%{text}<extra></extra>",
    )
    return _figure(
        [trace], title, "decision", "truth", height=height, yaxis={"autorange": "reversed"}, xaxis={"tickangle": 0}
    )


def bar_figure(
    categories: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    errors: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    names: Sequence[str] | None = None,
    title: str = "",
    x_title: str = "",
    y_title: str = "",
    y_range: tuple[float, float] | None = None,
    value_format: str = ".3f",
    horizontal: bool = False,
    height: int = 380,
    colors: Mapping[str, str] | None = None,
) -> go.Figure:
    """Grouped bars: one bar per category for each series (e.g. AUROC per clinic for each model).

    Args:
        categories: the c category labels.
        series: name -> c values (NaN bars are left empty).
        errors: name -> ``(low, high)`` arrays (c,) of interval bounds, drawn as
            asymmetric error bars (e.g. the bootstrap CI).
        horizontal: bars along x instead of y.

    One ``go.Bar`` trace per series, named after it.
    """
    colors = _color_map(names, series, colors)
    categories = [str(c) for c in categories]
    traces = []
    for name, values in series.items():
        values = _as_array(values)
        if len(values) != len(categories):
            raise MelcoreError(f"bar series {name!r} has {len(values)} values for {len(categories)} categories")
        error = None
        if errors and name in errors:
            low, high = (_as_array(v) for v in errors[name])
            error = dict(
                type="data",
                symmetric=False,
                array=np.nan_to_num(high - values),
                arrayminus=np.nan_to_num(values - low),
                color="#555",
                thickness=1.2,
            )
        shown = np.where(np.isfinite(values), values, None)
        text = [format(v, value_format) if np.isfinite(v) else "" for v in values]
        common = dict(
            name=short_label(name),
            meta=name,
            marker_color=colors[name],
            text=text,
            textposition="inside",
            insidetextanchor="start",
        )
        if horizontal:
            traces.append(go.Bar(x=shown, y=categories, orientation="h", error_x=error, **common))
        else:
            traces.append(go.Bar(x=categories, y=shown, error_y=error, **common))
    value_axis = {"range": list(y_range)} if y_range is not None else {}
    return _figure(
        traces,
        title,
        y_title if horizontal else x_title,
        x_title if horizontal else y_title,
        height=height,
        barmode="group",
        xaxis=value_axis if horizontal else None,
        yaxis=None if horizontal else value_axis,
    )


# --------------------------------------------------------------------------- training

_X_KEYS = ("epoch", "step", "batch")


def training_curves_figure(
    history,
    metrics: Sequence[str] | None = None,
    *,
    x: str | None = None,
    title: str = "Training curves",
    height: int = 380,
) -> go.Figure:
    """Learning curves from a training history.

    Args:
        history: list of dicts (one per epoch/step, e.g. ``{"epoch": 1, "loss": 0.41,
            "val_loss": 0.45, "val_auc": 0.81}``) or a DataFrame of the same columns.
            Non-numeric values are ignored; missing values leave gaps.
        metrics: which keys to draw (default: every numeric key except ``x``).
        x: the x-axis key (default: the first of "epoch", "step", "batch" present,
            else the point's position starting at 1).

    Losses (keys containing "loss") go on the left axis, every other metric (AUROC,
    accuracy, learning rate...) on a right axis; validation series (``val_`` prefix)
    are dashed and share their training series' colour. One trace per metric, named
    after its key. An empty history gives an empty figure saying "no epochs yet".

    When every right-axis metric is an AUROC (key containing "auroc" or "auc"), that axis
    is fixed at 0.5-1.0 (lower when a value falls below 0.48) with ticks every 0.1, so a
    chance-level model's 0.498-0.516 is not zoomed into something that looks like a peak;
    the user can still zoom.
    """
    frame = pd.DataFrame(list(history)) if not isinstance(history, pd.DataFrame) else history.copy()
    if x is None:
        x = next((key for key in _X_KEYS if key in frame.columns), None)
    if x is not None and x not in frame.columns:
        raise MelcoreError(f"history has no {x!r} column; columns: {', '.join(map(str, frame.columns))}")
    xs = frame[x] if x is not None else pd.Series(np.arange(1, len(frame) + 1))
    numeric = {c: pd.to_numeric(frame[c], errors="coerce") for c in frame.columns if c != x}
    if metrics is None:
        metrics = [c for c, v in numeric.items() if v.notna().any()]
    else:
        unknown = [m for m in metrics if m not in numeric]
        if unknown:
            raise MelcoreError(f"history has no {unknown} column(s); columns: {', '.join(map(str, frame.columns))}")
    bases = list(dict.fromkeys(m[4:] if m.startswith("val_") else m for m in metrics))
    colors = {base: color_for(i) for i, base in enumerate(bases)}
    traces = []
    has_right = False
    for metric in metrics:
        base = metric[4:] if metric.startswith("val_") else metric
        right = "loss" not in metric.lower()
        has_right |= right
        traces.append(
            go.Scatter(
                x=xs,
                y=numeric[metric],
                mode="lines+markers",
                name=metric,
                meta=metric,
                yaxis="y2" if right else "y",
                connectgaps=False,
                line=dict(color=colors[base], width=2, dash="dash" if metric.startswith("val_") else "solid"),
                marker=dict(size=5),
            )
        )
    extra = {}
    if has_right:
        extra["yaxis2"] = {"title": {"text": "metric"}, "overlaying": "y", "side": "right", "showgrid": False}
        right_metrics = [m for m in metrics if "loss" not in m.lower()]
        if right_metrics and all("auroc" in m.lower() or "auc" in m.lower() for m in right_metrics):
            values = pd.concat([numeric[m] for m in right_metrics]).dropna()
            lowest = float(values.min()) if len(values) else 0.5
            # Chance level (down to 0.48) stays on the 0.5 line; clearly worse widens the axis.
            low = 0.5 if lowest >= 0.48 else math.floor(lowest * 10) / 10
            extra["yaxis2"].update(title={"text": "AUROC"}, range=[low, 1.0], dtick=0.1, tickformat=".1f")
    if not metrics or len(frame) == 0:
        extra["annotations"] = [
            {"text": "no epochs yet", "showarrow": False, "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper"}
        ]
    return _figure(traces, title, x or "point", "loss", height=height, **extra)
