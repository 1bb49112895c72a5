"""Metadata / patient-context model: features, leakage, ugly duckling, CV, fusion, persistence, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from melcore.cohort import load_cohort
from melcore.errors import CohortError, ConfigError, MelcoreError
from melcore.meta.features import FEATURE_SETS, meta_features, ugly_duckling_scores
from melcore.meta.fusion import fuse
from melcore.meta.model import MetaModel, cross_validate_meta

SITES = ["torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital"]


def synthetic_table(n_patients: int = 160, seed: int = 0, odd_effect: float = 3.5) -> pd.DataFrame:
    """ISIC 2020-like table whose label depends on age and on being the patient's odd-site lesion.

    Each patient has 4-11 lesions at one main site and exactly one lesion at another site.
    Returns the canonical columns plus ``odd`` (1 for the planted odd-site lesion; not a feature).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        age = float(rng.integers(5, 17) * 5)
        sex = ["male", "female"][rng.integers(2)]
        main = SITES[rng.integers(3)]
        odd_site = rng.choice([s for s in SITES if s != main])
        m = int(rng.integers(5, 13))
        odd_index = int(rng.integers(m))
        for j in range(m):
            odd = j == odd_index
            logit = -4.0 + 0.07 * (age - 50) + odd_effect * odd
            target = int(rng.random() < 1 / (1 + np.exp(-logit)))
            rows.append(
                {
                    "image_name": f"ISIC_{p:04d}{j:03d}",
                    "patient_id": f"IP_{p:04d}",
                    "lesion_id": f"IL_{p:04d}{j:03d}",
                    "sex": sex,
                    "age_approx": age,
                    "site": odd_site if odd else main,
                    "diagnosis": "melanoma" if target else "nevus",
                    "target": target,
                    "clinic": ["north", "south"][p % 2],
                    "odd": int(odd),
                }
            )
    return pd.DataFrame(rows)


def scores_for(table: pd.DataFrame, seed: int = 0, signal: float = 2.5) -> pd.DataFrame:
    """Image-model-like probabilities: informative about the label, independent of the metadata."""
    rng = np.random.default_rng(seed + 100)
    logit = -3.0 + signal * table["target"].to_numpy() + rng.normal(0, 1.0, len(table))
    return pd.DataFrame({"image_name": table["image_name"], "prediction": 1 / (1 + np.exp(-logit))})


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return synthetic_table()


@pytest.fixture(scope="module")
def cv_result(table):
    return cross_validate_meta(table, n_folds=5, seed=0)


# --------------------------------------------------------------------------- features


def test_features_describe_the_patient_context(table):
    features = meta_features(table)
    assert list(features.columns) == list(FEATURE_SETS["context"])
    assert features.index.equals(table.index)
    first = table["patient_id"] == "IP_0000"
    f = features[first]
    assert (f["pt_n_images"] == first.sum()).all()
    odd_row = table.index[first & (table["odd"] == 1)][0]
    # The planted lesion is the only one of its patient at its site.
    assert features.loc[odd_row, "n_at_site"] == 1
    assert features.loc[odd_row, "share_at_site"] == pytest.approx(1 / first.sum())
    assert (f.drop(index=odd_row)["n_at_site"] == first.sum() - 1).all()
    assert (f["pt_n_sites"] == 2).all()


def test_retrospective_features_read_the_whole_history():
    t = pd.DataFrame(
        {
            "image_name": list("abcd"),
            "patient_id": ["p", "p", "p", "q"],
            "age_approx": [40.0, 45.0, 50.0, np.nan],
            "sex": ["Male ", "male", "male", None],
            "site": ["torso", "torso", None, "torso"],
        }
    )
    f = meta_features(t, feature_set="retrospective")
    assert f["age_minus_pt_min"].tolist()[:3] == [0, 5, 10]
    assert f["age_minus_pt_mean"].tolist()[:3] == [-5, 0, 5]
    assert f["pt_max_minus_age"].tolist()[:3] == [10, 5, 0]
    assert f["age_rank_in_pt"].tolist()[:3] == pytest.approx([1 / 3, 2 / 3, 1])
    assert np.isnan(f.loc[3, "age_minus_pt_mean"])
    assert f["sex"].tolist() == ["male", "male", "male", None]
    assert np.isnan(f.loc[2, "n_at_site"]) and f.loc[0, "n_at_site"] == 2
    assert f["pt_n_images"].tolist() == [3, 3, 3, 1]


