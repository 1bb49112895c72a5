"""Benchmark: which training recipe reaches the best melanoma AUROC on real dermoscopy, on this CPU.

Run by hand: ``cd /work/main && python bench/quality.py`` (colour rows take seconds; each
CNN row 5 x 15 epochs, about 15 minutes on 2 shared cores, so all rows take about 1.5 hours;
``--rows`` picks rows, ``--list`` lists them). Data: ``../shared/data/derm-real-dev``
(1,209 real 180x180 dermoscopy JPEGs). Out-of-fold predictions of every row are kept in
``--cache`` (default ``$MELREVIEW_HOME/bench/quality``) so a rerun only trains missing rows;
``--fresh`` ignores them.

Protocol (fixed before any result was seen, the same for every row):

* Every melanoma of this set comes from the "ISIC archive 2016-2018" source and every
  HAM10000 image is benign, so a model can score well overall by recognising the source.
  Recipes are judged by the AUROC on the SOURCE-MATCHED subset (source "ISIC archive
  2016-2018": 305 images, 124 melanoma), out of fold.
* Folds: 5 lesion-grouped folds (:func:`melcore.splits.group_kfold`, seed 0) made
  separately on the source-matched images and on the HAM10000 images; fold k of a row's
  model never saw fold k's images of either source. Rows "trained on source-matched"
  use only the 305 ISIC images for training; rows "trained on all" use every image
  outside the fold.
* Every model scores every image of its held-out fold, so each row also has an overall
  out-of-fold AUROC over all 1,209 images (inflated by the source shortcut for "all" rows).
* CNNs are trained from scratch (no internet: ImageNet weights cannot be downloaded, so no
  pretrained backbone is available) for a FIXED number of epochs with the last epoch's
  weights: no early stopping and no model selection on the held-out fold. Batches,
  oversampling and augmentation are those of :func:`melcore.training.api.fit`
  (:class:`melcore.pipeline.ImageBatches`); TTA is the 8 dihedral views of
  :mod:`melcore.predict`.
* Colour features: :mod:`melcore.colour`. "v1" rows use its 40 version-1 features
  (:data:`~melcore.colour.BASE_FEATURE_NAMES`: Otsu lesion mask, asymmetry, border, Lab/HSV
  statistics, dermoscopic colour shares, blue-white veil, a little texture); "v2" rows all
  214 (:data:`~melcore.colour.FEATURE_NAMES`: version 1 plus LBP histograms inside the
  lesion and across its border, GLCM statistics, multi-scale DoG / gradient / coherence
  statistics, Lab/HSV histograms, colour relative to the surrounding skin, centre-vs-rim and
  half-vs-half colour differences, outline irregularity, Shades-of-Grey colour-constant Lab
  statistics). Classifiers: standardised logistic regression (C=0.1, fixed) or
  HistGradientBoosting (depth 3, 200 iterations, learning rate 0.05, fixed), and the RBF SVM
  (gamma = 1/n_features on standardised features, C from {0.3, 1, 3, 10} chosen by a 5-fold
  lesion-grouped cross-validation INSIDE the training folds, Platt-scaled on those inner
  out-of-fold scores). Logistic and SVM rows use :class:`melcore.colour.ColourModel`, the
  class a ``cpu-default`` run saves as ``colour_model.json``, so "colour-svm-v2" rows measure
  exactly what that preset's runs deliver.
* Fold seeds 1 and 2: every colour row is re-run on two other fold draws (nothing is
  chosen on them) and reported with its CI; CNN rows (15 minutes each) only on seed 0.
* Fusion rows use the colour row and the best CNN row run (highest source-matched AUROC: a
  choice made on the reported folds; ``--best-cnn`` fixes it). ``mean`` averages the z-scored logits of the colour model and the CNN
  (fixed equal weights, nothing fitted); ``stack`` fits, inside each outer fold, a logistic
  regression on [colour features, CNN OOF logit] of the training images (the CNN OOF scores
  of those images come from the other folds' models, which saw the held-out fold: a mild,
  second-order leak, stated here).
* CI: 95% percentile bootstrap over lesions (2,000 resamples, :func:`melcore.metrics.auroc_ci`).
* Wall time: seconds for the 5 folds (training and scoring) on this machine, shared
  with other jobs; the colour-feature extraction (once, shared by all colour rows) is
  reported on its own line.

The winner is the row with the highest source-matched AUROC (seed 0); rows a preset
reproduces are marked (CNN rows, and the colour rows whose model ``cpu-default`` fits). The
LAST line prints the winner and its AUROC for the three fold seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Scripts in bench/ (e.g. bench/queue.py) must not shadow standard-library modules.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from melcore import settings  # noqa: E402
from melcore.meta.features import logit  # noqa: E402
from melcore.metrics import auroc, auroc_ci  # noqa: E402

SOURCE_MATCHED = "ISIC archive 2016-2018"
N_FOLDS = 5
SEED = 0
OTHER_SEEDS = (1, 2)


@dataclass(frozen=True)
class Recipe:
    """One row: a CNN recipe, a colour-feature model, or a fusion of two rows."""

    name: str
    kind: str  # "cnn", "colour", "mean", "stack"
    train_on: str = "matched"  # "matched" (305 ISIC images) or "all" (1,209)
    model: str = "cnn-bn"
    image_size: int = 64
    epochs: int = 15
    augment: str = "isic-strong"
    balance: str = "oversample"
    learning_rate: float | None = None
    tta: bool = False
    classifier: str = "lr"  # colour rows: "lr", "hgb" or "svm"
    features: str = "v1"  # colour rows: "v1" (BASE_FEATURE_NAMES) or "v2" (all FEATURE_NAMES)
    parts: tuple = ()  # fusion rows: (colour row, cnn row)
    weights: str = "imagenet"  # pretrained rows: "imagenet" or "none" (the same network, random weights)
    pooling: str = "multi-level"  # pretrained rows: melcore.registry.POOLINGS
    note: str = ""

    @property
    def presettable(self) -> bool:
        # cpu-default's colour model is the v2 RBF SVM (melcore.colour.fit_colour_model's defaults).
        # colour-svm's model is the v2 RBF SVM (melcore.colour.fit_colour_model's defaults); cpu-default is the
        # pretrained multi-level EfficientNet-Lite0 row.
        return (
            self.kind == "cnn"
            or (self.kind == "colour" and self.classifier == "svm" and self.features == "v2")
            or (
                self.kind == "pretrained"
                and self.weights == "imagenet"
                and self.pooling == "multi-level"
                and self.train_on == "matched"
            )
        )


CNN = "cnn"
PRETRAINED = "pretrained"
ROWS: list[Recipe] = [
    Recipe(
        "lite0-224-multi-logistic/matched",
        PRETRAINED,
        model="efficientnet-lite0",
        image_size=224,
        note="EfficientNet-Lite0 ImageNet, frozen, multi-level avg+max pooling, logistic head, C by inner CV "
        "(cpu-default)",
    ),
    Recipe(
        "lite0-224-avg-logistic/matched",
        PRETRAINED,
        model="efficientnet-lite0",
        image_size=224,
        pooling="avg",
        note="the same with the last map's average pooling only",
    ),
    Recipe(
        "lite0-224-multi-logistic/all",
        PRETRAINED,
        train_on="all",
        model="efficientnet-lite0",
        image_size=224,
        note="cpu-default's recipe trained on all images (mixed sources)",
    ),
    Recipe(
        "lite0-224-random-multi-logistic/matched",
        PRETRAINED,
        model="efficientnet-lite0",
        image_size=224,
        weights="none",
        note="the same network with random weights (what ImageNet adds)",
    ),
    Recipe("colour-lr/matched", "colour", classifier="lr", note="v1 colour+shape features, logistic regression"),
    Recipe("colour-hgb/matched", "colour", classifier="hgb", note="v1 features, gradient boosting"),
    Recipe("colour-lr/all", "colour", train_on="all", classifier="lr"),
    Recipe("colour-hgb/all", "colour", train_on="all", classifier="hgb"),
    Recipe(
        "colour-lr-v2/matched",
        "colour",
        classifier="lr",
        features="v2",
        note="v2 features (+texture, histograms, relative colour...), logistic regression",
    ),
    Recipe("colour-svm-v1/matched", "colour", classifier="svm", note="v1 features, RBF SVM, C by inner CV"),
    Recipe(
        "colour-svm-v2/matched",
        "colour",
        classifier="svm",
        features="v2",
        note="v2 features, RBF SVM, C by inner CV (cpu-default's colour model)",
    ),
    Recipe(
        "colour-svm-v2/all",
        "colour",
        train_on="all",
        classifier="svm",
        features="v2",
        note="the same trained on all images (what cpu-default fits on a mixed-source cohort)",
    ),
    Recipe("cnn-bn-64-strong-os/matched", CNN),
    Recipe("cnn-bn-64-strong-os/matched+tta", CNN, tta=True, note="same models, 8-view TTA"),
    Recipe("cnn-bn-64-basic-os/matched", CNN, augment="basic"),
    Recipe("cnn-bn-64-strong-cw/matched", CNN, balance="class-weight"),
    Recipe("basic-cnn-64-basic-os/matched", CNN, model="basic-cnn", augment="basic"),
    Recipe("cnn-bn-96-strong-os/matched", CNN, image_size=96),
    Recipe(
        "cnn-bn-64-strong-os/all",
        CNN,
        train_on="all",
        epochs=3,
        note="3 epochs: an oversampled epoch over all images is ~6x the matched set's",
    ),
    Recipe("mean(colour-lr, best cnn)", "mean", parts=("colour-lr/matched", "best-cnn")),
    Recipe("stack(colour, best cnn)", "stack", parts=("colour-lr/matched", "best-cnn")),
]
ROW_BY_NAME = {row.name: row for row in ROWS}


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    cohort: object
    y: np.ndarray  # int (n,)
    matched: np.ndarray  # bool (n,)
    groups: np.ndarray  # str (n,)
    folds: np.ndarray  # int (n,)
    images: dict = field(default_factory=dict)  # size -> uint8 (n, s, s, 3)
    features: np.ndarray | None = None
    feature_seconds: float = 0.0
    pretrained_seconds: dict = field(default_factory=dict)
    choices: dict = field(default_factory=dict)  # row -> what each outer fold's inner CV chose


def make_folds(y: np.ndarray, matched: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """Lesion-grouped folds made separately on the source-matched and the other images."""
    from melcore.splits import group_kfold

    folds = np.empty(len(y), dtype=np.int64)
    for part in (matched, ~matched):
        idx = np.flatnonzero(part)
        folds[idx] = group_kfold(groups[idx], y[idx], N_FOLDS, seed=seed)
    return folds


def load_data(data_dir: Path) -> Data:
    from melcore.cohort import load_cohort

    cohort = load_cohort(data_dir / "labels.csv", data_dir / "images", clinic_column="source")
    table = cohort.table
    y = table["target"].astype(int).to_numpy()
    matched = (table["clinic"] == SOURCE_MATCHED).to_numpy()
    groups = cohort.groups.astype(str).to_numpy()
    return Data(cohort, y, matched, groups, make_folds(y, matched, groups, SEED))


def images_at(data: Data, size: int) -> np.ndarray:
    from melcore.images import load_images

    if size not in data.images:
        data.images[size] = load_images(data.cohort.table["image_path"].tolist(), size, cache=True)
    return data.images[size]


def colour_matrix(data: Data) -> np.ndarray:
    from melcore.colour import colour_features_of_files

    if data.features is None:
        started = time.perf_counter()
        # The same function (decoder, size) a run would use at training and prediction time.
        data.features = colour_features_of_files(data.cohort.table["image_path"].tolist(), cache=True)
        data.feature_seconds = time.perf_counter() - started
    return data.features


def train_mask(data: Data, recipe: Recipe, fold: int) -> np.ndarray:
    mask = data.folds != fold
    return mask & data.matched if recipe.train_on == "matched" else mask


# --------------------------------------------------------------------------- rows


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def feature_columns(which: str) -> np.ndarray:
    """Column indices of the "v1" (version-1) or "v2" (all) colour features."""
    from melcore.colour import BASE_FEATURE_NAMES, FEATURE_NAMES

    names = BASE_FEATURE_NAMES if which == "v1" else FEATURE_NAMES
    return np.array([FEATURE_NAMES.index(name) for name in names])


def colour_probabilities_oof(data: Data, recipe: Recipe) -> np.ndarray:
    """Out-of-fold melanoma probabilities (n,) of a colour row (every image scored by its fold's model)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from melcore.colour import BASE_FEATURE_NAMES, ColourModel

    features = colour_matrix(data)
    out = np.empty(len(data.y))
    subset = BASE_FEATURE_NAMES if recipe.features == "v1" else None
    for k in range(N_FOLDS):
        fit_rows = train_mask(data, recipe, k)
        held = data.folds == k
        if recipe.classifier == "hgb":
            columns = feature_columns(recipe.features)
            model = HistGradientBoostingClassifier(
                max_depth=3,
                learning_rate=0.05,
                max_iter=200,
                min_samples_leaf=10,
                l2_regularization=1.0,
                random_state=SEED,
            )
            model.fit(features[fit_rows][:, columns], data.y[fit_rows])
            out[held] = model.predict_proba(features[held][:, columns])[:, 1]
            continue
        if recipe.classifier == "lr":
            model = ColourModel(C=0.1, kernel="linear", features=subset)
        else:  # the lesion-grouped inner CV of ColourModel picks C on the training rows only
            model = ColourModel(C=None, kernel="rbf", features=subset)
        model.fit(features[fit_rows], data.y[fit_rows], groups=data.groups[fit_rows])
        out[held] = model.predict_proba(features[held])
    return out


run_colour = colour_probabilities_oof


def pretrained_features(data: Data, recipe: Recipe) -> np.ndarray:
    """Frozen backbone features (n, n_features) of every image, through melcore's feature cache."""
    from melcore.features import compute_features, get_extractor
    from melcore.training.config import TrainConfig, validate
    from melcore.training.fast_head import pooling_column_sets

    key = (recipe.model, recipe.image_size, recipe.weights, recipe.pooling)
    if key not in data.images:
        config = validate(
            TrainConfig(
                model=recipe.model,
                image_size=recipe.image_size,
                weights=recipe.weights,
                pooling=recipe.pooling,
                mode="fast-head",
                head_fit="logistic-cv",
            )
        )
        started = time.perf_counter()
        extractor = get_extractor(config)
        result = compute_features(extractor, data.cohort.table["image_path"].tolist(), workers=2)
        data.images[key] = result.features[0]
        data.images[key + ("column sets",)] = pooling_column_sets(extractor.backbone)
        data.pretrained_seconds[key] = time.perf_counter() - started
    return data.images[key]


def pretrained_probabilities_oof(data: Data, recipe: Recipe) -> np.ndarray:
    """Out-of-fold probabilities of a pretrained row: :func:`melcore.training.fast_head.fit_logistic_head` (what a
    ``cpu-default`` run fits: C, and for multi-level rows whether to use every pooled level or the last
    map's average pool only, by a lesion-grouped CV inside the training folds) per outer fold."""
    from melcore.training.fast_head import fit_logistic_head

    x = pretrained_features(data, recipe)
    column_sets = data.images[(recipe.model, recipe.image_size, recipe.weights, recipe.pooling, "column sets")]
    out = np.empty(len(data.y))
    for k in range(N_FOLDS):
        rows = np.flatnonzero(train_mask(data, recipe, k))
        fitted = fit_logistic_head(x[rows], data.y[rows], data.groups[rows], seed=SEED, column_sets=column_sets)
        data.choices.setdefault(recipe.name, []).append(f"{fitted['columns']}, C={fitted['C']:g}")
        held = data.folds == k
        out[held] = _sigmoid(x[held].astype(np.float64) @ fitted["kernel"][:, 0] + fitted["bias"][0])
    return out


def run_cnn(data: Data, recipe: Recipe, log) -> dict[str, np.ndarray]:
    """OOF probabilities without and with TTA (the same models): {"plain": (n,), "tta": (n,)}."""
    import keras

    from melcore import models
    from melcore.images import ImageCache
    from melcore.pipeline import ImageBatches, class_weights
    from melcore.predict import predict_images
    from melcore.training.optimizers import make_optimizer
    from melcore.training.recipes import recipe_for

    images = images_at(data, recipe.image_size)
    table = data.cohort.table
    cache = ImageCache()
    defaults = recipe_for(recipe.model)
    plain, tta = np.empty(len(data.y)), np.empty(len(data.y))
    for k in range(N_FOLDS):
        started = time.perf_counter()
        rows = np.flatnonzero(train_mask(data, recipe, k))
        keras.utils.set_random_seed(SEED + k)
        model, _ = models.build_model(recipe.model, recipe.image_size, weights="none")
        batches = ImageBatches.from_table(
            table.iloc[rows],
            recipe.image_size,
            batch_size=defaults.batch_size,
            augment=recipe.augment,
            balance="none" if recipe.balance == "class-weight" else recipe.balance,
            seed=SEED + k,
            cache=cache,
            workers=2,
        )
        weights = class_weights(data.y[rows]) if recipe.balance == "class-weight" else None
        models.set_trainable(model, "all")
        lr = recipe.learning_rate or defaults.learning_rate
        model.compile(
            optimizer=make_optimizer(defaults, lr, len(batches), recipe.epochs), loss=keras.losses.BinaryCrossentropy()
        )
        model.fit(batches, epochs=recipe.epochs, shuffle=False, class_weight=weights, verbose=0)
        held = np.flatnonzero(data.folds == k)
        plain[held] = predict_images(model, images[held], tta=False)
        tta[held] = predict_images(model, images[held], tta=True)
        matched_held = held[data.matched[held]]
        log(
            f"  fold {k}: {len(rows)} training images, {time.perf_counter() - started:.0f} s, matched AUROC "
            f"{auroc(data.y[matched_held], plain[matched_held]):.3f}"
        )
        keras.backend.clear_session()
    return {"plain": plain, "tta": tta}


def run_fusion(data: Data, recipe: Recipe, colour_p: np.ndarray, cnn_p: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    a, b = logit(colour_p), logit(cnn_p)
    if recipe.kind == "mean":
        # z-scores over the training-side images of the source-matched set only (no labels used).
        m = data.matched
        z = (a - a[m].mean()) / a[m].std() + (b - b[m].mean()) / b[m].std()
        return _sigmoid(z / 2.0)
    x = np.column_stack([colour_matrix(data)[:, feature_columns(ROW_BY_NAME[recipe.parts[0]].features)], b])
    out = np.empty(len(data.y))
    for k in range(N_FOLDS):
        fit_rows = train_mask(data, recipe, k)
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
        model.fit(x[fit_rows], data.y[fit_rows])
        held = data.folds == k
        out[held] = model.predict_proba(x[held])[:, 1]
    return out


# --------------------------------------------------------------------------- driver


def clean_subset(data: Data) -> np.ndarray:
    """The ISIC_0000xxx collection: the only one of the source-matched images holding both classes."""
    names = data.cohort.table["image_name"].astype(str)
    return data.matched & names.str.match(r"ISIC_0000\d{3}$").to_numpy()


def evaluate(data: Data, p: np.ndarray, folds: np.ndarray | None = None) -> dict:
    m = data.matched
    folds = data.folds if folds is None else folds
    low, high, *_ = auroc_ci(data.y[m], p[m], groups=data.groups[m], n_boot=2000, seed=SEED)
    c = clean_subset(data)
    clean_low, clean_high, *_ = auroc_ci(data.y[c], p[c], groups=data.groups[c], n_boot=2000, seed=SEED)
    per_fold = [auroc(data.y[m & (folds == k)], p[m & (folds == k)]) for k in range(N_FOLDS)]
    return {
        "matched_auroc": auroc(data.y[m], p[m]),
        "ci": (low, high),
        "overall_auroc": auroc(data.y, p),
        "clean_auroc": auroc(data.y[c], p[c]),
        "clean_ci": (clean_low, clean_high),
        "fold_mean": float(np.mean(per_fold)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "derm-real-dev")
    parser.add_argument("--cache", type=Path, default=None, help="folder for the rows' OOF predictions")
    parser.add_argument("--rows", nargs="*", help="row names to run (default all); see --list")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--fresh", action="store_true", help="recompute rows even when cached")
    parser.add_argument("--best-cnn", help="CNN row used by the fusion rows (default: the best CNN row run)")
    args = parser.parse_args(argv)
    if args.list:
        for row in ROWS:
            print(f"{row.name:42s} {row.note}")
        return 0
    if not (args.data / "labels.csv").is_file():
        print(f"no data at {args.data} (labels.csv + images/ expected)", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cache_dir = (args.cache or settings.subdir("bench") / "quality").expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)

    def log(text):
        print(text, file=sys.stderr, flush=True)

    data = load_data(args.data)
    wanted = args.rows or [row.name for row in ROWS]
    unknown = [name for name in wanted if name not in ROW_BY_NAME]
    if unknown:
        print(f"unknown rows {unknown}; valid: {', '.join(ROW_BY_NAME)}", file=sys.stderr)
        return 2
    predictions: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}

    def cached(name: str):
        # Colour rows carry the feature version in the file name: v1-era caches are not reused.
        suffix = {"colour": "@colour2", PRETRAINED: "@pre2"}.get(ROW_BY_NAME[name].kind, "")
        return cache_dir / (name.replace("/", "__").replace(" ", "_") + suffix + ".npz")

    def load_cached(name):
        path = cached(name)
        if path.is_file() and not args.fresh:
            with np.load(path, allow_pickle=False) as z:
                if len(z["p"]) == len(data.y):
                    predictions[name], seconds[name] = z["p"], float(z["seconds"])
                    return True
        return False

    for name in wanted:
        recipe = ROW_BY_NAME[name]
        if recipe.kind in ("mean", "stack") or load_cached(name):
            continue
        log(f"{name} ...")
        if recipe.kind == "colour":
            colour_matrix(data)  # extraction is timed once, on its own line
        started = time.perf_counter()
        if recipe.kind == "colour":
            p = run_colour(data, recipe)
        elif recipe.kind == PRETRAINED:
            p = pretrained_probabilities_oof(data, recipe)
        else:
            # A "+tta" row scores the models of its base row with TTA: one training gives both rows.
            base = ROW_BY_NAME.get(name.removesuffix("+tta"), recipe) if recipe.tta else recipe
            out = run_cnn(data, base, log)
            took = time.perf_counter() - started
            for row_name, key in ((base.name, "plain"), (base.name + "+tta", "tta")):
                if row_name in ROW_BY_NAME:
                    np.savez(cached(row_name), p=out[key], seconds=took)
                    predictions[row_name], seconds[row_name] = out[key], took
            log(f"  {took:.0f} s")
            continue
        seconds[name] = time.perf_counter() - started
        predictions[name] = p
        np.savez(cached(name), p=p, seconds=seconds[name])

    results = {name: evaluate(data, p) for name, p in predictions.items()}
    cnn_rows = [n for n in results if ROW_BY_NAME[n].kind == CNN]
    best_cnn = args.best_cnn or (max(cnn_rows, key=lambda n: results[n]["matched_auroc"]) if cnn_rows else None)
    for name in wanted:
        recipe = ROW_BY_NAME[name]
        if recipe.kind not in ("mean", "stack") or best_cnn is None:
            continue
        colour_name = recipe.parts[0]
        if colour_name not in predictions and not load_cached(colour_name):
            predictions[colour_name] = run_colour(data, ROW_BY_NAME[colour_name])
        started = time.perf_counter()
        p = run_fusion(data, recipe, predictions[colour_name], predictions[best_cnn])
        seconds[name] = time.perf_counter() - started + seconds.get(best_cnn, 0) + seconds.get(colour_name, 0)
        predictions[name] = p
        results[name] = evaluate(data, p)

    # Robustness to the fold draw: colour rows again on fold seeds 1 and 2 (nothing is chosen on them).
    other_seeds: dict[str, dict[int, dict]] = {}
    for name in [n for n in wanted if n in results and ROW_BY_NAME[n].kind in ("colour", PRETRAINED)]:
        for seed in OTHER_SEEDS:
            path = cached(name).with_name(cached(name).stem + f"@seed{seed}.npz")
            if ROW_BY_NAME[name].kind == PRETRAINED:
                pretrained_features(data, ROW_BY_NAME[name])  # (its column sets too, when read from the cache)
            p = None
            if path.is_file() and not args.fresh:
                with np.load(path, allow_pickle=False) as z:
                    p = z["p"] if len(z["p"]) == len(data.y) else None
            folds = make_folds(data.y, data.matched, data.groups, seed)
            if p is None:
                log(f"{name}, fold seed {seed} ...")
                recipe = ROW_BY_NAME[name]
                shuffled = Data(
                    data.cohort,
                    data.y,
                    data.matched,
                    data.groups,
                    folds,
                    images=data.images,
                    features=colour_matrix(data) if recipe.kind == "colour" else None,
                    choices=data.choices,
                )
                p = (run_colour if recipe.kind == "colour" else pretrained_probabilities_oof)(shuffled, recipe)
                np.savez(path, p=p, seconds=0.0)
            other_seeds.setdefault(name, {})[seed] = evaluate(data, p, folds)

    print(
        f"derm-real-dev: {len(data.y)} images, source-matched {int(data.matched.sum())} "
        f"({int(data.y[data.matched].sum())} melanoma); {N_FOLDS} lesion-grouped folds, seed {SEED} "
        f"(colour rows also seeds {', '.join(map(str, OTHER_SEEDS))}); CNNs from scratch (no ImageNet weights offline)"
    )
    if data.feature_seconds:
        print(
            f"colour feature extraction (all images, once): {data.feature_seconds:.1f} s "
            f"({1000 * data.feature_seconds / len(data.y):.0f} ms/image, incl. decoding)"
        )
    print(
        "matched AUROC: pooled out-of-fold on the source-matched images, 95% lesion-bootstrap CI; fold mean: "
        "mean of the 5 per-fold AUROCs (not penalised by score shifts between fold models); * = a preset "
        "reproduces the row"
    )
    seed_heads = "".join(f" {'seed ' + str(s) + ' matched / clean':24s}" for s in OTHER_SEEDS)
    print(
        f"{'recipe':44s} {'matched AUROC [95% CI]':24s} {'clean AUROC [95% CI]':24s} {'fold mean':>9s} "
        f"{'overall':>8s} {'seconds':>8s}{seed_heads}"
    )

    def cell(r):
        return f"{r['matched_auroc']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"

    order = [n for n in wanted if n in results]
    for name in order:
        r = results[name]
        label = (name.replace("best cnn", best_cnn) if best_cnn else name) + (
            " *" if ROW_BY_NAME[name].presettable else ""
        )
        seeds_text = (
            "".join(
                f" {other_seeds[name][s]['matched_auroc']:.3f} / {other_seeds[name][s]['clean_auroc']:.3f}" + " " * 9
                for s in OTHER_SEEDS
            )
            if name in other_seeds
            else ""
        )
        clean = f"{r['clean_auroc']:.3f} [{r['clean_ci'][0]:.3f}, {r['clean_ci'][1]:.3f}]"
        print(
            f"{label:44s} {cell(r):24s} {clean:24s} {r['fold_mean']:9.3f} {r['overall_auroc']:8.3f} "
            f"{seconds.get(name, 0):8.0f}{seeds_text}"
        )
    (cache_dir / "results.json").write_text(
        json.dumps(
            {n: {**r, "seconds": seconds.get(n), "other_seeds": other_seeds.get(n)} for n, r in results.items()},
            indent=2,
            default=float,
        )
    )
    for name, chosen in data.choices.items():
        print(f"inner-CV choices, {name}, fold seed {SEED} then the others: {'; '.join(chosen)}")
    overall = max(results, key=lambda n: results[n]["matched_auroc"])
    presettable = [n for n in results if ROW_BY_NAME[n].presettable]
    best_preset = max(presettable, key=lambda n: results[n]["matched_auroc"]) if presettable else None
    r = results[overall]
    tail = (
        f"; best preset-able row {best_preset} {results[best_preset]['matched_auroc']:.3f}"
        if best_preset and best_preset != overall
        else ""
    )
    again = "".join(
        f", seed {s} {other_seeds[overall][s]['matched_auroc']:.3f}" for s in OTHER_SEEDS if overall in other_seeds
    )
    label = overall.replace("best cnn", best_cnn) if best_cnn else overall
    print(
        f"winner: {label} source-matched OOF AUROC {r['matched_auroc']:.3f} "
        f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] (seed 0{again}){tail}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
