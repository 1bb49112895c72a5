"""Benchmark: moving the decision threshold over ~33,000 predictions.

Run by hand: ``cd /work/main && python bench/threshold.py``. Uses the real ISIC
2020 labels and patient ids (../shared/data/isic2020/train.csv) when present,
else a simulated table of the same size and prevalence; predictions are
simulated (binormal, AUROC ~0.9).

Target: a threshold change recomputes every metric in <= 50 ms. Prints, in one
run, the time per threshold change with ``ThresholdSweep.at`` (O(log n)), with
``threshold_metrics`` (O(n)) and with scikit-learn's ``confusion_matrix`` plus
the rates, the sweep's one-off set-up cost, and the 2,000-resample patient
bootstrap. The LAST line holds the figures to compare.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from melcore.metrics import ThresholdSweep, auroc, auroc_ci, threshold_metrics  # noqa: E402

TARGET_MS = 50.0


def load_labels(rng: np.random.Generator):
    train_csv = ROOT.parent / "shared" / "data" / "isic2020" / "train.csv"
    if train_csv.exists():
        import pandas as pd

        table = pd.read_csv(train_csv, usecols=["patient_id", "target"])
        return table["target"].to_numpy(), table["patient_id"].to_numpy(), f"ISIC 2020 labels ({train_csv})"
    n = 33_126
    patients = rng.integers(0, 2_056, size=n)
    return (rng.random(n) < 0.0176).astype(int), patients, "simulated labels (ISIC 2020 absent)"


def per_call_ms(fn, thresholds) -> float:
    start = time.perf_counter()
    for t in thresholds:
        fn(t)
    return (time.perf_counter() - start) / len(thresholds) * 1000


def sklearn_metrics(y, p, t):
    from sklearn.metrics import confusion_matrix

    tn, fp, fn, tp = confusion_matrix(y, p >= t, labels=[0, 1]).ravel()
    return {
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "ppv": tp / (tp + fp) if tp + fp else float("nan"),
        "npv": tn / (tn + fn) if tn + fn else float("nan"),
    }


def main() -> None:
    rng = np.random.default_rng(0)
    y, patients, source = load_labels(rng)
    p = 1 / (1 + np.exp(-(rng.normal(size=len(y)) + 2.5 * y - 3.5)))
    print(f"{len(y):,} predictions, {int(y.sum())} malignant; {source}; AUROC {auroc(y, p):.3f}")

    start = time.perf_counter()
    sweep = ThresholdSweep(y, p)
    setup_ms = (time.perf_counter() - start) * 1000
    print(f"ThresholdSweep set-up (validation + sort), once per model: {setup_ms:.1f} ms")

    many = rng.random(2_000)
    few = many[:50]
    sweep_ms = per_call_ms(sweep.at, many)
    direct_ms = per_call_ms(lambda t: threshold_metrics(y, p, t), few)
    sklearn_ms = per_call_ms(lambda t: sklearn_metrics(y, p, t), few)
    check = [sweep.at(t)["sensitivity"] == sklearn_metrics(y, p, t)["sensitivity"] for t in few]
    print(
        f"per threshold change: ThresholdSweep.at {sweep_ms:.4f} ms (mean of {len(many)}), "
        f"threshold_metrics {direct_ms:.2f} ms, sklearn confusion_matrix {sklearn_ms:.2f} ms "
        f"(means of {len(few)}); sweep agrees with sklearn at all {sum(check)}/{len(check)} thresholds"
    )

    start = time.perf_counter()
    curve = sweep.curve()
    curve_ms = (time.perf_counter() - start) * 1000
    print(f"full sensitivity/specificity curve ({len(curve):,} thresholds): {curve_ms:.1f} ms")

    start = time.perf_counter()
    low, high, *_ = auroc_ci(y, p, groups=patients, n_boot=2000, seed=0)
    boot_s = time.perf_counter() - start
    print(f"auroc_ci, 2000 patient resamples: {boot_s:.2f} s (95% CI {low:.3f}-{high:.3f})")

    verdict = "OK" if sweep_ms <= TARGET_MS else "TOO SLOW"
    print(
        f"threshold change on {len(y):,} predictions: ThresholdSweep.at {sweep_ms:.4f} ms vs sklearn "
        f"confusion_matrix {sklearn_ms:.2f} ms ({sklearn_ms / sweep_ms:,.0f}x faster); "
        f"target <= {TARGET_MS:.0f} ms: {verdict}"
    )


if __name__ == "__main__":
    main()