def test_context_features_read_only_the_visits_so_far():
    t = pd.DataFrame(
        {
            "image_name": list("abcde"),
            "patient_id": ["p", "p", "p", "p", "q"],
            "lesion_id": ["l1", "l2", "l1", "l3", "l9"],
            "age_approx": [40.0, 40.0, 45.0, 50.0, np.nan],
            "site": ["torso", "torso", "torso", "head/neck", "torso"],
        }
    )
    f = meta_features(t)
    assert "pt_max_minus_age" not in f.columns
    assert f["pt_n_images"].tolist() == [2, 2, 3, 4, 1]
    assert f["pt_n_lesions"].tolist() == [2, 2, 2, 3, 1]
    assert f["pt_n_sites"].tolist() == [1, 1, 1, 2, 1]
    assert f["age_minus_pt_mean"].tolist()[:4] == pytest.approx([0, 0, 45 - 125 / 3, 50 - 175 / 4])
    assert f["age_rank_in_pt"].tolist()[:4] == pytest.approx([3 / 4, 3 / 4, 1, 1])
    assert f["n_at_site"].tolist() == [2, 2, 3, 1, 1]
    assert f["lesion_n_images"].tolist() == [1, 1, 2, 1, 1]


def test_a_visits_context_features_ignore_later_visits(table):
    later = table[table["patient_id"].isin(["IP_0000", "IP_0001"])].assign(
        age_approx=lambda d: d["age_approx"] + 5,
        image_name=lambda d: d["image_name"] + "_later",
        lesion_id=lambda d: d["lesion_id"] + "_later",
        site="palms/soles",
    )
    with_later = meta_features(pd.concat([table, later], ignore_index=True))
    pd.testing.assert_frame_equal(with_later.iloc[: len(table)], meta_features(table))
    retrospective = meta_features(pd.concat([table, later], ignore_index=True), feature_set="retrospective")
    assert not retrospective.iloc[: len(table)].equals(meta_features(table, feature_set="retrospective"))


def test_features_never_read_labels(table):
    scores = scores_for(table)
    before = meta_features(table, scores)
    changed = table.copy()
    patient = changed["patient_id"] == "IP_0003"
    changed.loc[patient, "target"] = 1 - changed.loc[patient, "target"]
    changed.loc[patient, "diagnosis"] = "melanoma"
    changed["benign_malignant"] = np.where(changed["target"] == 1, "malignant", "benign")
    pd.testing.assert_frame_equal(meta_features(changed, scores), before)
    pd.testing.assert_frame_equal(meta_features(table.drop(columns=["target", "diagnosis"]), scores), before)


def test_features_reject_bad_tables(table):
    with pytest.raises(CohortError, match="image_name is duplicated"):
        meta_features(pd.concat([table.head(3), table.head(1)]))
    with pytest.raises(CohortError, match="no image_name column"):
        meta_features(table.drop(columns=["image_name"]))
    bad_age = table.head(5).copy()
    bad_age.loc[2, "age_approx"] = 450
    with pytest.raises(CohortError, match="row 2"):
        meta_features(bad_age)
    with pytest.raises(ConfigError, match="feature_set"):
        meta_features(table, feature_set="everything")
    wrong = scores_for(table).assign(prediction=lambda d: d["prediction"] * 10)
    with pytest.raises(MelcoreError, match="0..1"):
        meta_features(table, wrong)
    with pytest.raises(MelcoreError, match="none of its"):
        meta_features(table, pd.DataFrame({"image_name": ["x", "y"], "prediction": [0.1, 0.2]}))


# --------------------------------------------------------------------------- ugly duckling


def _planted_outliers(seed: int = 3):
    rng = np.random.default_rng(seed)
    table = synthetic_table(n_patients=30, seed=seed)
    logit = rng.normal(-3.0, 0.3, len(table)) + 2.0 * table["odd"].to_numpy()
    centres = rng.normal(0, 1, (30, 16))
    patient = table["patient_id"].str[3:].astype(int).to_numpy()
    emb = (
        centres[patient]
        + rng.normal(0, 0.2, (len(table), 16))
        + 3.0 * table["odd"].to_numpy()[:, None] * rng.normal(0, 1, (len(table), 16))
    )
    scores = pd.DataFrame({"image_name": table["image_name"], "prediction": 1 / (1 + np.exp(-logit))})
    embeddings = pd.DataFrame(emb).assign(image_name=table["image_name"].to_numpy())
    return table, scores, embeddings


