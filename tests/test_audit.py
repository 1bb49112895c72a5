"""Shortcut audit (melcore.audit): acquisition attributes alone against the label, grouped by patient."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from melcore.audit import WARN_AUROC, audit_images, audit_warnings, shortcut_audit
from melcore.cohort import CANONICAL_COLUMNS, Cohort

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DERM = PROJECT_ROOT.parent / "shared" / "data" / "derm-real-dev"


def _cohort(n_patients: int = 60, seed: int = 0, late_block_melanoma: bool = True) -> Cohort:
    """Two images per patient; with ``late_block_melanoma`` every melanoma is filed in number block 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        target = int(rng.random() < 0.4)
        block = target if late_block_melanoma else int(rng.integers(2))
        for j in range(2):
            rows.append(
                {
                    "image_name": f"ISIC_{block * 1000 + 10 * p + j:07d}",
                    "patient_id": f"P{p}",
                    "target": target,
                    "clinic": "north",
                }
            )
    table = pd.DataFrame(rows)
    for column in CANONICAL_COLUMNS:
        if column not in table:
            table[column] = None
    return Cohort(table=table[list(CANONICAL_COLUMNS)])


def test_a_file_name_block_that_gives_the_label_away_is_flagged():
    rows = {r["attribute"]: r for r in shortcut_audit(_cohort(), n_boot=200)}
    block = rows["file-name number block"]
    assert block["auroc"] > 0.95 and block["auroc_ci"][0] > WARN_AUROC
    assert "file-name number block alone predicts the label" in block["warning"]
    assert rows["clinic"]["auroc"] is None and "one value only" in rows["clinic"]["note"]
    assert audit_warnings(list(rows.values())) == [block["warning"]]


def test_an_uninformative_block_stays_near_chance_and_is_not_flagged():
    rows = {r["attribute"]: r for r in shortcut_audit(_cohort(late_block_melanoma=False), n_boot=200)}
    block = rows["file-name number block"]
    assert block["auroc"] < WARN_AUROC and block["warning"] is None
    assert block["auroc_ci"][0] < 0.5 < block["auroc_ci"][1]


def test_audit_reads_images_only_when_asked_or_small():
    cohort = _cohort()
    assert audit_images(cohort, "none") is None
    assert audit_images(cohort, "auto") is False  # no image files: table attributes only
    assert [r["attribute"] for r in shortcut_audit(cohort, n_boot=50)] == [
        "clinic",
        "file-name prefix",
        "file-name number block",
        "file format",
    ]


@pytest.mark.skipif(not (DERM / "labels.csv").is_file(), reason="../shared/data/derm-real-dev is not present")
def test_inspect_json_reports_the_source_shortcut_of_derm_real_dev():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "melcore",
            "inspect",
            "--csv",
            str(DERM / "labels.csv"),
            "--clinic-column",
            "source",
            "--audit",
            "table",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    rows = {r["attribute"]: r for r in out["shortcut_audit"]}
    assert rows["clinic"]["auroc"] > 0.85 and rows["file-name number block"]["auroc"] > 0.85
    assert any("the clinic alone predicts the label" in w for w in out["warnings"])
