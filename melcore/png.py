"""Static PNG renderings of figures for export (matplotlib, Agg backend, imported lazily).

Plotly figures on the pages are interactive; a paper or a report needs a file. Plotly's
own PNG export needs kaleido and a browser process per figure, so the exports here draw
the same numbers with matplotlib, which needs neither.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from melcore.errors import MelcoreError
from melcore.plots import PALETTE

__all__ = ["readers_roc_png"]

_MODE_MARKERS = {"unaided": "D", "aided": "o"}


def readers_roc_png(
    fpr,
    tpr,
    auc: float,
    ci: Sequence[float] | None,
    readers: pd.DataFrame,
    *,
    model_name: str = "model",
    mean_reader: Mapping[str, tuple[float, float]] | None = None,
    title: str = "Readers on the model's ROC curve",
    dpi: int = 150,
) -> bytes:
    """The readers' ROC figure (:func:`melcore.plots.readers_roc_figure`) as PNG bytes.

    Args: as :func:`melcore.plots.readers_roc_figure`; ``dpi`` of the 6 x 6 inch image.
    Reviewer names are drawn as plain text (matplotlib's mathtext is switched off for them).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
    if len(fpr) != len(tpr):
        raise MelcoreError(f"ROC curve of {model_name!r}: fpr has {len(fpr)} points but tpr has {len(tpr)}")
    figure = Figure(figsize=(6.4, 6.4), dpi=dpi)
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], ls=":", color="#9a9a9a", lw=1)
    label = f"{model_name}: AUROC {auc:.3f}"
    if ci is not None and all(np.isfinite(c) for c in ci):
        label += f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
    axes.plot(fpr, tpr, color=PALETTE[0], lw=2.2, label=label)
    names = sorted(set(readers["reviewer"])) if len(readers) else []
    colors = {name: PALETTE[(i + 1) % len(PALETTE)] for i, name in enumerate(names)}
    for row in readers.to_dict("records"):
        x, y = 1 - row["specificity"], row["sensitivity"]
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        axes.errorbar(
            [x],
            [y],
            xerr=[[x - (1 - row["specificity_high"])], [(1 - row["specificity_low"]) - x]],
            yerr=[[y - row["sensitivity_low"]], [row["sensitivity_high"] - y]],
            fmt=_MODE_MARKERS.get(row["mode"], "s"),
            color=colors[row["reviewer"]],
            ms=7,
            capsize=2,
            lw=1,
            label=f"{row['reviewer']} ({row['mode']})",
        )
    for mode, (specificity, sensitivity) in (mean_reader or {}).items():
        if np.isfinite(specificity) and np.isfinite(sensitivity):
            axes.plot([1 - specificity], [sensitivity], "*", color="#222", ms=14, label=f"mean reader ({mode})")
    axes.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        aspect="equal",
        title=title,
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
    )
    axes.grid(alpha=0.3)
    legend = axes.legend(loc="lower right", fontsize=7, framealpha=0.9)
    for text in legend.get_texts():
        text.set_usetex(False)
        text.set_parse_math(False)  # a reviewer name with $ signs is text, not a formula
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