def test_ugly_duckling_ranks_the_planted_lesion_first():
    table, scores, embeddings = _planted_outliers()
    for ud in (ugly_duckling_scores(table, scores), ugly_duckling_scores(table, scores, embeddings)):
        assert ud.index.equals(table.index) and ud.name == "ugly_duckling"
        top = ud.groupby(table["patient_id"]).idxmax()
        assert (table.loc[top.to_numpy(), "odd"] == 1).all()
        assert ud[table["odd"] == 1].min() > 2


def test_ugly_duckling_from_embeddings_alone_when_scores_are_flat():
    table, _, embeddings = _planted_outliers(seed=4)
    flat = pd.DataFrame({"image_name": table["image_name"], "prediction": 0.05})
    ud = ugly_duckling_scores(table, flat, embeddings)
    top = ud.groupby(table["patient_id"]).idxmax()
    assert (table.loc[top.to_numpy(), "odd"] == 1).all()


def test_ugly_duckling_compares_lesions_not_images():
    # Lesion L1 photographed twice: its images share one value and are not each other's neighbours.
    t = pd.DataFrame(
        {
            "image_name": ["a1", "a2", "b", "c", "d", "solo"],
            "patient_id": ["p"] * 5 + ["q"],
            "lesion_id": ["L1", "L1", "L2", "L3", "L4", "L9"],
        }
    )
    s = pd.Series([0.9, 0.8, 0.05, 0.06, 0.04, 0.5], index=t["image_name"])
    ud = ugly_duckling_scores(t, s)
    assert ud[0] == ud[1] and ud[0] > 3
    assert ud[2:5].max() < 0
    assert np.isnan(ud[5])  # nobody to compare with
    f = meta_features(t, s)
    assert f["ud_n_other_lesions"].tolist() == [3, 3, 3, 3, 3, 0]
    assert f.loc[0, "ud_score_rank"] == 1.0


# --------------------------------------------------------------------------- cross-validation


def test_cross_validation_recovers_a_planted_signal(cv_result, table):
    r = cv_result
    assert r.oof_auroc > 0.8
    assert list(r.oof.columns) == ["image_name", "patient_id", "clinic", "target", "prediction", "fold"]
    assert r.oof["image_name"].tolist() == table["image_name"].tolist()
    assert r.oof["prediction"].between(0, 1).all()
    assert len(r.fold_aurocs) == 5
    assert set(r.per_clinic) == {"north", "south"}
    assert r.feature_names == list(FEATURE_SETS["context"])


def test_folds_are_patient_grouped(cv_result):
    folds_per_patient = cv_result.oof.groupby("patient_id")["fold"].nunique()
    assert (folds_per_patient == 1).all()
    assert sorted(cv_result.oof["fold"].unique()) == [0, 1, 2, 3, 4]


def test_shuffled_labels_give_chance(table):
    shuffled = table.copy()
    shuffled["target"] = np.random.default_rng(1).permutation(table["target"].to_numpy())
    r = cross_validate_meta(shuffled, n_folds=5, seed=0)
    assert abs(r.oof_auroc - 0.5) < 0.1


def test_context_beats_the_baseline_features_on_an_odd_site_signal(table, cv_result):
    baseline = cross_validate_meta(table, n_folds=5, seed=0, feature_set="baseline")
    assert cv_result.oof_auroc > baseline.oof_auroc + 0.05


def test_unlabelled_images_are_context_not_predictions(table):
    partial = table.copy()
    partial["target"] = partial["target"].astype("Int8")
    partial.loc[partial.index[::7], "target"] = pd.NA
    calls = []
    r = cross_validate_meta(partial, n_folds=3, seed=0, progress=lambda done, total: calls.append((done, total)))
    assert len(r.oof) == partial["target"].notna().sum()
    assert calls == [(1, 3), (2, 3), (3, 3)]
    full = meta_features(partial)
    assert r.features.reset_index(drop=True).equals(full[partial["target"].notna()].reset_index(drop=True))


def test_cross_validation_input_errors(table):
    with pytest.raises(CohortError, match="benign and malignant"):
        cross_validate_meta(table.assign(target=0))
    with pytest.raises(ConfigError, match="unknown meta model parameter"):
        cross_validate_meta(table, params={"depth": 3})
    with pytest.raises((ConfigError, CohortError)):
        cross_validate_meta(table[table["patient_id"].isin(["IP_0000", "IP_0001"])], n_folds=5)


# --------------------------------------------------------------------------- fusion


def test_fusion_is_out_of_fold_and_combines_both_sources(table, cv_result):
    scores = scores_for(table)
    with_ud = cross_validate_meta(table, n_folds=5, seed=0, image_scores=scores)
    assert set(with_ud.feature_names) >= {"ud_score_z", "ud_score_rank"}
    result = fuse(table, scores, cv_result)
    assert result.oof["fold"].tolist() == cv_result.oof["fold"].tolist()  # same patient folds reused
    assert (result.oof.groupby("patient_id")["fold"].nunique() == 1).all()
    assert result.oof_auroc > max(result.image_auroc, result.meta_auroc) + 0.01
    assert result.meta_auroc == pytest.approx(cv_result.oof_auroc, abs=1e-6)
    assert result.coefficients["logit_image"] > 0 and result.coefficients["logit_meta"] > 0
    # The fused model predicts new rows from its JSON form alone.
    from melcore.meta.fusion import FusionModel, fusion_features

    again = FusionModel.from_dict(json.loads(json.dumps(result.model.to_dict())))
    z = fusion_features(table, scores, cv_result.oof[["image_name", "prediction"]])
    assert np.allclose(again.predict_proba(z), result.model.predict_proba(z))


# --------------------------------------------------------------------------- persistence


def test_save_and_load_reproduce_the_model_without_pickle(table, tmp_path):
    scores = scores_for(table)
    features = meta_features(table, scores)
    model = MetaModel().fit(features, table["target"])
    model.save(tmp_path)
    doc = json.loads((tmp_path / "meta_model.json").read_text())
    assert doc["feature_names"] == list(features.columns)
    with np.load(tmp_path / "meta_model_train.npz", allow_pickle=False) as arrays:
        assert arrays["X"].shape == features.shape
    loaded = MetaModel.load(tmp_path)
    assert np.array_equal(loaded.predict_proba(features), model.predict_proba(features))
    by_table = loaded.predict_table(table, image_scores=scores)
    assert np.allclose(by_table.to_numpy(), model.predict_proba(features)[:, 1])
    with pytest.raises(MelcoreError, match="image_scores"):
        loaded.predict_table(table)


def test_load_refuses_changed_training_data(table, tmp_path):
    model = MetaModel().fit(meta_features(table), table["target"])
    model.save(tmp_path)
    with np.load(tmp_path / "meta_model_train.npz", allow_pickle=False) as arrays:
        data = dict(arrays)
    data["y"] = 1 - data["y"]
    np.savez_compressed(tmp_path / "meta_model_train.npz", **data)
    with pytest.raises(ConfigError, match="checksum"):
        MetaModel.load(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        MetaModel.load(tmp_path / "nothing")


def test_model_validates_its_inputs(table):
    features = meta_features(table)
    with pytest.raises(MelcoreError, match=r"targets must be 0 \(benign\) or 1 \(malignant\): found NaN"):
        MetaModel().fit(features, table["target"].astype(float).where(table.index > 3))
    with pytest.raises(ConfigError, match="learning_rate"):
        MetaModel(learning_rate=5).fit(features, table["target"])
    with pytest.raises(MelcoreError, match="not fitted"):
        MetaModel().predict_proba(features)
    fitted = MetaModel().fit(features, table["target"])
    with pytest.raises(MelcoreError, match="age_approx"):
        fitted.predict_proba(features.drop(columns=["age_approx"]))
    # Unseen categories are treated as missing rather than failing.
    odd = features.head(3).assign(site="left ear")
    assert fitted.predict_proba(odd).shape == (3, 2)


# --------------------------------------------------------------------------- CLI


def _write_isic2020_csv(table: pd.DataFrame, path) -> None:
    out = table.rename(columns={"site": "anatom_site_general_challenge"})
    out["benign_malignant"] = np.where(out["target"] == 1, "malignant", "benign")
    out[
        [
            "image_name",
            "patient_id",
            "sex",
            "age_approx",
            "anatom_site_general_challenge",
            "diagnosis",
            "benign_malignant",
            "target",
        ]
    ].to_csv(path, index=False)


def test_cli_writes_a_meta_run(table, tmp_path, capsys):
    from melcore.__main__ import main

    csv = tmp_path / "train.csv"
    _write_isic2020_csv(table, csv)
    out = tmp_path / "run"
    assert main(["train-meta", "--csv", str(csv), "--folds", "3", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "OOF AUROC" in captured.out and "3/3" in captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.75 < metrics["oof_auroc"] <= 1
    assert len(metrics["fold_aurocs"]) == 3 and metrics["n"] == len(table)
    assert metrics["features"] == list(FEATURE_SETS["context"])
    import melcore

    assert metrics["melcore_version"] == melcore.__version__
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert list(oof.columns) == ["image_name", "patient_id", "clinic", "target", "prediction", "fold"]
    config = json.loads((out / "config.json").read_text())
    assert config["n_folds"] == 3 and config["format"] == "isic2020"
    assert "OOF AUROC" in (out / "train.log").read_text()
    assert MetaModel.load(out).feature_names_in_ == metrics["features"]
    # A second run into the same directory is refused with a one-line error.
    assert main(["train-meta", "--csv", str(csv), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_cli_fuses_image_scores(table, tmp_path, capsys):
    from melcore.__main__ import main

    csv = tmp_path / "train.csv"
    _write_isic2020_csv(table, csv)
    scores_csv = tmp_path / "scores.csv"
    scores_for(table).to_csv(scores_csv, index=False)
    out = tmp_path / "fused"
    assert (
        main(
            [
                "train-meta",
                "--csv",
                str(csv),
                "--image-scores",
                str(scores_csv),
                "--folds",
                "3",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "meta+image fusion"
    assert metrics["oof_auroc"] == pytest.approx(metrics["fusion"]["oof_auroc"])
    assert metrics["oof_auroc"] > metrics["fusion"]["image_auroc"]
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert {"meta_prediction", "image_score", "ugly_duckling"} <= set(oof.columns)
    assert (out / "fusion.json").exists()
    assert main(["train-meta", "--csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x")]) == 2


def test_run_with_partial_image_scores_keeps_meta_predictions(table, tmp_path):
    from melcore.meta.jobs import train_meta_run

    half = table["patient_id"].str[3:].astype(int) % 2 == 0
    metrics = train_meta_run(table, tmp_path / "run", n_folds=3, image_scores=scores_for(table)[half.to_numpy()])
    oof = pd.read_csv(tmp_path / "run" / "oof_predictions.csv")
    assert metrics["model"] == "meta" and metrics["fusion"]["n"] == half.sum()
    assert np.allclose(oof["prediction"], oof["meta_prediction"])
    assert oof["fused_prediction"].notna().to_numpy().tolist() == half.tolist()
    assert metrics["oof_auroc"] == pytest.approx(metrics["meta_oof_auroc"])


# --------------------------------------------------------------------------- real data


def test_isic2020_patient_context_reaches_the_goal(isic2020_dir):
    cohort = load_cohort(isic2020_dir / "train.csv", check_images="none")
    result = cross_validate_meta(cohort, n_folds=5, seed=0)
    assert (result.oof.groupby("patient_id")["fold"].nunique() == 1).all()
    assert result.oof["target"].sum() == 584
    assert "diagnosis" not in result.feature_names and "benign_malignant" not in result.feature_names
    assert result.oof_auroc >= 0.76


def test_missingness_that_tells_the_class_or_the_source_is_warned_about(table, tmp_path):
    from melcore.meta.jobs import missingness_warnings, train_meta_run

    assert missingness_warnings(table) == []  # every field known everywhere
    by_source = table.copy()
    by_source.loc[by_source["clinic"] == "south", "age_approx"] = np.nan
    warnings = missingness_warnings(by_source)
    assert len(warnings) == 1 and "age is missing for 100% of clinic/source 'south' but 0% of 'north'" in warnings[0]
    by_class = table.copy()
    melanomas = by_class.index[by_class["target"] == 1]
    by_class.loc[melanomas[: len(melanomas) // 2], "sex"] = None  # half the melanomas, none of the rest
    warnings = missingness_warnings(by_class)
    assert len(warnings) == 1 and warnings[0].startswith("sex is missing for 50% of the melanomas but 0% of")
    # a small gap is not a shortcut: a tenth of the melanomas without sex
    by_class.loc[melanomas[len(melanomas) // 10 : len(melanomas) // 2], "sex"] = "female"
    assert by_class["sex"].isna().sum() > 0 and missingness_warnings(by_class) == []
    metrics = train_meta_run(by_source, tmp_path / "run", n_folds=3)
    assert metrics["missingness_warnings"] == missingness_warnings(by_source)
    assert "warning: age is missing for 100%" in (tmp_path / "run" / "train.log").read_text()
